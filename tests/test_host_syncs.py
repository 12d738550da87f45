"""Training steps after the first never make the host wait on the device: no step reads a tensor's
value on the host (tests/host_reads.py counts every such read, with where it came from). On the CPU
these reads cost little, but on an accelerator each one stalls the pipeline until the device has
caught up. First the counter itself, then real training runs, then each part on its own."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffusion import FlowMatching, cli
from diffusion._checks import check_on_device
from diffusion.autoencoders import IdentityAutoencoder
from diffusion.conditioning import LabelEmbedder, TextPrompts
from diffusion.training import finite
from diffusion.training.ema import EMA
from diffusion.training.finite import FiniteLossCheck
from tests.host_reads import CountHostReadsInSteps, HostReads
from tests.make_captioned_folder import make_captioned_folder
from tests.tiny_encoders import no_network, tiny_hf_encoder, tiny_openclip_encoder  # noqa: F401 (fixture)

COUNT = "+callbacks.host_reads._target_=tests.host_reads.CountHostReadsInSteps"


# --- the counter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(), lambda x: bool(x[0] > 0), lambda x: int(x[0]), lambda x: float(x[0]),
    lambda x: 1 if x[0] > 0 else 0, lambda x: x.nonzero(), lambda x: x[x > 0], lambda x: x.unique(),
    lambda x: torch.masked_select(x, x > 0), lambda x: torch.equal(x, x), lambda x: x.tolist(),
    lambda x: x.to("meta"),  # a blocking copy to another device
    lambda x: x.index_put_((x > 0,), torch.tensor([7.0, 8.0])),  # a mask and several values
])
def test_the_counter_sees_each_kind_of_host_read(read):
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as reads:
        read(x)
    assert len(reads.reads) == 1, reads.report()
    assert "test_host_syncs.py" in str(reads.reads[0])  # where it came from


def test_the_counter_leaves_alone_device_work_and_host_tensors():
    x, host = torch.tensor([1.0, -2.0, 3.0]), torch.tensor(4.0)
    with HostReads(host_tensors=[host]) as reads:
        y = torch.where(x > 0, x, 0).sum() * 2
        x[x > 0] = 0.0  # torch makes it a masked_fill_
        x.to("meta", non_blocking=True)
        host.item(), float(y.numpy())  # a named host tensor; numpy only ever reads host memory
    assert reads.reads == [], reads.report()
    assert torch.Tensor.tolist(x) == [0.0, -2.0, 0.0]  # tolist is put back


# --- training: steps 2..N read nothing ------------------------------------------------------------
def _count_host_reads(cfg) -> dict[int, list]:
    cli.train(cfg)
    counted = CountHostReadsInSteps.latest.reads
    assert sorted(counted) == list(range(2, cfg.trainer.max_steps + 1))  # every step after the first
    return counted


def _assert_no_host_reads(counted) -> None:
    reads = {step: r for step, r in counted.items() if r}
    assert not reads, "host reads in training steps:\n" + "\n".join(
        f"step {step}: {len(r)} reads\n" + "\n".join(map(str, r)) for step, r in reads.items())


# The window covers training_step, backward, gradient clipping, the optimiser step, the EMA update and
# the learning-rate schedule; Lightning's progress bar and log flushing come after it (see the README).
QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1000", COUNT]


@pytest.mark.parametrize("overrides", [
    ["backbone=dit_digits"],  # the default run: class-conditional DiT, flow matching, pixel space
    ["backbone=unet_tiny", "schedule=ddpm_v"],  # a UNet; DDPM's table, v, cosine, min-SNR weighting
    ["schedule=ddpm"],  # DDPM eps on its discrete training steps
], ids=["digits_dit", "unet_ddpm_v", "ddpm"])
def test_training_steps_read_nothing_on_the_host(overrides, train_config):
    _assert_no_host_reads(_count_host_reads(train_config(*overrides, *QUIET)))


@pytest.mark.parametrize("cached", [False, True], ids=["encoders_on_the_fly", "from_a_cache"])
def test_latent_text_to_image_steps_read_nothing_on_the_host(cached, train_config, tmp_path):
    """The tiny latent text-to-image setup, with images that have no caption in each batch."""
    root = make_captioned_folder(tmp_path / "images", n=12, sizes=[(48, 48)], layout="csv", uncaptioned=6)
    overrides = ["experiment=t2i_tiny", f"data.module.root={root}", "data.module.batch_size=4", "backbone=dit_tiny",
                 *QUIET]
    if cached:
        overrides.append(f"cache_dir={tmp_path / 'cache'}")
        cli.cache(train_config(*overrides))
    _assert_no_host_reads(_count_host_reads(train_config(*overrides)))


def test_a_read_in_a_step_is_caught_with_where_it_came_from(train_config, monkeypatch):
    """The training test can fail: one host read put into the objective is seen in each step."""
    from diffusion.objective import DiffusionObjective

    original = DiffusionObjective.__call__

    def reading(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        math.isfinite(out.loss)  # float(loss): a host read
        return out

    monkeypatch.setattr(DiffusionObjective, "__call__", reading)
    counted = _count_host_reads(train_config(*QUIET))
    assert all(len(r) == 1 and "in reading" in str(r[0]) for r in counted.values()), counted


# --- the parts, each on its own ------------------------------------------------------------------
def test_check_on_device_raises_at_once_on_the_cpu_without_a_host_read():
    with HostReads() as reads:
        check_on_device(torch.tensor(True), "fine", lambda: "never built")
    assert reads.reads == []
    with pytest.raises(RuntimeError, match=r"^the thing must hold; got 3$"):
        check_on_device(torch.tensor(False), "the thing must hold", lambda: "the thing must hold; got 3")
    with pytest.raises(RuntimeError, match="got 4"):
        check_on_device(torch.tensor(False), "x", lambda: "got 4", read=True)
    with pytest.raises(TypeError, match="boolean scalar"):
        check_on_device(torch.tensor([True, True]), "x", lambda: "x")


def test_schedule_time_check_reads_nothing_after_the_theory_check():
    schedule, t = FlowMatching(), torch.rand(8)
    schedule.at(t)  # the first use checks the theory once, on the host
    with HostReads() as reads:
        schedule.at(t)
    assert reads.reads == [], reads.report()
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1\].*got \[1.5"):
        schedule.at(torch.tensor([0.5, 1.5]))


def test_pixel_range_check_reads_the_first_batch_only():
    ae, images = IdentityAutoencoder(3), torch.rand(2, 3, 4, 4) * 2 - 1
    with HostReads() as first:
        ae.encode(images)
    with HostReads() as later:
        ae.encode(images)
        ae.encode(images.fill_(float("nan")))  # left to the non-finite loss check
    assert len(first.reads) == 1 and later.reads == [], later.report()
    # A later bad batch is still refused, with the values (at once on the CPU).
    expected = r"IdentityAutoencoder.encode expects images in \[-1, 1\], got values in \[0, 255\]"
    with pytest.raises(RuntimeError, match=expected):
        ae.encode(torch.linspace(0, 255, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4))


def test_label_embedder_checks_the_range_without_a_host_read():
    embed, labels = LabelEmbedder(10, 4), torch.tensor([0, 10, 3])
    with HostReads() as reads:
        out = embed(labels)
    assert reads.reads == [], reads.report()
    torch.testing.assert_close(out, embed.table.weight[labels])


def test_ema_update_reads_nothing_and_a_loaded_count_sets_the_decay():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    with HostReads() as reads:
        for _ in range(5):
            ema.update(model)
    assert reads.reads == [], reads.report()
    assert int(ema.num_updates) == 5 and ema.current_decay() == pytest.approx(6 / 15)
    resumed = EMA(model, decay=0.999)
    resumed.load_state_dict(ema.state_dict())  # a resume: the count comes from the checkpoint
    assert resumed.current_decay() == pytest.approx(6 / 15)
    resumed.update(model)
    assert resumed.current_decay() == pytest.approx(7 / 16) and int(resumed.num_updates) == 6


@pytest.mark.parametrize("has_caption", [[True, True, True], [True, False, True]])
def test_text_prompts_null_the_uncaptioned_without_a_host_read(has_caption):
    prompts = TextPrompts(tiny_openclip_encoder())
    encoded = prompts.encoder(["a red circle", "a blue square", "a green triangle"])
    batch = {"tokens": encoded.tokens, "mask": encoded.mask, "pooled": encoded.pooled,
             "has_caption": torch.tensor(has_caption)}
    prompts.null(1, "cpu")  # the empty prompt is encoded once, on first use
    with HostReads() as reads:
        cond = prompts(batch)
    assert reads.reads == [], reads.report()
    null = prompts.encoder.null_condition(1)
    for i, captioned in enumerate(has_caption):
        expected = encoded if captioned else null
        j = i if captioned else 0
        for name in ("tokens", "mask", "pooled"):
            torch.testing.assert_close(getattr(cond, name)[i], getattr(expected, name)[j], msg=f"{name} of sample {i}")


@pytest.mark.parametrize("kind", ["openclip", "hf"])
def test_the_text_encoders_send_their_tokens_without_blocking(kind, tmp_path):
    """A blocking copy to an accelerator waits for the device; the meta device shows the copy on a CPU.
    (transformers' own forward reads mask values, so the HF model is stood in for by one of its outputs.)"""
    if kind == "openclip":
        encoder = tiny_openclip_encoder().to("meta")
    else:
        encoder = tiny_hf_encoder("clip", tmp_path).to("meta")
        width, pooled = encoder.token_dim, encoder.pooled_dim
        encoder.model.forward = lambda input_ids, attention_mask: SimpleNamespace(
            last_hidden_state=torch.zeros(*input_ids.shape, width, device=input_ids.device),
            text_embeds=torch.zeros(input_ids.shape[0], pooled, device=input_ids.device))
    with HostReads() as reads:
        cond = encoder(["a red circle", "a blue square"])
    assert cond.tokens.device.type == "meta" and reads.reads == [], reads.report()


# --- the non-finite loss check -------------------------------------------------------------------
def test_a_non_finite_loss_is_read_two_steps_later_or_before_a_checkpoint():
    check = FiniteLossCheck()
    for step, loss in enumerate([1.0, 2.0, float("nan"), 3.0]):
        check.check()  # the start of a step: reads all but the previous step's loss
        check.record(torch.tensor(loss), step)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2"):
        check.check()  # the start of step 4
    check.record(torch.tensor(float("inf")), 5)
    with pytest.raises(FloatingPointError, match=r"\(inf\) at step 5"):
        check.check(wait_for_all=True)  # before a checkpoint: even the newest
    check.check(wait_for_all=True)  # nothing left


def test_the_loss_check_waits_only_for_the_copies_it_reads(monkeypatch):
    """On an accelerator each loss is copied to the host with an event; a check waits for the events of
    the losses it reads, never for the newest step's, and reads no device tensor."""
    waited = []

    class Event:
        def __init__(self, step):
            self.step = step

        def synchronize(self):
            waited.append(self.step)

    steps = iter(range(100))
    monkeypatch.setattr(finite, "_to_host", lambda loss: (loss.detach().clone(), Event(next(steps))))
    check = FiniteLossCheck()
    with HostReads() as reads:
        for step in range(4):
            check.check()
            check.record(torch.tensor(1.0), step)
        assert waited == [0, 1]  # at the starts of steps 2 and 3
        check.check(wait_for_all=True)
    assert waited == [0, 1, 2, 3] and reads.reads == [], reads.report()


def test_a_non_finite_loss_stops_the_run_two_steps_later_without_a_checkpoint(train_config, tmp_path):
    """NaN images at global step 2 (the third step): the check at the start of global step 4 stops the run."""
    cfg = train_config("trainer.max_steps=10", "trainer.val_check_interval=100",
                       "callbacks.checkpoint.every_n_train_steps=100", COUNT,
                       "+callbacks.poison._target_=tests.conftest.PoisonBatch", "+callbacks.poison.rank=0",
                       "+callbacks.poison.step=2")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2;"):
        cli.train(cfg)
    assert max(CountHostReadsInSteps.latest.reads) == 5  # the fifth step raised
    assert not list(tmp_path.glob("run/checkpoints/*.ckpt"))
