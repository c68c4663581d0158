r"""Throughput of the deep MIL training step, evaluation, input pipeline and preprocessing.

    python -m deepmil_jax.benchmark [--scheme=label_assign] [--backbone=caffe] [--json=PATH]
    python -m deepmil_jax.benchmark --quick          # tiny sizes, few repeats (CI smoke test)

Every figure is a median over ``--repeats`` timed repeats after ``--warmup`` untimed steps:

=================================  ==============================================================
``train_images_per_sec``           the jitted train step of ``deepmil_jax.train.Trainer`` (model,
                                   ``train.scheme_loss`` + L2, Adam), fed a fixed batch already
                                   on the devices
``eval_images_per_sec``            the jitted forward pass of the Trainer (``predict``'s step)
``mfu``                            model FLOPs utilisation: ``train_flops_per_step *
                                   train_images_per_sec / batch_size / peak_flops_per_sec``
``pipeline_images_per_sec``        ``data_pipeline.input_pipeline.train_dataset`` alone (random
                                   uint16 images, the paper's augmentation)
``train_from_pipeline_images_      the train step fed from that stream, timed in alternation with
per_sec`` / ``pipeline_overlap``   fixed-batch steps; overlap = stream / fixed (1.0: the step
                                   never waits for data)
``preprocess_images_per_sec``      ``data_pipeline.preprocess.preprocess_file`` on full-size
                                   INbreast-like 16-bit DICOMs (4084 x 3328, written with pydicom
                                   to a temporary folder) by ``--preprocess_workers`` processes
``preprocess_peak_rss_mib``        peak resident memory of one such worker, a fresh interpreter
                                   that imports only ``data_pipeline.preprocess`` (its own
                                   imports included; this process's JAX, TensorFlow and torch not):
                                   ``VmHWM`` of ``/proc/self/status``, else ``getrusage(
                                   RUSAGE_SELF).ru_maxrss`` (``..._total``: sum over workers)
``torch_train_images_per_sec``     the same network, loss and Adam step in PyTorch
                                   (``deepmil_jax.torch_reference``), timed in alternation with
                                   the JAX step (one JAX repeat, one torch repeat, ...), so that
                                   machine load affects both alike; ``train_vs_torch`` =
                                   ``train_images_per_sec / torch_train_images_per_sec``
=================================  ==============================================================

FLOPs come from XLA's cost analysis of the compiled train step
(``jit(step).lower(...).compile().cost_analysis()["flops"]``, per device; times the device
count). XLA counts only the multiply-adds that touch real (not zero-padding) pixels, a few per cent
fewer than the textbook count. Peak FLOP/s per device (``PEAKS``; dense, no sparsity):

==========================  =========================  ===================================
device kind contains        bf16 TFLOP/s               fp32 TFLOP/s
==========================  =========================  ===================================
H200, H100 (SXM)            989.4                      66.9 (CUDA cores, as given by NVIDIA)
H100 PCIe                   756.0                      51.2
A100                        312.0                      19.5
TPU v4                      275                        275 (XLA's default fp32 matmul
TPU v5 lite (v5e)           197                        precision on TPU is one bf16 pass,
TPU v5 / v5p                459                        so the bf16 peak is the ceiling)
TPU v6 lite (v6e)           918
==========================  =========================  ===================================

On GPUs XLA may run fp32 convolutions on TF32 tensor cores (``jax_default_matmul_precision``),
faster than the CUDA-core fp32 peak above, so an fp32 GPU mfu can exceed 1; use bf16 on GPUs.
On a CPU the peak is an ESTIMATE: ``cores x GHz x FLOPs/cycle``, cores = physical cores this
process may use, GHz from ``/proc/cpuinfo`` (the ``@ x.xxGHz`` of the model name, else
``cpu MHz``), FLOPs/cycle per core from its flags: AVX-512 = 2 FMA units x 16 fp32 lanes x 2 = 64
(bf16: 128 with ``avx512_bf16``, 1024 with ``amx_bf16``), AVX2 + FMA = 32, otherwise 8. Turbo
clocks, a single FMA unit or frequency drops under AVX-512 make the real peak differ (in a VM
``cpu MHz`` is often the base clock: one core was measured above 2.3 GHz x 64 FLOP/cycle, so
there the estimate is low and mfu high).

Defaults: batch 32 on CPU and 256 on GPU/TPU; precision fp32 on CPU and bf16 on GPU/TPU (JAX:
``--precision=bf16`` of ``deepmil_jax.train``, bf16 compute with fp32 parameters; PyTorch: bf16
autocast). PyTorch uses ``channels_last`` and ``torch.set_num_threads(cpu count)``, on the GPU
when JAX runs on one and torch sees CUDA.

Load: the machine's load average is recorded with the figures. Other processes slow the two
frameworks unequally: PyTorch's OpenMP threads spin at barriers and lose far more than XLA's
thread pool when a core is taken (on 2 shared cores, torch steps of 40 ms were seen to take
1.5 s), so under load the median ``train_vs_torch`` flatters JAX. ``*_best`` (the fastest repeat
of each) estimates the idle machine; trust figures taken with a load average below the core count.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deepmil_jax import train  # noqa: E402
from deepmil_jax.errors import ConfigError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Peak FLOP/s

# (substring of jax's device_kind, lower case; bf16 TFLOP/s; fp32 TFLOP/s), first match wins.
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 51.2),
    ("h200", 989.4, 66.9),
    ("h100", 989.4, 66.9),
    ("a100", 312.0, 19.5),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6", 918.0, 918.0),
)


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_sec: float  # per device
    source: str  # how it was obtained


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def cpu_peak(precision: str, info: dict[str, str] | None = None, cpus: int | None = None) -> Peak:
    """Estimated peak FLOP/s of the CPUs this process may use: cores x GHz x FLOPs/cycle."""
    info = _cpuinfo() if info is None else info
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    flags_ = set(info.get("flags", "").split())
    siblings, cores = int(info.get("siblings", 0) or 0), int(info.get("cpu cores", 0) or 0)
    threads_per_core = siblings // cores if siblings and cores and siblings >= cores else 1
    physical = max(1, cpus // threads_per_core)
    match = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if match:
        ghz, ghz_from = float(match.group(1)), "model name"
    elif info.get("cpu MHz"):
        ghz, ghz_from = float(info["cpu MHz"]) / 1000.0, "cpu MHz"
    else:
        ghz, ghz_from = 2.0, "assumed"
    if "avx512f" in flags_:
        per_cycle, isa = 64, "AVX-512 (2 FMA x 16 lanes x 2)"
        if precision == "bf16" and "amx_bf16" in flags_:
            per_cycle, isa = 1024, "AMX-BF16"
        elif precision == "bf16" and "avx512_bf16" in flags_:
            per_cycle, isa = 128, "AVX512_BF16"
    elif "avx2" in flags_ and "fma" in flags_:
        per_cycle, isa = 32, "AVX2+FMA (2 FMA x 8 lanes x 2)"
    else:
        per_cycle, isa = 8, "SSE"
    flops = physical * ghz * 1e9 * per_cycle
    return Peak(
        flops,
        f"estimate: {physical} cores x {ghz:.2f} GHz ({ghz_from}) x {per_cycle} "
        f"{precision} FLOPs/cycle ({isa})",
    )


def device_peak(device: jax.Device, precision: str) -> Peak:
    """Peak FLOP/s of one device (``PEAKS``, or the CPU estimate)."""
    if device.platform == "cpu":
        return cpu_peak(precision)
    kind = device.device_kind.lower()
    for key, bf16, fp32 in PEAKS:
        if key in kind:
            tflops = bf16 if precision == "bf16" else fp32
            return Peak(tflops * 1e12, f"table: {device.device_kind} {precision} {tflops} TFLOP/s")
    raise ConfigError(
        f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to "
        "deepmil_jax.benchmark.PEAKS (mfu needs it)"
    )


# ---------------------------------------------------------------------------------------------
# Timing helpers


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _arguments(fn: Callable[..., Any], known: dict[str, Any]) -> list[Any]:
    """The positional arguments of one of Trainer's step functions, by parameter name."""
    names = [n for n in inspect.signature(fn).parameters if n != "self"]
    missing = [n for n in names if n not in known]
    if missing:
        raise RuntimeError(f"the benchmark does not know {fn.__qualname__}'s arguments {missing}")
    return [known[n] for n in names]


