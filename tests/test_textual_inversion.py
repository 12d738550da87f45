"""Textual Inversion (adapter=textual_inversion): a new token in the Hugging Face tokenizer(s), whose
embedding rows alone train (every other weight, the text encoder's own table included, stays bit for
bit); refusals of what cannot work; diffusers' load_textual_inversion reads our learned_embeds files
and its pipelines then encode our placeholder prompts as we do; from the command line on tiny SD 1.5
parts, with resume, export and sampling. Nothing is downloaded: tiny random models stand in."""

from __future__ import annotations

import csv
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion import cli
from diffusion.backbones import DiffusersUNet
from diffusion.conditioning import ClassLabels, TextPrompts
from diffusion.encoders import HFTextEncoder, JointTextEncoder
from diffusion.frozen import weights_sha256
from diffusion.schedules import DDPM
from diffusion.textual_inversion import (
    TextualInversion,
    expand_placeholder,
    placeholder_tokens,
    save_learned_embeds,
)
from diffusion.training.module import DiffusionModule
from tests.conftest import FAST, compose_config
from tests.make_captioned_folder import make_captioned_folder
from tests.tiny_encoders import (  # noqa: F401 - no_network: any connection fails the test
    TINY_SD_UNET,
    TINY_VAE_CONFIGS,
    no_network,
    save_tiny_hf,
    save_tiny_sd_unet,
    tiny_openclip_encoder,
)

# training_step outside a Trainer logs its loss to nowhere, and Lightning says so.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOKEN = "<cat-toy>"
WIDTH = TINY_SD_UNET["cross_attention_dim"]


def _clip(root: Path, max_length: int = 16, seed: int = 0, kind: str = "clip_text", **kwargs) -> HFTextEncoder:
    """SD 1.5's text encoder as finetune_sd15 reads it (no mask, no pooled vector), tiny."""
    directory = root / f"{kind}-{seed}"
    if not (directory / "config.json").exists():
        save_tiny_hf(kind, directory, seed=seed)
    return HFTextEncoder(str(directory), max_length=max_length, **{"pooling": "none", "attention_mask": False, **kwargs})


def _unet(seed: int = 0, width: int = WIDTH) -> DiffusersUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusersUNet(config={**TINY_SD_UNET, "cross_attention_dim": width}, in_channels=4,
                             token_dim=width).eval()


def _module(encoder, adapter: TextualInversion, width: int = WIDTH) -> DiffusionModule:
    return DiffusionModule(_unet(width=width), DDPM("scaled_linear", "eps"), conditioner=TextPrompts(encoder),
                           adapter=adapter, cond_dropout=0.0)


