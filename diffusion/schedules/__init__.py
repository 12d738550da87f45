"""Diffusion theories: each is the data definition (alpha, sigma) and the model definition (c, d)."""

from diffusion.schedules.base import PREDICTIONS, Coefficients, Schedule, check_theory, with_model_input
from diffusion.schedules.betas import (
    BETA_SCHEDULES,
    cosine_betas,
    linear_betas,
    make_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)
from diffusion.schedules.ddpm import DDPM
from diffusion.schedules.exploding import EDM, VarianceExploding
from diffusion.schedules.flow import FlowMatching

__all__ = [
    "BETA_SCHEDULES",
    "DDPM",
    "EDM",
    "PREDICTIONS",
    "Coefficients",
    "FlowMatching",
    "Schedule",
    "VarianceExploding",
    "check_theory",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "with_model_input",
]
