"""The report of an evaluation sweep (``python evaluate.py -m sampler=euler,heun steps=5,10 cfg_scale=1,3``),
the seed document's sampler and CFG grid search: a Hydra callback that keeps each job's metrics
in its job directory and, when the sweep ends, writes one table (``report.csv``, ``report.md``) and
one figure (``report.png``: FID against model evaluations, a panel per sampler, a curve per cfg
scale) in the sweep directory, and logs the table to Weights & Biases when ``wandb_project`` is set.

Jobs write ``<sweep dir>/<job number>/metrics.json``, so a report can be remade from a sweep that
ran on SLURM (``python -m diffusion.evaluation.sweep <sweep dir>``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion.sampling_job import write_json

FIXED = ("sampler", "steps", "cfg_scale", "model_evaluations", "num_samples")


class SweepReport(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN or job_return.status != JobStatus.COMPLETED:
            return
        result = job_return.return_value
        if not isinstance(result, dict) or not result:  # a process other than 0
            return
        out = Path(config.hydra.runtime.output_dir)
        write_json(out / "metrics.json", {"overrides": list(job_return.overrides), **result})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = collect(sweep)
        if not rows:
            print(f"sweep report: no finished job under {sweep}")
            return
        paths = write_report(rows, sweep)
        if config.get("wandb_project"):
            log_to_wandb(rows, paths["figure"], config.wandb_project, sweep)
        print(f"sweep report: {', '.join(str(p) for p in paths.values())}")
        print(paths["markdown"].read_text())


def collect(sweep: Path) -> list[dict[str, Any]]:
    """One row per finished job: its sampler, steps, cfg scale and model evaluations (from the
    sampling job's record), its other overrides, and its metrics."""
    rows = []
    for path in sorted(sweep.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        record = json.loads(path.read_text())
        job = record.get("samples", {}).get("job", {})
        row: dict[str, Any] = {"job": path.parent.name, "sampler": job.get("sampler"), "steps": job.get("steps"),
                               "cfg_scale": job.get("cfg_scale"), "model_evaluations": job.get("model_evaluations"),
                               "num_samples": record.get("num_samples")}
        for override in record.get("overrides", []):
            key, _, value = override.partition("=")
            key = key.lstrip("+~")
            if key not in row and key not in ("ckpt", "samples", "out", "sample_out"):
                row[key] = value
        row.update(record.get("metrics", {}))
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = ["job"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(rows: Sequence[dict[str, Any]], sweep: Path) -> dict[str, Path]:
    columns = _columns(rows)
    with open(sweep / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (sweep / "report.md").write_text("\n".join(lines) + "\n")
    paths = {"csv": sweep / "report.csv", "markdown": sweep / "report.md"}
    metric = fid_column(rows)
    if metric is not None:
        paths["figure"] = plot(rows, metric, sweep / "report.png")
    return paths


def fid_column(rows: Sequence[dict[str, Any]]) -> str | None:
    """The FID column (``fid`` or ``fid@<n>``), else the first Fréchet-distance-like one."""
    names = [c for c in _columns(rows) if c == "fid" or c.startswith("fid@")]
    names = names or [c for c in _columns(rows) if c.startswith("fd") or c.startswith("sfid")]
    return names[0] if names else None


def plot(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """``metric`` against model evaluations per image: a panel per sampler, a curve per cfg scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = sorted({str(r["sampler"]) for r in rows})
    cols = min(3, len(samplers))
    fig, axes = plt.subplots(math.ceil(len(samplers) / cols), cols, figsize=(4.5 * cols, 3.5 * math.ceil(len(samplers) / cols)),
                             squeeze=False, sharey=True)
    for ax, sampler in zip(axes.flat, samplers):
        mine = [r for r in rows if str(r["sampler"]) == sampler and r.get(metric) is not None]
        for scale in sorted({r["cfg_scale"] for r in mine}, key=float):
            points = sorted((float(r["model_evaluations"] or r["steps"]), float(r[metric]))
                            for r in mine if r["cfg_scale"] == scale)
            ax.plot(*zip(*points), marker="o", label=f"cfg {scale:g}" if isinstance(scale, float) else f"cfg {scale}")
        ax.set_title(sampler)
        ax.set_xlabel("model evaluations per image")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(samplers):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(rows: Sequence[dict[str, Any]], figure: Path | None, project: str, sweep: Path) -> None:
    """The table (and figure) as one W&B run of the sweep; offline without credentials, as training's logger."""
    import wandb

    from diffusion.loggers import wandb_has_credentials

    columns = _columns(rows)
    run = wandb.init(project=str(project), name=f"sweep {sweep.name}", job_type="evaluation", dir=str(sweep),
                     mode="online" if wandb_has_credentials() else "offline", reinit=True)
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    run.log({"sweep/report": table, **({"sweep/figure": wandb.Image(str(figure))} if figure else {})})
    run.finish()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m diffusion.evaluation.sweep SWEEP_DIR")
    made = write_report(collect(Path(sys.argv[1])), Path(sys.argv[1]))
    print("\n".join(str(p) for p in made.values()))
