"""Text encoders from tiny offline models: OpenCLIP and Hugging Face CLIP / T5 / BERT give tokens, mask
and pooled of the declared shapes, the null condition, padding independence, the reference pooled
vector, stable fingerprints, configs that compose, and clear errors."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion.encoders import HFTextEncoder, OpenCLIPTextEncoder, TextEncoder
from tests.tiny_encoders import (  # noqa: F401 (no_network: fixture)
    TINY_OPENCLIP_CONFIG,
    group_config,
    no_network,
    save_tiny_hf,
    tiny_hf_encoder,
    tiny_openclip_encoder,
)

PROMPTS = ["a photo of a cat", "", "big red car on the sea " * 6]  # the last one is truncated
KINDS = ["openclip", "clip", "clip_text", "clip_full", "t5", "bert"]
# (token_dim, pooled_dim, real tokens of PROMPTS[0] and of "": words plus the family's special tokens)
EXPECTED = {
    "openclip": (32, 16, 7, 2),  # <sot> ... <eot>
    "clip": (32, 16, 7, 2),  # <bos> ... <eos>, projected pooled
    "clip_text": (32, 32, 7, 2),  # no projection: pooled is the EOS state
    "clip_full": (32, 16, 7, 2),
    "t5": (32, 32, 6, 1),  # ... </s>
    "bert": (32, 32, 7, 2),  # [CLS] ... [SEP]
}
SHORT, LONG = 16, 24  # two padding lengths (24: the tiny OpenCLIP context length)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """make(kind, seed=0, max_length=SHORT) -> a cached encoder; HF models are saved once per (kind, seed)."""
    root = tmp_path_factory.mktemp("hf")

    @cache
    def build(kind: str, seed: int = 0, max_length: int = SHORT) -> TextEncoder:
        if kind == "openclip":
            return tiny_openclip_encoder(seed=seed, max_length=max_length)
        return tiny_hf_encoder(kind, root, seed=seed, max_length=max_length)

    build.root = root
    return build


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_mask(kind, make):
    enc = make(kind)
    token_dim, pooled_dim, n_prompt, n_empty = EXPECTED[kind]
    assert (enc.token_dim, enc.pooled_dim, enc.max_length) == (token_dim, pooled_dim, SHORT)
    c = enc(PROMPTS)
    assert c.tokens.shape == (3, SHORT, token_dim) and c.tokens.dtype == torch.float32
    assert c.mask.shape == (3, SHORT) and c.mask.dtype == torch.bool
    assert c.pooled.shape == (3, pooled_dim) and c.labels is None
    assert c.mask.sum(1).tolist() == [n_prompt, n_empty, SHORT]
    # Real tokens first, then only padding.
    assert torch.equal(c.mask, torch.arange(SHORT)[None] < c.mask.sum(1, keepdim=True))


@pytest.mark.parametrize("kind", KINDS)
def test_null_condition_is_the_empty_prompt(kind, make):
    enc = make(kind)
    null, empty = enc.null_condition(3), enc([""] * 3)
    assert null.batch_size == 3 and enc.null_condition().batch_size == 1
    torch.testing.assert_close(null.tokens, empty.tokens)
    torch.testing.assert_close(null.pooled, empty.pooled)
    assert torch.equal(null.mask, empty.mask)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_do_not_depend_on_padding_length(kind, make):
    short, long = make(kind)(PROMPTS[:2]), make(kind, max_length=LONG)(PROMPTS[:2])
    assert torch.equal(long.mask[:, :SHORT], short.mask) and not long.mask[:, SHORT:].any()
    torch.testing.assert_close(long.tokens[:, :SHORT][short.mask], short.tokens[short.mask], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(long.pooled, short.pooled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_is_the_reference_vector(kind, make):
    enc = make(kind, max_length=LONG)
    c = enc(PROMPTS)
    rows, last = torch.arange(3), c.mask.sum(1) - 1  # the EOS/EOT position
    with torch.no_grad():
        if kind == "openclip":  # exactly what open_clip's own encode_text returns
            expected = enc.model.encode_text(enc.tokenizer(PROMPTS, context_length=LONG))
        elif kind == "clip":
            expected = enc.model.text_projection(c.tokens[rows, last])
        elif kind == "clip_text":
            expected = c.tokens[rows, last]
        elif kind == "clip_full":  # what the whole CLIPModel gives as its text features
            from transformers import CLIPModel

            full = CLIPModel.from_pretrained(make.root / "tiny-clip_full-0")
            batch = enc.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=LONG, return_tensors="pt")
            expected = full.get_text_features(**batch).pooler_output
        elif kind == "t5":  # masked mean
            expected = (c.tokens * c.mask[..., None]).sum(1) / c.mask.sum(1, keepdim=True)
        else:  # [CLS]
            expected = c.tokens[:, 0]
    torch.testing.assert_close(c.pooled, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["openclip", "clip", "t5", "bert"])
def test_fingerprint_is_stable_and_tracks_the_weights(kind, make, tmp_path):
    fp = make(kind).fingerprint()
    assert json.loads(json.dumps(fp)) == fp and all(isinstance(v, str) for v in fp.values())
    assert make(kind, seed=1).fingerprint()["sha256"] != fp["sha256"]
    assert make(kind, max_length=LONG).fingerprint()["max_length"] == str(LONG)
    if kind == "openclip":
        rebuilt = tiny_openclip_encoder(seed=0, max_length=SHORT)
    else:  # the same seed saved again elsewhere: same weights and tokenizer, another source
        rebuilt = HFTextEncoder(str(save_tiny_hf(kind, tmp_path / kind, seed=0)), max_length=SHORT)
    assert {k: v for k, v in rebuilt.fingerprint().items() if k != "source"} == {
        k: v for k, v in fp.items() if k != "source"
    }


def test_pooling_override(make):
    directory = str(make.root / "tiny-bert-0")
    none = HFTextEncoder(directory, max_length=SHORT, pooling="none")
    assert none.pooled_dim is None and none(["a cat"]).pooled is None
    mean = HFTextEncoder(directory, max_length=SHORT, pooling="mean")(["a cat", "a big dog"])
    torch.testing.assert_close(mean.pooled, (mean.tokens * mean.mask[..., None]).sum(1) / mean.mask.sum(1, keepdim=True))


@pytest.mark.parametrize("kind", ["openclip", "t5"])
def test_frozen_in_eval_without_gradients(kind, make):
    enc = make(kind)
    parent = nn.ModuleDict({"enc": enc, "head": nn.Linear(2, 2)}).train()
    assert parent["head"].training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(["a cat"]).tokens.requires_grad


@pytest.mark.parametrize("option", ["openclip_vit_h", "clip_vit_l", "t5_base", "bert_base"])
def test_every_text_encoder_config_composes_and_instantiates(option, make, tmp_path):
    node = group_config("text_encoder", option, tmp_path)
    assert node._target_.startswith("diffusion.encoders.")
    # The real weights are never downloaded in tests: the same config with a tiny model.
    if option == "openclip_vit_h":
        assert (node.model_name, node.pretrained) == ("ViT-H-14", "laion2b_s32b_b79k")
        tiny = {"pretrained": None, "model_config": TINY_OPENCLIP_CONFIG}
    else:
        kind = {"clip_vit_l": "clip_full", "t5_base": "t5", "bert_base": "bert"}[option]
        assert "/" in node.pretrained or "-" in node.pretrained  # a hub id
        make(kind)  # saves the tiny model
        tiny = {"pretrained": str(make.root / f"tiny-{kind}-0")}
    enc = instantiate(OmegaConf.merge(node, tiny))
    c = enc(["a photo of a cat"])
    assert c.tokens.shape[-1] == enc.token_dim and c.mask.shape == (1, enc.max_length)


def test_bad_input_names_expected_and_received(make):
    enc = make("clip")
    with pytest.raises(ValueError, match=r"expects a list of prompt strings, got 'str'"):
        enc("a cat")
    with pytest.raises(ValueError, match=r"list of prompt strings, got \['str', 'int'\]"):
        enc(["a cat", 3])
    with pytest.raises(ValueError, match=r"at least one prompt, got an empty list"):
        enc([])
    with pytest.raises(ValueError, match=r"batch_size >= 1, got 0"):
        enc.null_condition(0)
    with pytest.raises(ValueError, match=r"max_length must lie in \[1, 77\].*got 100"):
        HFTextEncoder(str(make.root / "tiny-clip-0"), max_length=100)
    with pytest.raises(ValueError, match=r"pooling='max' is not supported; allowed values: 'auto', 'mean'"):
        HFTextEncoder(str(make.root / "tiny-clip-0"), pooling="max")
    with pytest.raises(ValueError, match=r"max_length must lie in \[2, 24\].*got 100"):
        tiny_openclip_encoder(max_length=100)
    with pytest.raises(ValueError, match=r"model_config expects keys embed_dim, vision_cfg, text_cfg; missing \['vision_cfg'\]"):
        OpenCLIPTextEncoder("x", model_config={"embed_dim": 8, "text_cfg": {}})
