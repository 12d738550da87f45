"""Bad input stops with a message that names the thing and what to do, never a silent fallback:
unknown options of any group, missing folders, a dataset without the labels the conditioning needs,
files that are not checkpoints, conditions the model does not take, and impossible values."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException

from diffusion import cli
from tests.conftest import CONF, FAST, compose_config, run_script
from tests.make_captioned_folder import make_captioned_folder


def _groups(config: str) -> list[str]:
    groups = {"train": ["schedule", "backbone", "adapter", "sampler", "conditioning", "text_encoder", "image_condition", "data", "vae", "trainer",
                        "logger", "callbacks", "experiment"], "sample": ["sampler"]}
    return groups[config]


@pytest.mark.parametrize("config,group", [(c, g) for c in ("train", "sample") for g in _groups(c)])
def test_an_unknown_option_of_any_group_fails_and_lists_the_options(config, group):
    options = sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        with pytest.raises(MissingConfigException) as error:
            compose(config_name=config, overrides=[f"{group}=nope"])
    message = str(error.value)
    assert f"Could not find '{group}/nope'" in message
    assert all(option in message for option in options), message


def test_sample_script_with_an_unknown_sampler_fails_instead_of_using_euler(tmp_path):
    result = run_script("sample.py", "sampler=nope", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'sampler/nope'" in result.stderr and "dpmpp_2m" in result.stderr


def test_a_missing_image_folder_is_named(train_config, tmp_path):
    with pytest.raises(Exception, match=r"image folder /nonexistent does not exist; set data.module.root"):
        cli.train(train_config("data=image_folder", "data.module.root=/nonexistent"))
    assert not (tmp_path / "run").exists()


def test_labels_on_a_caption_folder_say_that_they_need_a_class_labelled_dataset(train_config, tmp_path):
    root = make_captioned_folder(tmp_path / "images", n=4)
    with pytest.raises(Exception, match=r"conditioning=labels needs a class-labelled dataset.*conditioning=text"):
        cli.train(train_config("data=image_folder", f"data.module.root={root}"))


def test_a_decaying_rate_without_max_steps_is_refused(train_config, tmp_path):
    epochs = ["trainer.max_steps=-1", "+trainer.max_epochs=1", "+trainer.limit_train_batches=2",
              "trainer.val_check_interval=2"]
    with pytest.raises(ValueError, match=r"model.optim.decay='cosine'.*needs trainer.max_steps > 0 \(got -1\)"):
        cli.train(train_config(*epochs))
    cli.train(train_config(*epochs, "model.optim.decay=constant", run_dir=tmp_path / "constant"))  # by epochs: fine


def test_a_bad_learning_rate_schedule_is_refused_before_the_run_directory_is_made(train_config, tmp_path):
    with pytest.raises(Exception, match=r"model.optim.decay='cosinee' is not supported; allowed values: 'constant'"):
        cli.train(train_config("model.optim.decay=cosinee"))
    with pytest.raises(Exception, match=r"model.optim.min_lr_ratio <= 1, got 200 and 2.0"):
        cli.train(train_config("model.optim.warmup_steps=200", "model.optim.min_lr_ratio=2.0"))
    assert not (tmp_path / "run").exists()


@pytest.fixture
def trained(train_config, tmp_path) -> Path:
    cli.train(train_config())
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def _sample(tmp_path, *overrides):
    return cli.sample(compose_config("sample", [*overrides, "progress=false", f"out={tmp_path / 'out.png'}"], tmp_path))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.ckpt is not a checkpoint of this project.*written by train.py"):
        _sample(tmp_path, f"ckpt={text}")
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")  # a torch file of another program
    with pytest.raises(ValueError, match=r"other.ckpt is not a checkpoint of this project: it carries no state_dict"):
        _sample(tmp_path, f"ckpt={tmp_path / 'other.ckpt'}")


def test_prompts_for_a_class_label_model_say_it_takes_labels(trained, tmp_path):
    with pytest.raises(ValueError, match=r"conditioned on class labels 0..9, so prompts= does not apply; sample it with labels="):
        _sample(tmp_path, f"ckpt={trained}", "prompts=[hello]", "num=2", "steps=2")
    model = cli.load_module(trained)
    with pytest.raises(ValueError, match="conditioned on class labels 0..9, not prompts"):
        model.sample(2, ["hello", "world"], steps=2)


def test_num_below_one_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"num=0: the number of images to sample must be an integer >= 1"):
        _sample(tmp_path, "num=0", f"ckpt={tmp_path / 'never_read.ckpt'}")


def test_unconditional_models_refuse_labels(train_config, tmp_path):
    cli.train(train_config("conditioning=none"))
    with pytest.raises(ValueError, match=r"conditioned on nothing \(unconditional\), so labels= does not apply"):
        _sample(tmp_path, f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "labels=[1]", "num=2", "steps=2")


def test_train_script_errors_reach_the_user(tmp_path):
    result = run_script("train.py", *FAST, "data=image_folder", "data.module.root=/nonexistent", cwd=tmp_path)
    assert result.returncode != 0 and "image folder /nonexistent does not exist" in result.stderr
