"""Frozen text encoders: prompts -> Conditioning(tokens, mask, pooled), with the null (empty-prompt) condition;
frozen image encoders: images -> image-prompt embeddings (B, N, D) (IP-Adapter)."""

from diffusion.encoders.base import TextEncoder
from diffusion.encoders.hf import HFTextEncoder
from diffusion.encoders.image import CLIPImageEncoder, OpenCLIPImageEncoder, SiglipImageEncoder
from diffusion.encoders.joint import JointTextEncoder
from diffusion.encoders.openclip import OpenCLIPTextEncoder

__all__ = ["CLIPImageEncoder", "HFTextEncoder", "JointTextEncoder", "OpenCLIPImageEncoder", "OpenCLIPTextEncoder",
           "SiglipImageEncoder",
           "TextEncoder"]
