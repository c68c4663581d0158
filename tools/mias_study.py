"""One table over the evaluate runs of the mini-MIAS study (tools/mias_study.sh): every scheme of
every ``<runs>/<study>/`` folder, pooled AUC with its bootstrap interval, instance AUC, and
DeLong's test against the first run found of AlexNet from random weights.

    .venv/bin/python tools/mias_study.py runs/mias

Writes ``<runs>/report.md`` (and .csv, .json) with deepmil_jax.report, as evaluate does, and
prints it. Runs are matched image by image by (fold, file id), so every study must use the same
folds (the same --seed, --num_folds and --split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepmil_jax import evaluate, report

BASELINE = "alexnet_random"  # the study whose first scheme every other run is tested against


def collect(runs: Path) -> dict[str, list[dict]]:
    """``{"<study>.<scheme>": [fold results]}`` of every finished fold under ``runs``, the
    baseline study first."""
    studies = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name != BASELINE)
    results: dict[str, list[dict]] = {}
    for study in studies:
        for scheme_dir in sorted(p for p in study.iterdir() if p.is_dir()):
            folds = sorted(scheme_dir.glob("fold*/results.json"))
            if not folds:
                continue
            name = f"{study.name}.{scheme_dir.name}"
            results[name] = [
                {
                    "fold": int(f.parent.name[4:]),
                    "run_dir": str(f.parent),
                    **json.loads(f.read_text()),
                }
                for f in folds
            ]
    return results


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not Path(argv[1]).is_dir():
        raise SystemExit("usage: tools/mias_study.py RUNS_DIR (the folder of tools/mias_study.sh)")
    runs = Path(argv[1])
    results = collect(runs)
    if not results:
        raise SystemExit(f"error: {runs} holds no finished fold (no */*/fold*/results.json)")
    table = evaluate.summarize(results)
    report.write_report(table, results, runs)
    print((runs / "report.md").read_text())


if __name__ == "__main__":
    main(sys.argv)
