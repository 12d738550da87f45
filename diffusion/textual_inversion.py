"""Textual Inversion (Gal et al. 2022): a new word in the text encoder's vocabulary whose embedding
alone trains, the UNet and the text encoder staying as released (``adapter=textual_inversion``).

The placeholder token (and, with ``num_vectors`` > 1, ``<tok>_1 ... <tok>_{n-1}`` after it, which a
prompt's ``<tok>`` expands to, as in diffusers) is added to the Hugging Face tokenizer of every
text encoder of the conditioner (both CLIPs of SDXL, the CLIPs and T5 of SD3 and FLUX). The encoder's
embedding table is left untouched, so its sha256 in checkpoints stays the base's: the new rows live
in :class:`NewTokenRows`, a trainable module of the conditioner (``conditioner.textual_inversion``),
which a hook on each encoder's input embedding reads for the new ids. The rows start as the
initializer token's row. They are saved in diffusers' ``learned_embeds.safetensors`` layout
({placeholder: (num_vectors, dim)}), which ``pipe.load_textual_inversion`` loads.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.adapters import Frozen

#: The file diffusers' textual_inversion.py writes and ``load_textual_inversion`` reads; its SDXL
#: script writes the second text encoder's rows beside it as learned_embeds_2.safetensors.
LEARNED_EMBEDS = "learned_embeds.safetensors"


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """``["<tok>", "<tok>_1", ..., "<tok>_{n-1}"]``: the tokens of a placeholder of ``num_vectors``
    vectors, named as diffusers' scripts and ``load_textual_inversion`` name them."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(prompt: str, placeholder: str, num_vectors: int) -> str:
    """``prompt`` with each ``<tok>`` (not already followed by ``_<digit>``) replaced by its
    ``num_vectors`` tokens, as diffusers' pipelines rewrite a prompt for a multi-vector embedding."""
    if num_vectors == 1:
        return prompt
    return re.sub(re.escape(placeholder) + r"(?!_\d)", " ".join(placeholder_tokens(placeholder, num_vectors)), prompt)


class NewTokenRows(nn.Module):
    """The trainable embedding rows of the new tokens, one (num_vectors, dim) parameter per text
    encoder (named by its place in the conditioner's encoder, dots as ``__``)."""

    def __init__(self, placeholder: str, num_vectors: int) -> None:
        super().__init__()
        self.placeholder, self.num_vectors = placeholder, num_vectors
        self.rows = nn.ParameterDict()
        self.first_ids: dict[str, int] = {}  # the tokenizer id of each encoder's first new token

    def lookup(self, key: str, ids: Tensor, frozen: Tensor) -> Tensor:
        """The embeddings of ``ids``: the new rows where an id is a new token's, else ``frozen`` (the
        frozen table's lookup of the same ids, clamped into it). No host read: ``where``, not ``if``."""
        rows = self.rows[key]
        position = ids - self.first_ids[key]
        new = (position >= 0) & (position < rows.shape[0])
        picked = nn.functional.embedding(position.clamp(0, rows.shape[0] - 1), rows).to(frozen.dtype)
        return torch.where(new.unsqueeze(-1), picked, frozen)


class _EmbeddingHook:
    """Pre- and post-hook of a frozen ``nn.Embedding``: ids beyond the table are clamped for its own
    lookup (the model above still sees the real ids, e.g. CLIP's pooling finds its EOS among them),
    then the new tokens' rows replace what it returned for them."""

    def __init__(self, rows: NewTokenRows, key: str) -> None:
        self.rows, self.key, self._ids = rows, key, None

    def before(self, module: nn.Embedding, args: tuple) -> tuple:
        self._ids = args[0]
        return (args[0].clamp(max=module.num_embeddings - 1), *args[1:])

    def after(self, module: nn.Embedding, args: tuple, output: Tensor) -> Tensor:
        ids, self._ids = self._ids, None
        return self.rows.lookup(self.key, ids, output)


