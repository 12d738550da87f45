"""Autoencoders: images <-> normalised latents for latent diffusion; the identity for pixel space."""

from diffusion.autoencoders.base import Autoencoder, IdentityAutoencoder, weights_sha256
from diffusion.autoencoders.kl import KLAutoencoder

__all__ = ["Autoencoder", "IdentityAutoencoder", "KLAutoencoder", "weights_sha256"]
