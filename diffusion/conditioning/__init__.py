"""Conditioning: the typed condition of a batch, the null condition and condition dropout."""

from diffusion.conditioning.conditioners import ClassLabels, Conditioner, TextPrompts, Unconditional
from diffusion.conditioning.dropout import ConditionDropout, drop_condition
from diffusion.conditioning.labels import LabelEmbedder, label_condition, null_label_condition
from diffusion.conditioning.types import Conditioning

__all__ = [
    "ClassLabels",
    "Conditioner",
    "Conditioning",
    "TextPrompts",
    "Unconditional",
    "ConditionDropout",
    "LabelEmbedder",
    "drop_condition",
    "label_condition",
    "null_label_condition",
]
