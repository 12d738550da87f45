"""The notebooks run top to bottom, the theory notebook prints what its derivation promises, and the
sampling notebook's samplers converge on one checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from diffusion.samplers import SAMPLERS

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
THEORY = NOTEBOOKS / "theory.ipynb"
SAMPLING = NOTEBOOKS / "sampling.ipynb"  # trains a tiny checkpoint with train.py first (CKPT unset)


@pytest.fixture(scope="module")
def execute(tmp_path_factory):
    """``execute(path)`` -> the notebook run top to bottom in a fresh kernel, once per module."""
    done: dict[Path, nbformat.NotebookNode] = {}

    def run(path: Path) -> nbformat.NotebookNode:
        if path not in done:
            notebook = nbformat.read(path, as_version=4)
            workdir = tmp_path_factory.mktemp(path.stem)
            NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
            done[path] = notebook
        return done[path]

    return run


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_executes(path, execute):
    notebook = execute(path)
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def _printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_theory_notebook_prints_the_numbers_of_its_derivation(execute):
    text = _printed(execute(THEORY))
    # The matrices at t = 0.5: flow matching and v-prediction have det 1; eps has det = alpha(0.5),
    # sqrt(abar) at training step 500 of Ho et al.'s linear betas.
    dets = {name: float(d) for name, d in re.findall(r"^\s*(.+?): M\(0\.5\) = .* det = (\S+)$", text, re.M)}
    assert re.search(r"flow matching: M\(0\.5\) = \[\[0\.5, 0\.5\], \[-1\.0, 1\.0\]\]", text)
    alpha = np.sqrt(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:500]))
    assert dets == {"flow matching": 1.0, "DDPM eps": round(alpha, 4), "DDPM v": 1.0}, dets
    # The oracle step lands on the data definition to float64 precision, the new theory too.
    errors = [float(e) for e in re.findall(r"max \|x_s - \(alpha_s x0 \+ sigma_s xT\)\| = (\S+)", text)]
    errors += [float(e) for e in re.findall(r"oracle step error: (\S+)", text)]
    assert len(errors) == 4 and max(errors) < 1e-12, errors
    # Every sampler on the mixture, every theory: the second-order ones beat Euler at 25 steps
    # (measured: euler 0.33-0.36, heun and dpmpp_2m 0.16-0.17).
    header = re.search(r"^\s*theory\s+(.+?)\s+\(", text, re.M).group(1).split()
    rows = {name: dict(zip(header, map(float, values.split())))
            for name, values in re.findall(r"^\s*(flow matching|DDPM eps|DDPM v|trig \(new\))\s+([\d. ]+)$", text, re.M)}
    assert set(rows) == {"flow matching", "DDPM eps", "DDPM v", "trig (new)"} and header == list(SAMPLERS), (header, rows)
    for name, row in rows.items():
        assert max(row.values()) < 0.5, (name, row)
        assert row["heun"] < 0.7 * row["euler"] and row["dpmpp_2m"] < 0.7 * row["euler"], (name, row)
    # EDM: c_skip and c_out read off the inverted matrix are the paper's, and its weight on F is 1.
    skip, out = (float(e) for e in re.search(r"max \|c_skip - paper\| = (\S+), max \|c_out - paper\| = (\S+)", text).groups())
    assert skip < 1e-12 and out < 1e-12
    assert re.search(r"EDM weight on F\s+tensor\(\[1\.0000, 1\.0000, 1\.0000\]", text)
    # EDM and VE at 18 steps on their own grids (measured: euler 0.69 / 0.63, heun 0.26 / 0.23).
    exploding = {name: dict(zip(header, map(float, values.split())))
                 for name, values in re.findall(r"^\s*(EDM|VE)\s+([\d. ]+)$", text, re.M)}
    assert set(exploding) == {"EDM", "VE"}, exploding
    for name, row in exploding.items():
        assert row["heun"] < 0.5 * row["euler"] and row["dpmpp_2m"] < 0.6 * row["euler"], (name, row)
    # Learned variance at 12 steps: beta~ loses variance, beta adds it, the exact one keeps it
    # (measured 0.53 / 0.27, 1.14 / 2.48, 0.99 / 0.99).
    ratios = {name: (float(a), float(b)) for name, a, b in
              re.findall(r"^\s*(.+?): variance / data variance = (\S+), (\S+)$", text, re.M)}
    assert max(ratios["beta~ (v = -1)"]) < 0.7 and min(ratios["beta (v = +1)"]) > 1.08, ratios
    assert all(abs(r - 1) < 0.05 for r in ratios["exact, through v"]), ratios


def test_sampling_notebook_samplers_converge_to_the_ode_solution(execute, monkeypatch):
    """On the tiny checkpoint the notebook trains: the deterministic samplers come closer to Heun at 64
    steps as their steps grow (4 -> 16), DDIM with eta = 0 equals Euler exactly (the same step), and
    the ancestral sampler, with fresh noise every step, stays further off than all of them."""
    monkeypatch.delenv("CKPT", raising=False)
    notebook = execute(SAMPLING)
    figures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 1  # one figure: rows = samplers, columns = steps
    text = _printed(notebook)
    header = re.search(r"^\s*sampler\s+([\d ]+)$", text, re.M).group(1).split()
    rows = {name: dict(zip(header, map(float, values.split())))
            for name, values in re.findall(r"^\s*(euler|heun|dpmpp_2m|ddim|ancestral)\s+([\d. ]+)$", text, re.M)}
    assert header == ["4", "8", "16"] and len(rows) == 5, (header, rows)
    for name in ("euler", "heun", "dpmpp_2m", "ddim"):
        assert rows[name]["16"] < rows[name]["4"], (name, rows[name])
        assert rows["ancestral"]["16"] > rows[name]["16"], rows
    assert rows["euler"] == rows["ddim"], rows
    assert float(re.search(r"max \|euler - ddim\| = (\S+)", text).group(1)) < 1e-6