class TextualInversion(Frozen):
    """Train only the embedding of ``placeholder_token`` (``num_vectors`` rows per text encoder),
    initialised from ``initializer_token``'s (one token of the vocabulary); the backbone and the text
    encoders stay fixed (``base``: as adapter=frozen's).

    ``weight_decay`` of the new rows: 0 by default, as this project leaves embedding tables undecayed
    (diffusion.training.optim: decay pulls a lookup towards zero, away from the norm of the words the
    model knows); diffusers' scripts decay them by AdamW's 1e-2 (``adapter.weight_decay=1e-2``).
    """

    name = "textual_inversion"
    conditions_fixed = False  # the text embeddings change every step: none can be cached

    def __init__(self, placeholder_token: str, initializer_token: str, num_vectors: int = 1,
                 weight_decay: float = 0.0, base: str | None = None) -> None:
        super().__init__(base)
        if not isinstance(placeholder_token, str) or not placeholder_token.strip() or any(
                c.isspace() for c in placeholder_token):
            raise ValueError(f"adapter.placeholder_token={placeholder_token!r}: give one word without spaces, "
                             "e.g. '<cat-toy>' (the new token the prompts name the concept by)")
        if not isinstance(initializer_token, str) or not initializer_token.strip():
            raise ValueError(f"adapter.initializer_token={initializer_token!r}: give a word the tokenizer knows as "
                             "one token, close to the concept, e.g. 'toy' (the new rows start as its embedding)")
        if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or num_vectors < 1:
            raise ValueError(f"adapter.num_vectors={num_vectors!r}: the rows of the placeholder must be an integer "
                             ">= 1 (1 is usual, diffusers' --num_vectors)")
        if not weight_decay >= 0:
            raise ValueError(f"adapter.weight_decay={weight_decay!r}: must be >= 0")
        self.placeholder_token, self.initializer_token = placeholder_token, initializer_token
        self.num_vectors, self.weight_decay = num_vectors, float(weight_decay)
        self.rows: NewTokenRows | None = None

    @property
    def tokens(self) -> list[str]:
        return placeholder_tokens(self.placeholder_token, self.num_vectors)

    def attach(self, conditioner: nn.Module) -> None:
        """Add the tokens to each Hugging Face text encoder of ``conditioner`` (a TextPrompts), and the
        trainable rows to the conditioner as ``conditioner.textual_inversion``."""
        if self.rows is not None:
            raise ValueError("this TextualInversion adapter is attached already; build one per model")
        encoder = getattr(conditioner, "encoder", None)
        if encoder is None or getattr(conditioner, "takes", None) != "prompts":
            raise ValueError(f"adapter=textual_inversion learns a word of the prompts: it needs conditioning=text "
                             f"with a text encoder, got the conditioner {type(conditioner).__name__}")
        parts = text_encoder_parts(encoder)
        self.rows = NewTokenRows(self.placeholder_token, self.num_vectors)
        for key, part in parts.items():
            self._add_to(key, part)
        mark_gradients(encoder)
        conditioner.add_module("textual_inversion", self.rows)

    def _add_to(self, key: str, encoder: nn.Module) -> None:
        tokenizer, where = encoder.tokenizer, f"the tokenizer of {encoder.source}"
        init_ids = tokenizer.encode(self.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(init_ids)
            raise ValueError(f"adapter.initializer_token={self.initializer_token!r} is {len(init_ids)} tokens in "
                             f"{where} ({pieces}); it must be exactly one: choose a single common word")
        if init_ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"adapter.initializer_token={self.initializer_token!r} is unknown to {where} (its "
                             "unk token); choose a word of its vocabulary")
        first, vocabulary = len(tokenizer), tokenizer.get_vocab()
        known = [t for t in self.tokens if t in vocabulary]
        added = 0 if known else tokenizer.add_tokens(self.tokens)
        if added != len(self.tokens):  # add_tokens counts the tokens it added
            raise ValueError(f"adapter.placeholder_token={self.placeholder_token!r}: {where} already has "
                             f"{len(known) or len(self.tokens) - added} of the tokens {self.tokens} in its "
                             "vocabulary (add_tokens cannot add them); choose a new word, e.g. '<my-concept>'")
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(first, first + len(ids))):
            raise ValueError(f"{where} gave the new tokens {self.tokens} the ids {ids}, not consecutive ones after "
                             f"its {first}; this tokenizer cannot hold a Textual Inversion")
        embedding = encoder.model.get_input_embeddings()
        init = embedding.weight.detach()[init_ids[0]]
        self.rows.rows[key] = nn.Parameter(init.float().expand(len(ids), -1).clone())
        self.rows.first_ids[key] = first
        # Every module that looks the table up: T5's stack has its own nn.Embedding, tied to the model's.
        for module in encoder.model.modules():
            if isinstance(module, nn.Embedding) and module.weight is embedding.weight:
                hook = _EmbeddingHook(self.rows, key)
                module.register_forward_pre_hook(hook.before)
                module.register_forward_hook(hook.after)
        encoder.prompt_rewrite = partial(expand_placeholder, placeholder=self.placeholder_token,
                                         num_vectors=self.num_vectors)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's group of the new rows (DiffusionModule.configure_optimizers)."""
        if self.rows is None:
            return []
        return [{"params": list(self.rows.parameters()), "weight_decay": self.weight_decay}]

    def learned_embeds(self) -> list[dict[str, Tensor]]:
        """Per text encoder, in order, ``{placeholder: (num_vectors, dim)}``: diffusers' layout."""
        if self.rows is None:
            raise ValueError("the TextualInversion adapter is not attached to a conditioner")
        return [{self.placeholder_token: p.detach().float().cpu().contiguous()} for p in self.rows.rows.values()]

    def write_outputs(self, module: nn.Module, directory: str | Path) -> list[Path]:
        return save_learned_embeds(self, directory)