def _train_steps(module: DiffusionModule, captions: list[str], steps: int = 3) -> None:
    optimizer = module.configure_optimizers()["optimizer"]
    latents = torch.randn(len(captions), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        module.training_step({"caption": captions, "latent": latents}, i).backward()
        optimizer.step()
        optimizer.zero_grad()


# --- what trains ---------------------------------------------------------------------------------
def test_placeholders_expand_as_diffusers_names_them():
    assert placeholder_tokens(TOKEN, 3) == [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    assert expand_placeholder(f"a {TOKEN} and a {TOKEN}", TOKEN, 2) == f"a {TOKEN} {TOKEN}_1 and a {TOKEN} {TOKEN}_1"
    assert expand_placeholder(f"a {TOKEN}_1", TOKEN, 2) == f"a {TOKEN}_1"  # another token, named explicitly
    assert expand_placeholder(f"a {TOKEN}", TOKEN, 1) == f"a {TOKEN}"


def test_only_the_new_rows_train_from_the_initializer_row(tmp_path):
    encoder, base = _clip(tmp_path), _clip(tmp_path)  # base: the same weights, no new token
    table = encoder.model.get_input_embeddings().weight
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    adapter = TextualInversion(TOKEN, "cat", num_vectors=2, weight_decay=0.01)
    module = _module(encoder, adapter)
    rows = module.conditioner.textual_inversion.rows["encoder"]
    cat = encoder.tokenizer.convert_tokens_to_ids("cat")
    assert rows.shape == (2, WIDTH) and torch.equal(rows.detach(), table[cat].expand(2, -1))
    assert len(encoder.tokenizer) == len(base.tokenizer) + 2 and table.shape[0] == len(base.tokenizer)  # no resize
    # The frozen encoder is the base's, to its hash; its table is not resized.
    assert module.frozen_weights()["conditioner.encoder"] == weights_sha256(base)
    optimizer = module.configure_optimizers()["optimizer"]
    trained = [(p, g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]]
    assert len(trained) == 1 and trained[0][0] is rows and trained[0][1] == 0.01
    backbone = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    start = rows.detach().clone()

    _train_steps(module, [f"a photo of a {TOKEN}", "a red cat"])
    assert all(not torch.equal(rows[i], start[i]) for i in range(2))  # both vectors moved
    after = encoder.state_dict()
    assert after.keys() == initial.keys() and all(torch.equal(after[k], initial[k]) for k in initial)
    assert all(torch.equal(v, backbone[k]) for k, v in module.backbone.state_dict().items())
    assert module.frozen_weights()["conditioner.encoder"] == weights_sha256(base)
    # Prompts without the placeholder encode as the base does; a checkpoint holds the rows and no base weight.
    with torch.no_grad():
        assert torch.equal(encoder(["a red cat on the sea"]).tokens, base(["a red cat on the sea"]).tokens)
    assert set(module.state_dict()) == {"conditioner.textual_inversion.rows.encoder", "ema.num_updates"}


def test_the_rows_of_every_encoder_of_a_composite_train(tmp_path):
    """SD3 / FLUX's JointTextEncoder: CLIP and T5 each get their rows, and both receive gradients."""
    clip, t5 = _clip(tmp_path), _clip(tmp_path, kind="t5")
    joint = JointTextEncoder({"clip": clip, "t5": t5}, tokens=[["clip"], ["t5"]])
    module = _module(joint, TextualInversion(TOKEN, "dog"))
    rows = module.conditioner.textual_inversion.rows
    assert set(rows) == {"encoders__clip", "encoders__t5"}
    start = {k: v.detach().clone() for k, v in rows.items()}
    _train_steps(module, [f"a {TOKEN} on the sea"], steps=2)
    assert all(not torch.equal(rows[k], start[k]) for k in rows)


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(placeholder_token="cat", initializer_token="dog"), r"already has 1 of the tokens \['cat'\]"),
    (dict(placeholder_token=TOKEN, initializer_token="big car"), r"'big car' is 2 tokens.*exactly one"),
    (dict(placeholder_token=TOKEN, initializer_token="zebra"), r"'zebra' is unknown"),
])
def test_what_a_tokenizer_cannot_do_is_refused(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _module(_clip(tmp_path), TextualInversion(**kwargs))


@pytest.mark.parametrize("kwargs,match", [
    (dict(placeholder_token="<a b>", initializer_token="toy"), "one word without spaces"),
    (dict(placeholder_token=TOKEN, initializer_token=""), "initializer_token"),
    (dict(placeholder_token=TOKEN, initializer_token="toy", num_vectors=0), "num_vectors=0"),
    (dict(placeholder_token=TOKEN, initializer_token="toy", weight_decay=-1.0), "weight_decay"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextualInversion(**kwargs)


def test_encoders_without_a_tokenizer_that_adds_tokens_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"SimpleTokenizer.*fixed BPE vocabulary.*HFTextEncoder.*stable-diffusion-2-1"):
        _module(tiny_openclip_encoder(max_length=16), TextualInversion(TOKEN, "cat"))
    with pytest.raises(ValueError, match="needs conditioning=text"):
        DiffusionModule(_unet(), DDPM("scaled_linear", "eps"), conditioner=ClassLabels(3),
                        adapter=TextualInversion(TOKEN, "cat"))
    encoder = _clip(tmp_path)
    _module(encoder, TextualInversion(TOKEN, "cat", num_vectors=2))
    with pytest.raises(ValueError, match=r"already has 2 of the tokens"):  # a second attach to the same tokenizer
        _module(encoder, TextualInversion(TOKEN, "cat", num_vectors=2))


def test_caching_the_text_embeddings_is_refused(tmp_path):
    module = _module(_clip(tmp_path), TextualInversion(TOKEN, "cat"))
    with pytest.raises(ValueError, match=r"cache_dir=.*adapter=textual_inversion trains.*cannot be read from a cache"):
        cli.check_adapter_cacheable(OmegaConf.create({"cache_dir": str(tmp_path / "cache")}), module)
    cli.check_adapter_cacheable(OmegaConf.create({"cache_dir": None}), module)  # no cache: fine


# --- diffusers reads our files -------------------------------------------------------------------
def _randomise(adapter: TextualInversion, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.rows.rows.values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_a_stable_diffusion_pipeline_loads_our_file_and_encodes_our_tokens(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPTextModel

    encoder = _clip(tmp_path, max_length=64)  # the tiny tokenizer's model_max_length, which the pipeline pads to
    adapter = TextualInversion(TOKEN, "cat", num_vectors=2)
    module = _module(encoder, adapter)
    _randomise(adapter)
    (file,) = save_learned_embeds(adapter, tmp_path / "out")
    stored = load_file(file)
    assert file.name == "learned_embeds.safetensors" and set(stored) == {TOKEN}
    assert torch.equal(stored[TOKEN], module.conditioner.textual_inversion.rows["encoder"].detach())

    directory = tmp_path / "clip_text-0"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIGS["sd"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(directory), tokenizer=AutoTokenizer.from_pretrained(directory),
        unet=_unet().unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    prompts = [f"a photo of a {TOKEN}", f"a {TOKEN} on the sea", "a red cat"]
    with torch.no_grad():
        before, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        pipe.load_textual_inversion(file, token=TOKEN)
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        ours = encoder(prompts).tokens
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(before[:2], theirs[:2], atol=1e-3)  # the file changed the placeholder prompts
    torch.testing.assert_close(before[2], theirs[2], rtol=0, atol=0)  # and no other


def test_an_sdxl_pipeline_loads_the_rows_of_both_encoders(tmp_path):
    from tests.test_sdxl import _pipeline, _save_pipeline_encoders, _sdxl_encoder, tiny_sdxl_unet

    root = _save_pipeline_encoders(tmp_path / "sdxl")
    encoder = _sdxl_encoder(root, max_length=64)
    adapter = TextualInversion(TOKEN, "cat")
    module = _module(encoder, adapter, width=64)
    assert set(module.conditioner.textual_inversion.rows) == {"encoders__clip_l", "encoders__clip_g"}
    _randomise(adapter)
    first, second = save_learned_embeds(adapter, tmp_path / "out")
    assert (first.name, second.name) == ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    pipe = _pipeline(tiny_sdxl_unet(), root)
    pipe.load_textual_inversion(first, token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(second, token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompts = [f"a photo of a {TOKEN}", "a red cat"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ours = encoder(prompts)
    torch.testing.assert_close(ours.tokens, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)


# --- from the command line, on tiny SD 1.5 parts ------------------------------------------------
@pytest.fixture(scope="module")
def ti_runs(tmp_path_factory):
    """experiment=textual_inversion_sd15 on a tiny saved UNet, CLIP and VAE: 2 steps straight, and resumed
    from its step-1 checkpoint; captions name the concept by the placeholder. The VAE's posterior mode,
    not a draw: KLAutoencoder.encode draws from the global RNG, which a resumed run does not replay."""
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("ti")
    save_tiny_sd_unet(root / "unet", seed=1)
    clip = save_tiny_hf("clip_text", root / "clip")
    images = make_captioned_folder(root / "images", n=4, sizes=[(64, 64)], layout="csv")
    with (images / "metadata.csv").open() as f:
        rows = list(csv.reader(f))
    with (images / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *[(name, f"a photo of a {TOKEN} {text}") for name, text in rows[1:]]])
    fast = [o for o in FAST if not o.startswith(("backbone", "data.module.batch_size", "trainer.max_steps",
                                                 "callbacks.checkpoint", "trainer.val_check"))]
    overrides = [
        *fast, "experiment=textual_inversion_sd15", f"adapter.placeholder_token='{TOKEN}'",
        "adapter.initializer_token=cat", "adapter.num_vectors=2", "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=1", "trainer.val_check_interval=2",
        f"backbone.pretrained={root / 'unet'}", "vae=tiny_sd", f"text_encoder.pretrained={clip}",
        "text_encoder.max_length=16", f"data.module.root={images}", "data.module.resolution=64",
        "data.module.batch_size=2", "data.module.num_workers=0", "model.optim.optimizer.lr=1e-1",
        "model.sampling.num_images=2", "model.sampling.steps=2",  # posterior draws too (keyed per sample)
    ]
    cli.train(compose_config("train", overrides, root / "straight"))
    # A copy of the run as if stopped after step 1 (its checkpoint of step 1 alone), then resumed.
    shutil.copytree(root / "straight", root / "resumed")
    for path in (root / "resumed" / "checkpoints").glob("*.ckpt"):
        if path.name != "step_0000001.ckpt":
            path.unlink()
    (root / "resumed" / "learned_embeds.safetensors").unlink()
    cli.train(compose_config("train", [*overrides, "ckpt_path=last"], root / "resumed"))
    GlobalHydra.instance().clear()
    return root, clip, overrides


def _rows(path: Path) -> torch.Tensor:
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 2
    return checkpoint["state_dict"]["conditioner.textual_inversion.rows.encoder"]


def test_the_command_line_run_trains_and_saves_only_the_rows(ti_runs):
    from safetensors.torch import load_file

    root, clip, _ = ti_runs
    run = root / "straight"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"conditioner.textual_inversion.rows.encoder", "ema.num_updates"}
    assert checkpoint["adapter"]["name"] == "textual_inversion"
    base = HFTextEncoder(str(clip), max_length=16, pooling="none", attention_mask=False)
    assert checkpoint["frozen_weights"]["conditioner.encoder"] == weights_sha256(base)  # the base CLIP's
    rows = _rows(run / "checkpoints" / "last.ckpt")
    cat = base.model.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("cat")]
    assert rows.shape == (2, WIDTH) and all(not torch.equal(r, cat) for r in rows)  # moved from the initializer
    written = load_file(run / "learned_embeds.safetensors")  # at the end of training
    assert set(written) == {TOKEN} and torch.equal(written[TOKEN], rows)


def test_a_run_resumes_with_its_rows(ti_runs):
    root, _, _ = ti_runs
    resumed = root / "resumed" / "checkpoints" / "last.ckpt"
    assert (root / "resumed" / ".hydra" / "resumed" / "step_0000001" / "resume.yaml").is_file()  # not restarted
    torch.testing.assert_close(_rows(resumed), _rows(root / "straight" / "checkpoints" / "last.ckpt"),
                               rtol=1e-6, atol=1e-7)
    model = cli.load_module(resumed)  # the tokens are added again, the rows restored exactly
    assert torch.equal(model.conditioner.textual_inversion.rows["encoder"].detach(), _rows(resumed))


def test_export_writes_learned_embeds_and_the_placeholder_samples(ti_runs, tmp_path):
    from safetensors.torch import load_file

    root, _, _ = ti_runs
    ckpt = root / "straight" / "checkpoints" / "last.ckpt"
    out = cli.export(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path / 'export'}"], tmp_path))
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], _rows(ckpt))
    model = cli.load_module(ckpt)
    prompts = [f"a photo of a {TOKEN}", "a photo of a cat cat"]  # the placeholder, and its initializer's words
    with torch.no_grad():
        conds = model.conditioner.make(prompts, 2, model.device)
    assert not torch.allclose(conds.tokens[0], conds.tokens[1], atol=1e-4)  # the trained rows are read
    images = model.sample(2, prompts, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    npz = cli.sample(compose_config("sample", [f"ckpt={ckpt}", "num=2", "batch_size=2", "steps=2",
                                               f"prompts=['a {TOKEN} on the sea']", f"out={tmp_path / 's'}",
                                               "progress=false", "device=cpu"], tmp_path))
    assert npz.is_file()


def test_a_cache_of_the_text_embeddings_is_refused_from_the_command_line(ti_runs, tmp_path):
    _, _, overrides = ti_runs
    cfg = compose_config("train", [*overrides, f"cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    with pytest.raises(ValueError, match="cannot be read from a cache"):
        cli.cache(cfg)


# --- the configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment,parent", [("textual_inversion_sd15", "finetune_sd15"),
                                               ("textual_inversion_sdxl", "finetune_sdxl")])
def test_the_recipes_are_their_fine_tunes_with_the_adapter(experiment, parent, tmp_path):
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    base = compose_config("train", [f"experiment={parent}"], tmp_path)
    assert cfg.backbone == base.backbone and cfg.text_encoder == base.text_encoder and cfg.vae == base.vae
    assert cfg.adapter._target_ == "diffusion.textual_inversion.TextualInversion"
    assert cfg.model.optim.optimizer.lr == 2e-3 and cfg.model.optim.decay == "constant"
    with pytest.raises(MissingMandatoryValue, match="adapter.placeholder_token"):  # it must be given
        instantiate(cfg.adapter)
    given = compose_config("train", [f"experiment={experiment}", f"adapter.placeholder_token='{TOKEN}'",
                                     "adapter.initializer_token=toy"], tmp_path)
    assert given.model.sampling.prompts[0] == f"a photo of a {TOKEN}"
    assert instantiate(given.adapter).tokens == [TOKEN]
