"""The notebooks run from top to bottom (so they never go stale) and are stored without outputs."""

import csv
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# trains for epochs, spawns or kills processes: not in `pytest -m "not slow"`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart.ipynb", "inbreast.ipynb")


def test_committed_notebooks_have_no_outputs():
    found = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert set(NOTEBOOKS) <= set(found)
    for name in found:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name} cell {i} has outputs; strip them"
                assert cell.execution_count is None, f"{name} cell {i} has an execution count"


def _execute(name: str, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    """Runs a notebook in ``cwd`` (where its files go) with the kernel of this interpreter
    (ipykernel's ``python3`` spec), importing the package from this working tree."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
            out.append(str(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    assert "top patch on the square for" in text
    # The trained run and the heatmaps of three test images were written in the working folder.
    assert (tmp_path / "runs" / "quickstart" / "results.json").is_file()
    with (tmp_path / "predictions" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all((tmp_path / "predictions" / r["heatmap"]).is_file() for r in rows)
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)


def test_inbreast_runs_on_the_synthetic_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("INBREAST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    nb = _execute("inbreast.ipynb", tmp_path, monkeypatch)
    report = (tmp_path / "runs" / "inbreast_cv" / "report.md").read_text()
    for method in ("max pooling", "label assignment", "sparse"):
        assert method in report
    assert "Pointing game" in report
    assert "Pointing game" in _text(nb)  # the table is displayed
    assert len(list((tmp_path / "heatmaps" / "heatmaps").glob("*.png"))) >= 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_use_the_public_api_only(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code
    # Private helpers (leading underscore) of the project are not used.
    for module in ("train", "evaluate", "predict", "heatmap", "dm"):
        assert f"{module}._" not in code
