"""The preprocess part: ``data_pipeline.preprocess.preprocess_file`` on synthetic full-size 16-bit
DICOMs by several worker processes (``preprocess_worker``) started together; their peak memory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import logging

from deepmil_jax.benchmark.settings import Setup
from deepmil_jax.benchmark.timing import Figures


def write_dicom(path: Path, shape: tuple[int, int], seed: int) -> None:
    """A 16-bit MONOCHROME2 mammogram-like DICOM: textured half-ellipse breast, dark background,
    a bright label in a corner; the breast faces left or right by seed."""
    from data_pipeline.synthetic import write_dicom as write

    rng = np.random.default_rng(seed)
    h, w = shape
    rows = (np.arange(h, dtype=np.float32)[:, None] - h * rng.uniform(0.4, 0.6)) / (h * 0.45)
    cols = np.arange(w, dtype=np.float32)[None, :] / (w * rng.uniform(0.55, 0.8))
    radius = rows**2 + cols**2
    image = rng.integers(0, 300, size=shape, dtype=np.uint16)
    texture = rng.normal(0, 1500, size=(h // 16 + 1, w // 16 + 1)).astype(np.float32)
    texture = np.repeat(np.repeat(texture, 16, axis=0), 16, axis=1)[:h, :w]
    tissue = np.clip(20000 * (1.2 - radius) + texture, 1000, 60000).astype(np.uint16)
    image = np.where(radius < 1.0, tissue, image)
    image[h // 20 : h // 20 + h // 40, w - w // 8 : w - w // 20] = 65535
    if seed % 2:
        image = np.ascontiguousarray(image[:, ::-1])
    write(path, image, uid_seed=str(seed))


def _start_workers(jobs: list[str], workers: int, size: int) -> list[subprocess.Popen]:
    """``workers`` fresh interpreters running ``preprocess_worker`` on every workers-th job."""
    # Where this checkout's packages live, for a worker started in another folder.
    roots = [str(Path(__file__).resolve().parents[2])]
    data_pipeline = importlib.util.find_spec("data_pipeline").submodule_search_locations[0]
    roots += [str(Path(data_pipeline).parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(r for r in roots if r)))
    command = [sys.executable, "-m", "deepmil_jax.benchmark.preprocess_worker", str(int(size))]
    return [
        subprocess.Popen(
            [*command, json.dumps(jobs[k::workers])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(workers)
        if jobs[k::workers]
    ]


def _run_workers(procs: list[subprocess.Popen]) -> tuple[list[dict], float]:
    """Waits until every worker is warm, lets them go together; (their reports, wall seconds)."""
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            p.wait()
            raise RuntimeError(f"a preprocessing worker failed (exit code {p.returncode})")
    start = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    reports = [json.loads(p.stdout.readline()) for p in procs]
    seconds = time.perf_counter() - start
    for p in procs:
        p.wait()
    return reports, seconds


def time_preprocess(setup: Setup) -> Figures:
    """``preprocess_images_per_sec`` of all workers together; the peak RSS of one and of all."""
    s = setup.settings
    workers = s.preprocess_workers or len(os.sched_getaffinity(0))
    logging.info(
        "Timing preprocess_file on %d %dx%d 16-bit DICOMs", s.preprocess_images, *s.preprocess_shape
    )
    with tempfile.TemporaryDirectory(prefix="deepmil_bench_") as tmp:
        files = []
        for i in range(s.preprocess_distinct):
            path = Path(tmp) / f"{i:03d}_bench_MG_{'LR'[i % 2]}_CC_ANON.dcm"
            write_dicom(path, s.preprocess_shape, seed=i)
            files.append(str(path))
        jobs = [files[i % len(files)] for i in range(s.preprocess_images)]
        procs = _start_workers(jobs, workers, s.image_size)
        reports, seconds = _run_workers(procs)
    peaks = [r["peak_rss_mib"] for r in reports]
    return Figures(
        {
            "preprocess_images_per_sec": s.preprocess_images / seconds,
            "preprocess_peak_rss_mib": max(peaks),
            "preprocess_peak_rss_mib_total": float(sum(peaks)),
            "preprocess_workers": float(len(procs)),
            "preprocess_image_rows": float(s.preprocess_shape[0]),
            "preprocess_image_cols": float(s.preprocess_shape[1]),
        }
    )
