"""Tests of the Conditioning type, the label embedder with its null class, and condition dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusion.conditioning import (
    ConditionDropout,
    Conditioning,
    LabelEmbedder,
    drop_condition,
    label_condition,
    null_label_condition,
)


def text_cond(batch: int = 4, length: int = 5, dim: int = 8, pooled: int = 6) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length - 2 :] = False
    return Conditioning(
        tokens=torch.randn(batch, length, dim, generator=g), mask=mask, pooled=torch.randn(batch, pooled, generator=g)
    )


# -- the type --------------------------------------------------------------------------------
def test_batch_size_and_empty() -> None:
    assert Conditioning().batch_size is None and Conditioning().is_empty
    assert text_cond(3).batch_size == 3
    assert label_condition(torch.tensor([1, 2])).batch_size == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), "without tokens"),
        (dict(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 3)), "must be bool"),
        (dict(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool)), r"\(2, 3\), got \(2, 4\)"),
        (dict(tokens=torch.zeros(2, 3, 4), pooled=torch.zeros(3, 5)), "batch size"),
        (dict(labels=torch.zeros(2)), "int64"),
        (dict(tokens=torch.zeros(2, 4)), r"\(B, L, D\).*got shape \(2, 4\)"),
    ],
)
def test_invalid_fields_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Conditioning(**kwargs)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        text_cond().pooled = None  # type: ignore[misc]


def test_to_changes_dtype_of_float_fields_only() -> None:
    c = dataclasses.replace(text_cond(), labels=torch.arange(4))
    d = c.to("cpu", torch.float64)
    assert d.tokens.dtype == d.pooled.dtype == torch.float64
    assert d.mask.dtype == torch.bool and d.labels.dtype == torch.long
    torch.testing.assert_close(d.tokens, c.tokens.double())


def test_select_and_getitem() -> None:
    c = dataclasses.replace(text_cond(4), labels=torch.arange(4))
    one = c[2]
    assert one.batch_size == 1 and one.labels.tolist() == [2]
    assert c[-1].labels.tolist() == [3]
    assert c.select([3, 0]).labels.tolist() == [3, 0]
    assert c.select(torch.tensor([False, True, True, False])).labels.tolist() == [1, 2]
    torch.testing.assert_close(c[1:3].tokens, c.tokens[1:3])
    torch.testing.assert_close(c[1:3].mask, c.mask[1:3])


def test_cat_concatenates_set_fields_and_keeps_none() -> None:
    a, b = text_cond(2), text_cond(3)
    c = Conditioning.cat([a, b])
    assert c.batch_size == 5 and c.labels is None
    torch.testing.assert_close(c.tokens, torch.cat([a.tokens, b.tokens]))
    torch.testing.assert_close(c[2:].pooled, b.pooled)


def test_cat_refuses_mismatched_fields() -> None:
    with pytest.raises(ValueError, match="'pooled'"):
        Conditioning.cat([text_cond(2), dataclasses.replace(text_cond(2), pooled=None)])


def test_generic_dataclass_concatenation_as_a_cfg_wrapper_does() -> None:
    """A generic CFG wrapper cats every dataclass field with torch.cat and keeps None fields None."""
    cond, null = text_cond(2), text_cond(2)
    fields = {
        f.name: None if getattr(cond, f.name) is None else torch.cat([getattr(cond, f.name), getattr(null, f.name)])
        for f in dataclasses.fields(cond)
    }
    both = type(cond)(**fields)
    assert both.batch_size == 4 and both.labels is None


def test_expand_broadcasts_a_single_sample() -> None:
    c = text_cond(1).expand(3)
    assert c.batch_size == 3
    torch.testing.assert_close(c.tokens[2], c.tokens[0])
    with pytest.raises(ValueError, match="batch size 1 to 5, got batch size 2"):
        text_cond(2).expand(5)


# -- labels ----------------------------------------------------------------------------------
def test_label_embedder_reserves_the_null_class() -> None:
    emb = LabelEmbedder(num_classes=10, dim=7)
    assert emb.table.num_embeddings == 11 and emb.null_index == 10
    null = null_label_condition(3, 10)
    assert null.labels.tolist() == [10, 10, 10]
    out = emb(null.labels)
    torch.testing.assert_close(out, emb.table.weight[10].expand(3, 7))


@pytest.mark.parametrize("bad", [-1, 11])
def test_label_embedder_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(RuntimeError, match=rf"\[0, 10\].*{bad}"):
        LabelEmbedder(10, 4)(torch.tensor([0, bad]))


# -- dropout ---------------------------------------------------------------------------------
def test_dropout_p0_keeps_and_p1_replaces_everything() -> None:
    cond, null = text_cond(6), text_cond(1).replace(mask=torch.zeros(1, 5, dtype=torch.bool))
    assert drop_condition(cond, null, 0.0) is cond
    dropped = drop_condition(cond, null, 1.0)
    torch.testing.assert_close(dropped.tokens, null.tokens.expand(6, -1, -1))
    torch.testing.assert_close(dropped.pooled, null.pooled.expand(6, -1))
    assert not dropped.mask.any()


def test_dropout_rate_and_per_sample_consistency() -> None:
    batch, p = 4000, 0.3
    cond = Conditioning(
        tokens=torch.randn(batch, 2, 3), pooled=torch.randn(batch, 4), labels=torch.randint(0, 10, (batch,))
    )
    null = Conditioning(tokens=torch.full((1, 2, 3), 9.0), pooled=torch.full((1, 4), 9.0), labels=torch.tensor([10]))
    out = drop_condition(cond, null, p, torch.Generator().manual_seed(1))
    dropped = out.labels == 10
    # every field of a sample is dropped together, and kept samples are untouched
    assert torch.equal(dropped, (out.tokens == 9.0).all(dim=(1, 2)))
    assert torch.equal(dropped, (out.pooled == 9.0).all(dim=1))
    torch.testing.assert_close(out.tokens[~dropped], cond.tokens[~dropped])
    assert abs(dropped.float().mean().item() - p) < 0.03  # binomial std is 0.007


def test_dropout_is_reproducible_with_a_generator() -> None:
    cond = label_condition(torch.arange(64) % 10)
    null = null_label_condition(1, 10)
    first = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(3))
    second = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first.labels, second.labels)
    assert 0 < (first.labels == 10).sum() < 64


def test_dropout_fills_a_missing_mask_with_real_tokens() -> None:
    cond = Conditioning(tokens=torch.randn(8, 3, 2))
    null = Conditioning(tokens=torch.zeros(1, 3, 2), mask=torch.tensor([[True, False, False]]))
    out = drop_condition(cond, null, 1.0)
    assert out.mask.tolist() == [[True, False, False]] * 8


def test_dropout_refuses_mismatched_null() -> None:
    cond = text_cond(4, length=5)
    with pytest.raises(ValueError, match=r"'tokens' has shape \(4, 7, 8\), expected the condition's \(4, 5, 8\)"):
        drop_condition(cond, text_cond(4, length=7), 0.5)
    with pytest.raises(ValueError, match="'pooled' is set in the condition but None"):
        drop_condition(cond, cond.replace(pooled=None), 0.5)
    with pytest.raises(ValueError, match="batch size 1 or 4"):
        drop_condition(cond, text_cond(2), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\], got 1.5"):
        ConditionDropout(1.5)


def test_dropout_and_guidance_keep_the_control_and_concatenated_latents() -> None:
    """A ControlNet's control and an inpainting mask describe the input, not the prompt: dropping the
    caption leaves them, and guidance's null branch gets the conditional branch's (KEPT_FIELDS)."""
    control, concat = torch.randn(4, 1, 3, 8, 8), torch.randn(4, 5, 2, 2)
    cond = text_cond(4).replace(control=control, concat=concat)
    null = text_cond(1).replace(control=torch.zeros(1, 1, 3, 8, 8))  # a null's own control is not used
    out = drop_condition(cond, null, 1.0)
    torch.testing.assert_close(out.tokens, null.tokens.expand(4, -1, -1))
    assert out.control is control and out.concat is concat
    alone = Conditioning(control=control)  # an unconditional model with a ControlNet: nothing to drop
    assert drop_condition(alone, Conditioning(), 1.0).control is control
    kept = Conditioning().keeping(cond)
    assert kept.control is control and kept.concat is concat and kept.tokens is None
    with pytest.raises(ValueError, match=r"control must have shape \(B, K, C, H, W\)"):
        Conditioning(control=torch.zeros(2, 3, 8, 8))


def test_condition_dropout_object() -> None:
    drop = ConditionDropout(p=1.0)
    out = drop(label_condition(torch.tensor([1, 2])), null_label_condition(1, 5))
    assert out.labels.tolist() == [5, 5]
