"""What the annotators with weights (depth, pose) share: a transformers model and its image processor,
from a hub id or a local directory, frozen, in eval mode, on the CPU (DataLoader workers cannot use
CUDA after a fork), loaded once per process, and named for fingerprints by the sha256 of its weights
and of its processor's settings (caches see a change of weights behind the same name)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from diffusion.frozen import weights_sha256

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_LOADED: dict[tuple[type, str], "PretrainedEstimator"] = {}  # one estimator per kind, model and process

Estimator = TypeVar("Estimator", bound="PretrainedEstimator")


def model_location(model: str, annotator: str, holding: str) -> str:
    """Where transformers loads ``model`` from: a local directory, else a hub id; a path that is no
    directory (and no hub id) is an error naming the ``annotator`` option and what it should hold."""
    local = Path(model).expanduser()
    if not local.is_dir() and (local.exists() or not _HUB_ID.match(model)):
        raise FileNotFoundError(f"{annotator} annotator: model directory {model} does not exist (or is not a "
                                "directory); set data.module.annotator_options.model to a hub id or to a directory "
                                f"holding {holding} and its image processor (save_pretrained)")
    return str(local) if local.is_dir() else model


def process_key(model: str) -> str:
    """The key of a model in a process's table of loaded ones: a directory however written, or the id."""
    local = Path(str(model)).expanduser()
    return str(local.resolve()) if local.is_dir() else str(model)


class PretrainedEstimator:
    """``model``: a hub id or a local directory holding a model of ``model_class`` and its image
    processor (as ``save_pretrained`` writes them). A subclass names the ``annotator``, what the
    directory must hold, and checks the model's config (:meth:`check_config`) before its weights load."""

    annotator: ClassVar[str]  # the annotator option's name, in errors
    holding: ClassVar[str]  # what the directory must hold, e.g. "a depth model"
    model_class: ClassVar[str]  # the transformers class that loads it

    def __init__(self, model: str) -> None:
        import transformers

        self.name = model = str(model)
        where = model_location(model, self.annotator, self.holding)
        try:
            self.config = transformers.AutoConfig.from_pretrained(where)
        except OSError as e:
            raise OSError(f"{self.annotator} annotator: cannot load the model {model!r} ({e}); give a hub id reachable "
                          f"or in the local cache, or a directory holding {self.holding} and its image processor") from e
        self.check_config(model, self.config)
        self.model = getattr(transformers, self.model_class).from_pretrained(where, dtype=torch.float32)
        self.model.requires_grad_(False).eval()
        try:
            self.processor = transformers.AutoImageProcessor.from_pretrained(where)
        except OSError as e:
            raise OSError(f"{self.annotator} annotator: {model!r} has no image processor ({e}); save the model's image "
                          "processor beside it (preprocessor_config.json)") from e
        settings = json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode()
        self.hashes = {"weights_sha256": weights_sha256(self.model),
                       "processor_sha256": hashlib.sha256(settings).hexdigest()}

    def check_config(self, model: str, config: Any) -> None:
        """Refuse a model of another kind, naming it, before its weights are read."""

    @classmethod
    def loaded(cls: type[Estimator], model: str) -> Estimator:
        """The process's estimator of ``model``, loaded at the first call."""
        key = (cls, process_key(model))
        if key not in _LOADED:
            _LOADED[key] = cls(model)
        return _LOADED[key]  # type: ignore[return-value]

    @classmethod
    def identity(cls, model: str) -> dict[str, Any]:
        """What the annotation depends on: the model as given and the sha256 of its weights and processor."""
        return {"model": str(model), **cls.loaded(model).hashes}
