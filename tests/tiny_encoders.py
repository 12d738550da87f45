"""Tiny, randomly initialised, offline autoencoders and text encoders for tests and benchmarks.

Each has the architecture of its real counterpart (same block types, latent channels, scale and
shift, tokenizer conventions) with few, narrow layers; nothing is downloaded.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion.autoencoders import KLAutoencoder
from diffusion.encoders import HFTextEncoder, OpenCLIPTextEncoder

# ---------------------------------------------------------------------------- autoencoders
_KL_BLOCKS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,  # 4 blocks: factor 8, as the real ones
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],  # real: [128, 256, 512, 512]
    layers_per_block=1,  # real: 2
    norm_num_groups=4,  # real: 32
    sample_size=32,
)
# Scale/shift/channels from the configs of stabilityai/sd-vae-ft-mse, stabilityai/sdxl-vae and
# black-forest-labs/FLUX.1-schnell (vae/); FLUX's VAE has no quant convs.
TINY_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd": {**_KL_BLOCKS, "latent_channels": 4, "scaling_factor": 0.18215},
    "sdxl": {**_KL_BLOCKS, "latent_channels": 4, "scaling_factor": 0.13025},
    "flux": {
        **_KL_BLOCKS, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
}


def tiny_vae(family: str = "sd", seed: int = 0, **kwargs: Any) -> KLAutoencoder:
    """A random KLAutoencoder of the `family` ("sd" | "sdxl" | "flux") architecture; kwargs go to KLAutoencoder."""
    if family not in TINY_VAE_CONFIGS:
        raise ValueError(f"tiny_vae: family must be one of {sorted(TINY_VAE_CONFIGS)}, got {family!r}.")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return KLAutoencoder(config=TINY_VAE_CONFIGS[family], **kwargs)


# ---------------------------------------------------------------------------- OpenCLIP
# open_clip's config format; the text tower is CLIP's (causal, BPE vocabulary of 49408, argmax pool).
TINY_OPENCLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_openclip_encoder(seed: int = 0, max_length: int | None = None) -> OpenCLIPTextEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OpenCLIPTextEncoder("tiny-clip", max_length=max_length, model_config=TINY_OPENCLIP_CONFIG)


# ---------------------------------------------------------------------------- Hugging Face
_WORDS = "a an the photo picture of cat dog red blue green small big car tree house on in with sky sea".split()
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "[CLS]", "[SEP]"]
# Where each family puts its special tokens: CLIP <bos> ... <eos>, T5 ... </s>, BERT [CLS] ... [SEP].
_TEMPLATES = {"clip": ("<bos>", "<eos>"), "t5": (None, "<eos>"), "bert": ("[CLS]", "[SEP]")}
HF_KINDS = ("clip", "clip_text", "clip_full", "t5", "bert")


def _save_tokenizer(kind: str, directory: Path) -> dict[str, int]:
    """A word-level tokenizer over a few words with the special-token template of `kind`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    first, last = _TEMPLATES[kind]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(t for t in (first, "$A", last) if t), special_tokens=[(t, vocab[t]) for t in (first, last) if t]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        cls_token="[CLS]", sep_token="[SEP]", model_max_length=64,
    )
    fast.save_pretrained(directory)
    return vocab


def _save_model(kind: str, directory: Path, vocab: dict[str, int], vision: Mapping[str, Any] | None = None) -> None:
    import transformers as tf

    ids = dict(pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
    n = len(vocab)
    if kind.startswith("clip"):
        text = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=77, projection_dim=16, **ids)
        if kind == "clip_full":  # the layout of openai/clip-vit-large-patch14: a whole CLIPModel
            tower = {**dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8), **(vision or {})}
            model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=tower, projection_dim=16))
        elif kind == "clip":  # SDXL's second text encoder: with projection
            model = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**text))
        else:  # SD 1.x: without projection
            model = tf.CLIPTextModel(tf.CLIPTextConfig(**text))
    elif kind == "t5":
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=n, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                              decoder_start_token_id=vocab["<pad>"], **ids))
    else:
        model = tf.BertModel(tf.BertConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=77, **ids))
    model.save_pretrained(directory)


def save_tiny_hf(kind: str, directory: str | Path, seed: int = 0, vision: Mapping[str, Any] | None = None) -> Path:
    """Save a tiny random model and tokenizer of `kind` (see HF_KINDS) to `directory`, as on the hub;
    `vision` overrides clip_full's vision tower config (e.g. image_size, patch_size)."""
    if kind not in HF_KINDS:
        raise ValueError(f"tiny HF encoder: kind must be one of {HF_KINDS}, got {kind!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer("clip" if kind.startswith("clip") else kind, directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_model(kind, directory, vocab, vision)
    return directory


def tiny_hf_encoder(kind: str = "clip", tmp_dir: str | Path = ".", seed: int = 0, **kwargs: Any) -> HFTextEncoder:
    """Save a tiny model of `kind` under `tmp_dir` and load it through HFTextEncoder, as a hub id would be.

    kind: "clip" (CLIPTextModelWithProjection), "clip_text" (CLIPTextModel), "clip_full" (CLIPModel),
    "t5" (T5EncoderModel) or "bert" (BertModel). kwargs go to HFTextEncoder (max_length defaults to 16).
    """
    directory = Path(tmp_dir) / f"tiny-{kind}-{seed}"
    if not (directory / "config.json").exists():
        save_tiny_hf(kind, directory, seed)
    return HFTextEncoder(pretrained=str(directory), **{"max_length": 16, **kwargs})


# ---------------------------------------------------------------------------- released UNets
# Stable Diffusion's UNet layout (cross-attention down, plain down; plain up, cross-attention up),
# narrow, cross-attending to the tiny text encoders' width (32). Real: 320-1280 channels, 2 layers.
TINY_SD_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
)


def tiny_sd_unet(seed: int = 0, **overrides: Any):
    """A random diffusers UNet2DConditionModel of SD's layout (eval mode); overrides replace arguments."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**TINY_SD_UNET, **overrides}).eval()


def save_tiny_sd_unet(directory: str | Path, seed: int = 0):
    """Save a tiny SD UNet with save_pretrained, as on the hub (the UNet's own directory); returns it."""
    unet = tiny_sd_unet(seed)
    unet.save_pretrained(directory)
    return unet


# ---------------------------------------------------------------------------- test helpers
@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported by test modules: any attempt to open an internet connection fails the test."""

    def refuse(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def group_config(group: str, option: str, run_dir: Path) -> Any:
    """The `group` node of the train config composed with `group=option`, as train.py would see it;
    `+group=` while the train config's defaults do not list the group yet."""
    from omegaconf import OmegaConf

    from tests.conftest import CONF, compose_config

    defaults = OmegaConf.load(Path(CONF) / "train.yaml").get("defaults", [])
    listed = any(isinstance(d, Mapping) and group in d for d in defaults)
    return compose_config("train", [f"{'' if listed else '+'}{group}={option}"], run_dir)[group]


def trained_weights(ckpt, prefix: str) -> tuple[int, dict]:
    """``(global step, the state under prefix)`` of a training checkpoint, keys without the prefix
    (e.g. ``backbone.unet.``: the wrapped model's own names, to compare with its released weights)."""
    import torch

    checkpoint = torch.load(ckpt, weights_only=True)
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return checkpoint["global_step"], state