def save_learned_embeds(adapter: TextualInversion, directory: str | Path) -> list[Path]:
    """``learned_embeds.safetensors`` ({placeholder: (num_vectors, dim)}) of the first text encoder, and
    ``learned_embeds_{i}.safetensors`` of the i-th further one (SDXL's second CLIP: ``_2``), as
    diffusers' textual_inversion.py and textual_inversion_sdxl.py write them; each loads with
    ``pipe.load_textual_inversion(file, token=..., text_encoder=..., tokenizer=...)``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (key, state) in enumerate(zip(adapter.rows.rows.keys(), adapter.learned_embeds())):
        path = directory / (LEARNED_EMBEDS if i == 0 else f"learned_embeds_{i + 1}.safetensors")
        save_file(state, path, metadata={"text_encoder": key, "num_vectors": str(adapter.num_vectors)})
        written.append(path)
    return written


def text_encoder_parts(encoder: nn.Module) -> dict[str, nn.Module]:
    """The Hugging Face encoders of ``encoder`` (itself, or the parts of a
    JointTextEncoder) by their dotted place in it, dots as ``__``; an encoder whose tokenizer cannot
    add tokens is refused with the reason."""
    from diffusion.encoders import HFTextEncoder, OpenCLIPTextEncoder

    found, refused = {}, []
    for name, module in encoder.named_modules():
        if isinstance(module, HFTextEncoder):
            found[name.replace(".", "__") or "encoder"] = module
        elif isinstance(module, OpenCLIPTextEncoder):
            refused.append(name or "the text encoder")
    if refused:
        raise ValueError(
            f"adapter=textual_inversion: {', '.join(refused)} is an OpenCLIPTextEncoder, whose tokenizer "
            "(open_clip's SimpleTokenizer) has a fixed BPE vocabulary and no way to add a token; load the same "
            "weights through transformers instead (HFTextEncoder), e.g. for SD 2.x: text_encoder=clip_vit_l "
            "text_encoder.pretrained=stabilityai/stable-diffusion-2-1 text_encoder.subfolder=text_encoder "
            "text_encoder.tokenizer_subfolder=tokenizer (OpenCLIP ViT-H in transformers' CLIP classes)")
    if not found:
        raise ValueError(f"adapter=textual_inversion needs a Hugging Face text encoder (HFTextEncoder) to add its "
                         f"token to; the conditioner's encoder is a {type(encoder).__name__} with none")
    return found


def mark_gradients(encoder: nn.Module) -> None:
    """Let gradients pass through ``encoder`` and its parts to the new rows (TextEncoder.forward runs
    them under no_grad otherwise); their own weights still take none."""
    from diffusion.encoders.base import TextEncoder

    for module in encoder.modules():
        if isinstance(module, TextEncoder):
            module.passes_gradients = True