def _cost_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if not flops > 0:
        raise RuntimeError("XLA's cost analysis of the train step reported no FLOPs")
    return flops


@dataclasses.dataclass
class Interleaved:
    """Named timed bodies run in turn, repeat after repeat; each body returns images processed."""

    bodies: dict[str, Callable[[], int]]
    rates: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def run(self, repeats: int) -> dict[str, float]:
        for name in self.bodies:
            self.rates.setdefault(name, [])
        for _ in range(repeats):
            for name, body in self.bodies.items():
                start = time.perf_counter()
                images = body()
                self.rates[name].append(images / (time.perf_counter() - start))
        return {name: _median(r) for name, r in self.rates.items()}


# ---------------------------------------------------------------------------------------------
# Synthetic full-size DICOMs for the preprocessing benchmark

INBREAST_SHAPE = (4084, 3328)  # rows x columns of an INbreast mammogram (3328 x 4084 pixels)


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


# Run by each preprocessing worker: a fresh interpreter importing only data_pipeline.preprocess.
_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    from data_pipeline.preprocess import PreprocessConfig, preprocess_file
    paths = json.loads(sys.argv[1]); config = PreprocessConfig(size=(SIZE, SIZE))
    preprocess_file(paths[0], config)  # warm-up (imports, first-call costs)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for p in paths:
        image, _ = preprocess_file(p, config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:  # Linux: the high-water mark of this process image only (see below)
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    print(json.dumps({"images": len(paths), "seconds": seconds, "peak_rss_mib": peak}), flush=True)
""")
# Why VmHWM rather than ru_maxrss alone: on Linux ru_maxrss survives execve, and a child started
# with vfork/fork inherits the parent's high-water mark at exec, so a worker started from this
# (JAX + TensorFlow + PyTorch, over 1 GiB) process would report the parent's peak. VmHWM belongs
# to the new address space and starts from zero at exec.


def benchmark_preprocess(
    *, num_images: int, workers: int, distinct: int, shape: tuple[int, int], size: int
) -> dict[str, float]:
    """preprocess_file throughput of ``workers`` processes started together; their peak RSS."""
    with tempfile.TemporaryDirectory(prefix="deepmil_bench_") as tmp:
        files = []
        for i in range(distinct):
            path = Path(tmp) / f"{i:03d}_bench_MG_{'LR'[i % 2]}_CC_ANON.dcm"
            write_dicom(path, shape, seed=i)
            files.append(str(path))
        jobs = [files[i % len(files)] for i in range(num_images)]
        code = _WORKER.replace("SIZE", str(int(size)))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(jobs[k::workers])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for k in range(workers)
            if jobs[k::workers]
        ]
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                p.wait()
                raise RuntimeError(f"a preprocessing worker failed (exit code {p.returncode})")
        start = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        seconds = time.perf_counter() - start
        for p in procs:
            p.wait()
    peaks = [r["peak_rss_mib"] for r in results]
    return {
        "preprocess_images_per_sec": num_images / seconds,
        "preprocess_peak_rss_mib": max(peaks),
        "preprocess_peak_rss_mib_total": float(sum(peaks)),
        "preprocess_workers": float(len(procs)),
        "preprocess_image_rows": float(shape[0]),
        "preprocess_image_cols": float(shape[1]),
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclasses.dataclass(frozen=True)
class Settings:
    scheme: str = "label_assign"
    backbone: str = "caffe"
    batch_size: int | None = None  # None: 32 on CPU, 256 on accelerators
    image_size: int = 227
    k: float = 6
    precision: str | None = None  # None: fp32 on CPU, bf16 on accelerators
    repeats: int = 10
    steps_per_repeat: int = 1
    warmup: int = 2
    pipeline_images: int = 256  # images held in memory by the pipeline benchmark
    pipeline_batches: int = 8  # batches per timed pipeline repeat
    preprocess_images: int = 40
    preprocess_workers: int | None = None  # None: the CPU count
    preprocess_distinct: int = 4
    preprocess_shape: tuple[int, int] = INBREAST_SHAPE
    head_hidden: tuple[int, ...] = ()
    torch: bool = True
    torch_channels_last: bool = True
    seed: int = 0

    @staticmethod
    def quick() -> Settings:
        """Tiny sizes and few repeats: 131x131 images (a 3x3 grid), batch 4, small DICOMs."""
        return Settings(
            batch_size=4,
            image_size=131,
            k=2,
            repeats=2,
            steps_per_repeat=1,
            warmup=1,
            pipeline_images=16,
            pipeline_batches=2,
            preprocess_images=4,
            preprocess_distinct=2,
            preprocess_shape=(1024, 832),
        )


def _torch_trainer(settings: Settings, config: train.Config, on_accelerator: bool):
    try:
        from deepmil_jax import torch_reference
    except ImportError as e:  # the torch extra is not installed
        logging.warning("PyTorch is not available (%s); no torch comparison", e)
        return None
    import torch

    device = "cuda" if on_accelerator and torch.cuda.is_available() else "cpu"
    if on_accelerator and device == "cpu":
        logging.warning(
            "JAX runs on %s but torch sees no CUDA device; torch runs on the CPU",
            jax.default_backend(),
        )
    return torch_reference.TorchTrainer(
        config.scheme,
        backbone=config.backbone,
        head_hidden=config.head_hidden,
        k=config.top_k,
        mu=config.mu,
        lam=config.lam,
        learning_rate=getattr(config, "lr", None) or config.learning_rate,
        device=device,
        channels_last=settings.torch_channels_last,
        autocast_bf16=config.precision == "bf16",
        seed=config.seed,
    )


def run_benchmark(
    settings: Settings,
    *,
    parts: frozenset[str] = frozenset(
        {"train", "eval", "pipeline", "overlap", "preprocess", "torch"}
    ),
    base_config: train.Config | None = None,
) -> dict[str, Any]:
    """Measures the figures of the module docstring; returns the JSON object.

    Args:
      settings: what to measure and how long.
      parts: which of train (always measured), eval, pipeline, overlap, preprocess, torch.
      base_config: the training configuration to take the remaining fields from (learning rate,
        mu, ...); default ``train.Config()``.
    """
    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu"
    batch = (
        settings.batch_size if settings.batch_size is not None else (256 if on_accelerator else 32)
    )
    precision = settings.precision or ("bf16" if on_accelerator else "fp32")
    config = dataclasses.replace(
        base_config or train.Config(),
        scheme=settings.scheme,
        backbone=settings.backbone,
        batch_size=batch,
        eval_batch_size=batch,
        image_size=settings.image_size,
        k=settings.k,
        precision=precision,
        head_hidden=settings.head_hidden,
        seed=settings.seed,
        init="random",
    )
    config.validate()
    mesh = train.make_mesh()
    n_dev = mesh.devices.size
    if batch % n_dev:
        raise ConfigError(
            f"--batch_size={batch} cannot be split over {n_dev} devices; use a multiple of {n_dev}."
        )
    size = settings.image_size
    result: dict[str, Any] = {
        "backbone": settings.backbone,
        "scheme": settings.scheme,
        "batch_size": batch,
        "device": f"{n_dev} x {device.device_kind} ({device.platform})",
        "precision": precision,
        "image_size": size,
        "load_average_start": os.getloadavg()[0],
        "cpu_count": len(os.sched_getaffinity(0)),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
    }
    rng = np.random.default_rng(settings.seed)
    images = rng.random((batch, size, size, 1), dtype=np.float32)
    labels = (np.arange(batch) % 2).astype(np.int32)
    fixed = {"image": images, "label": labels}

    logging.info(
        "Compiling the %s train step (batch %d, %dx%d, %s)",
        settings.scheme,
        batch,
        size,
        size,
        precision,
    )
    trainer = train.Trainer(config, mesh)
    x, y = trainer.to_global(images), trainer.to_global(labels)
    on_device = {"image": x, "label": y}  # train_step's to_global passes these through
    known = {
        "state": trainer.state,
        "params": trainer.state["params"],
        "rest": getattr(trainer, "rest", None),
        "images": x,
        "labels": y,
        "step": 0,
    }
    step_args = _arguments(trainer._train_step_impl, known)
    flops = _cost_flops(trainer._train_step.lower(*step_args).compile()) * n_dev
    peak = device_peak(device, precision)
    result.update(
        train_flops_per_step=flops,
        peak_flops_per_sec=peak.flops_per_sec * n_dev,
        peak_source=peak.source,
    )

    step = 0

    def jax_steps(n: int) -> int:
        # train.Trainer.train_step on a batch already on the devices, as torch's below (the
        # overlap measurement includes the host-to-device copies).
        nonlocal step
        for _ in range(n):
            out = trainer.train_step(on_device, step)
            step += 1
        jax.block_until_ready(out["loss"])
        return n * batch

    jax_steps(settings.warmup)
    bodies: dict[str, Callable[[], int]] = {"jax": lambda: jax_steps(settings.steps_per_repeat)}

    torch_trainer = _torch_trainer(settings, config, on_accelerator) if "torch" in parts else None
    if torch_trainer is not None:
        import torch

        tx, ty = torch_trainer.to_device(images, labels)

        def torch_steps(n: int) -> int:
            for _ in range(n):
                loss = torch_trainer.step(tx, ty)
            loss.item()
            return n * batch

        torch_steps(settings.warmup)
        bodies["torch"] = lambda: torch_steps(settings.steps_per_repeat)
        result.update(
            torch_version=torch.__version__,
            torch_device=str(torch_trainer.device),
            torch_channels_last=settings.torch_channels_last,
            torch_autocast_bf16=torch_trainer.autocast_bf16,
            torch_threads=torch.get_num_threads(),
        )
    logging.info(
        "Timing the train step%s", " against PyTorch, interleaved" if torch_trainer else ""
    )
    timed = Interleaved(bodies)
    rates = timed.run(settings.repeats)
    result["train_images_per_sec"] = rates["jax"]
    result["mfu"] = flops * rates["jax"] / batch / result["peak_flops_per_sec"]
    # The best repeat estimates the speed on an idle machine (load only ever slows a repeat).
    result["train_images_per_sec_best"] = max(timed.rates["jax"])
    detail: dict[str, Any] = {"train_images_per_sec": timed.rates["jax"]}
    if "torch" in rates:
        result["torch_train_images_per_sec"] = rates["torch"]
        result["train_vs_torch"] = rates["jax"] / rates["torch"]
        result["torch_train_images_per_sec_best"] = max(timed.rates["torch"])
        result["train_vs_torch_best"] = (
            result["train_images_per_sec_best"] / result["torch_train_images_per_sec_best"]
        )
        detail["torch_train_images_per_sec"] = timed.rates["torch"]
        paired = [a / b for a, b in zip(timed.rates["jax"], timed.rates["torch"], strict=True)]
        result["train_vs_torch_paired_median"] = _median(paired)

    if "eval" in parts:
        known["params"] = trainer.state["params"]
        predict_args = _arguments(trainer._predict_impl, known)

        def eval_steps(n: int) -> int:
            for _ in range(n):
                logits = trainer._predict(*predict_args)
            jax.block_until_ready(logits)
            return n * batch

        eval_steps(settings.warmup)
        evals = Interleaved({"eval": lambda: eval_steps(settings.steps_per_repeat)})
        result["eval_images_per_sec"] = evals.run(settings.repeats)["eval"]
        detail["eval_images_per_sec"] = evals.rates["eval"]

    if parts & {"pipeline", "overlap"}:
        from data_pipeline import input_pipeline

        pool = rng.integers(0, 65536, size=(settings.pipeline_images, size, size), dtype=np.uint16)
        pool_labels = (np.arange(settings.pipeline_images) % 2).astype(np.int32)
        stream = input_pipeline.train_dataset(
            pool, pool_labels, batch_size=batch, seed=settings.seed, augment=True
        ).as_numpy_iterator()
        for _ in range(3):  # start the threads, fill the prefetch buffer
            next(stream)

        def pipeline_batches() -> int:
            for _ in range(settings.pipeline_batches):
                next(stream)
            return settings.pipeline_batches * batch

        if "pipeline" in parts:
            logging.info("Timing the input pipeline alone")
            pipe = Interleaved({"pipeline": pipeline_batches})
            result["pipeline_images_per_sec"] = pipe.run(settings.repeats)["pipeline"]
            detail["pipeline_images_per_sec"] = pipe.rates["pipeline"]
        if "overlap" in parts:
            logging.info("Timing train steps fed from the input pipeline vs a fixed batch")

            def streamed_steps(n: int) -> int:
                nonlocal step
                for _ in range(n):
                    out = trainer.train_step(next(stream), step)
                    step += 1
                    float(out["loss"])  # as the training loop does every step
                return n * batch

            def fixed_steps(n: int) -> int:
                nonlocal step
                for _ in range(n):
                    out = trainer.train_step(fixed, step)
                    step += 1
                    float(out["loss"])
                return n * batch

            overlap = Interleaved(
                {
                    "fixed": lambda: fixed_steps(settings.steps_per_repeat),
                    "stream": lambda: streamed_steps(settings.steps_per_repeat),
                }
            )
            o = overlap.run(settings.repeats)
            result["train_from_pipeline_images_per_sec"] = o["stream"]
            result["train_fixed_batch_images_per_sec"] = o["fixed"]
            result["pipeline_overlap"] = o["stream"] / o["fixed"]
            detail["train_from_pipeline_images_per_sec"] = overlap.rates["stream"]
            detail["train_fixed_batch_images_per_sec"] = overlap.rates["fixed"]

    if "preprocess" in parts:
        logging.info(
            "Timing preprocess_file on %d %dx%d 16-bit DICOMs",
            settings.preprocess_images,
            *settings.preprocess_shape,
        )
        result.update(
            benchmark_preprocess(
                num_images=settings.preprocess_images,
                workers=settings.preprocess_workers or len(os.sched_getaffinity(0)),
                distinct=settings.preprocess_distinct,
                shape=settings.preprocess_shape,
                size=size,
            )
        )

    result["load_average_end"] = os.getloadavg()[0]
    result["repeats"] = settings.repeats
    result["steps_per_repeat"] = settings.steps_per_repeat
    result["per_repeat"] = detail
    return result


# ---------------------------------------------------------------------------------------------
# Report

_ROWS = (
    ("train_images_per_sec", "train step (JAX)", "images/s"),
    ("torch_train_images_per_sec", "train step (PyTorch)", "images/s"),
    ("train_vs_torch", "JAX / PyTorch", "x"),
    ("train_vs_torch_best", "JAX / PyTorch, best repeats", "x"),
    ("eval_images_per_sec", "eval forward", "images/s"),
    ("mfu", "model FLOPs utilisation", ""),
    ("train_flops_per_step", "FLOPs per train step", "FLOP"),
    ("peak_flops_per_sec", "peak", "FLOP/s"),
    ("pipeline_images_per_sec", "input pipeline alone", "images/s"),
    ("train_from_pipeline_images_per_sec", "train step fed by pipeline", "images/s"),
    ("pipeline_overlap", "fed by pipeline / fixed batch", "x"),
    ("preprocess_images_per_sec", "preprocess full-size DICOMs", "images/s"),
    ("preprocess_peak_rss_mib", "preprocess peak RSS / worker", "MiB"),
)


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"deepmil-jax benchmark: {result['scheme']}, {result['backbone']} AlexNet, batch "
        f"{result['batch_size']}, {result['image_size']}x{result['image_size']}, "
        f"{result['precision']}, on {result['device']}"
    ]
    for key, name, unit in _ROWS:
        if key in result:
            value = result[key]
            text = f"{value:.3g}" if abs(value) >= 1e4 or key == "mfu" else f"{value:.2f}"
            lines.append(f"  {name:<32} {text:>10} {unit}")
    lines.append(f"  peak: {result['peak_source']}")
    lines.append(
        f"  load average: {result['load_average_start']:.2f} at start, "
        f"{result['load_average_end']:.2f} at end, on {result['cpu_count']} CPUs"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
#
# --scheme, --backbone, --batch_size, --image_size, --k, --precision (and --mu, --head_hidden,
# --learning_rate, --seed, ...) are deepmil_jax.train's own flags, so the benchmark measures the
# step that the same training command would run. Unlike training, an absent --batch_size means
# 32 on CPU and 256 on GPU/TPU, and an absent --precision fp32 on CPU and bf16 on GPU/TPU.

_PARTS = ("train", "eval", "pipeline", "overlap", "preprocess", "torch")
_S = Settings()
for _name in (
    "scheme",
    "backbone",
    "batch_size",
    "image_size",
    "k",
    "precision",
    "head_hidden",
    "seed",
):
    flags.declare_key_flag(_name, flag_values=flags.FLAGS)
flags.DEFINE_string("json", None, "Also write the figures as one JSON object to this file.")
flags.DEFINE_integer("repeats", _S.repeats, "Timed repeats; every figure is the median over them.")
flags.DEFINE_integer("steps_per_repeat", _S.steps_per_repeat, "Train/eval steps per repeat.")
flags.DEFINE_integer("warmup", _S.warmup, "Untimed steps after compilation.")
flags.DEFINE_integer(
    "preprocess_images",
    _S.preprocess_images,
    "Full-size (4084x3328, 16-bit) DICOMs preprocessed in the timed part.",
)
flags.DEFINE_integer(
    "preprocess_workers",
    None,
    "Preprocessing processes, each a fresh interpreter (default: CPU count).",
)
flags.DEFINE_bool(
    "torch",
    True,
    "Time the same step in PyTorch (deepmil_jax.torch_reference), "
    "interleaved with JAX; needs the torch extra.",
)
flags.DEFINE_bool(
    "torch_channels_last", _S.torch_channels_last, "PyTorch in the channels_last memory format."
)
flags.DEFINE_list("parts", list(_PARTS), f"What to measure, a subset of {','.join(_PARTS)}.")
flags.DEFINE_bool(
    "quick",
    False,
    "Smoke test: 131x131 images (3x3 instances), k=2, batch 4, "
    "2 repeats, small DICOMs; the figures mean little.",
)


def settings_from_flags() -> Settings:
    """The benchmark's settings from the command line (``--quick`` changes the defaults)."""
    f = flags.FLAGS
    base = Settings.quick() if f.quick else Settings()
    if f.quick and f.scheme == "alexnet":  # its fully connected layers need the 6x6 map of 227
        base = dataclasses.replace(base, image_size=227)
    overrides: dict[str, Any] = {
        "scheme": f.scheme,
        "backbone": f.backbone,
        "torch_channels_last": f.torch_channels_last,
        "seed": f.seed,
        "head_hidden": train.config_from_flags().head_hidden,
        "torch": f.torch,
    }
    for name in (
        "batch_size",
        "image_size",
        "k",
        "precision",
        "repeats",
        "steps_per_repeat",
        "warmup",
        "preprocess_images",
        "preprocess_workers",
    ):
        if f[name].present:
            overrides[name] = getattr(f, name)
    settings = dataclasses.replace(base, **overrides)
    for name in ("repeats", "steps_per_repeat", "preprocess_images", "image_size", "batch_size"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise ConfigError(f"--{name} must be positive; got {getattr(settings, name)}.")
    if settings.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0; got {settings.warmup}.")
    return settings


def _main() -> None:
    f = flags.FLAGS
    unknown = set(f.parts) - set(_PARTS)
    if unknown:
        raise ConfigError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(_PARTS)}")
    settings = settings_from_flags()
    parts = frozenset(f.parts) - (frozenset() if settings.torch else {"torch"})
    if "torch" in parts:  # on a GPU, leave room for PyTorch (read when JAX's backend starts)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    base = train.config_from_flags()
    result = run_benchmark(settings, parts=parts, base_config=base)
    print(format_table(result))
    if f.json:
        Path(f.json).expanduser().write_text(json.dumps(result, indent=2, default=float) + "\n")
        logging.info("Wrote %s", f.json)


def _show_device_defaults() -> None:
    """--help: an absent --batch_size or --precision is chosen by the device, not train's default.
    (Only when run as a program: importing this module leaves train's flags alone.)"""
    f = flags.FLAGS
    f.set_default("batch_size", None)
    f["batch_size"].help = (
        "Global batch, split over all devices; a multiple of the device count "
        "(absent: 32 on CPU, 256 on GPU/TPU)."
    )
    f.set_default("precision", None)
    f["precision"].help = (
        "bf16: bfloat16 compute with float32 parameters and optimiser state "
        "(absent: fp32 on CPU, bf16 on GPU/TPU)."
    )


if __name__ == "__main__":
    _show_device_defaults()
    train.run_main(_main)
