"""Frozen text encoders: prompts -> Conditioning(tokens, mask, pooled), with the null (empty-prompt) condition."""

from diffusion.encoders.base import TextEncoder
from diffusion.encoders.hf import HFTextEncoder
from diffusion.encoders.joint import JointTextEncoder
from diffusion.encoders.openclip import OpenCLIPTextEncoder

__all__ = ["HFTextEncoder", "JointTextEncoder", "OpenCLIPTextEncoder", "TextEncoder"]
