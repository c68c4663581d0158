r"""Peak FLOP/s of the devices, and XLA's FLOP count of a compiled step: the denominator and the
numerator of the benchmark's model FLOPs utilisation (``mfu``).

FLOPs come from XLA's cost analysis of the compiled train step
(``lower(...).compile().cost_analysis()["flops"]``, per device; times the device count). XLA
counts only the multiply-adds that touch real (not zero-padding) pixels, a few per cent fewer than
the textbook count. Peak FLOP/s per device (``PEAKS``; dense, no sparsity):

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
On a CPU the peak is an ESTIMATE (``cpu_peak``): ``cores x GHz x FLOPs/cycle``, cores = physical
cores this process may use, GHz from ``/proc/cpuinfo`` (the ``@ x.xxGHz`` of the model name, else
``cpu MHz``), FLOPs/cycle per core from its flags: AVX-512 = 2 FMA units x 16 fp32 lanes x 2 = 64
(bf16: 128 with ``avx512_bf16``, 1024 with ``amx_bf16``), AVX2 + FMA = 32, otherwise 8. Turbo
clocks, a single FMA unit or frequency drops under AVX-512 make the real peak differ (in a VM
``cpu MHz`` is often the base clock, so there the estimate can be low and mfu high).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from deepmil_jax.errors import ConfigError

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


def _clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    """(GHz, where it came from): the model name's ``@ x.xxGHz``, else ``cpu MHz``, else 2."""
    match = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if match:
        return float(match.group(1)), "model name"
    if info.get("cpu MHz"):
        return float(info["cpu MHz"]) / 1000.0, "cpu MHz"
    return 2.0, "assumed"


def _flops_per_cycle(cpu_flags: set[str], precision: str) -> tuple[int, str]:
    """(FLOPs per cycle and core, the instruction set it assumes) from /proc/cpuinfo's flags."""
    if "avx512f" in cpu_flags:
        if precision == "bf16" and "amx_bf16" in cpu_flags:
            return 1024, "AMX-BF16"
        if precision == "bf16" and "avx512_bf16" in cpu_flags:
            return 128, "AVX512_BF16"
        return 64, "AVX-512 (2 FMA x 16 lanes x 2)"
    if "avx2" in cpu_flags and "fma" in cpu_flags:
        return 32, "AVX2+FMA (2 FMA x 8 lanes x 2)"
    return 8, "SSE"


def cpu_peak(precision: str, info: dict[str, str] | None = None, cpus: int | None = None) -> Peak:
    """Estimated peak FLOP/s of the CPUs this process may use: cores x GHz x FLOPs/cycle."""
    info = _cpuinfo() if info is None else info
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    siblings, cores = int(info.get("siblings", 0) or 0), int(info.get("cpu cores", 0) or 0)
    threads_per_core = siblings // cores if siblings and cores and siblings >= cores else 1
    physical = max(1, cpus // threads_per_core)
    ghz, ghz_from = _clock_ghz(info)
    per_cycle, isa = _flops_per_cycle(set(info.get("flags", "").split()), precision)
    return Peak(
        physical * ghz * 1e9 * per_cycle,
        f"estimate: {physical} cores x {ghz:.2f} GHz ({ghz_from}) x {per_cycle} "
        f"{precision} FLOPs/cycle ({isa})",
    )


def device_peak(device: Any, precision: str) -> Peak:
    """Peak FLOP/s of one ``jax.Device`` (``PEAKS``, or the CPU estimate)."""
    if device.platform == "cpu":
        return cpu_peak(precision)
    kind = device.device_kind.lower()
    for key, bf16, fp32 in PEAKS:
        if key in kind:
            tflops = bf16 if precision == "bf16" else fp32
            return Peak(tflops * 1e12, f"table: {device.device_kind} {precision} {tflops} TFLOP/s")
    raise ConfigError(
        f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to "
        "deepmil_jax.benchmark.peaks.PEAKS (mfu needs it)"
    )


def cost_flops(compiled: Any) -> float:
    """FLOPs of one run of a compiled XLA program, per device (its cost analysis)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if not flops > 0:
        raise RuntimeError("XLA's cost analysis of the train step reported no FLOPs")
    return flops
