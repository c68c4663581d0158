"""The benchmark's figures as a table for the terminal."""

from __future__ import annotations

from typing import Any

ROWS = (
    ("train_images_per_sec", "train step (JAX)", "images/s"),
    ("torch_train_images_per_sec", "train step (PyTorch)", "images/s"),
    ("train_vs_torch", "JAX / PyTorch", "x"),
    ("train_vs_torch_best", "JAX / PyTorch, best repeats", "x"),
    ("eval_images_per_sec", "eval forward", "images/s"),
    ("mfu", "model FLOPs utilisation", ""),
    ("train_flops_per_step", "FLOPs per train step", "FLOP"),
    ("train_step_memory_mib", "train step memory / device", "MiB"),
    ("peak_flops_per_sec", "peak", "FLOP/s"),
    ("pipeline_images_per_sec", "input pipeline alone", "images/s"),
    ("train_from_pipeline_images_per_sec", "train step fed by pipeline", "images/s"),
    ("pipeline_overlap", "fed by pipeline / fixed batch", "x"),
    ("preprocess_images_per_sec", "preprocess full-size DICOMs", "images/s"),
    ("preprocess_peak_rss_mib", "preprocess peak RSS / worker", "MiB"),
)


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"deepmil-jax benchmark: {result['scheme']}, {result['backbone']} backbone, batch "
        f"{result['batch_size']}, {result['image_size']}x{result['image_size']}, "
        f"{result['precision']}, on {result['device']}"
    ]
    for key, name, unit in ROWS:
        if key in result:
            value = result[key]
            text = f"{value:.3g}" if abs(value) >= 1e4 or key == "mfu" else f"{value:.2f}"
            lines.append(f"  {name:<32} {text:>10} {unit}")
    ratios = result.get("step_time_vs_scheme", {})
    if ratios:
        lines.append(f"  train step time relative to {result['scheme']}'s (--compare):")
        width = max(map(len, ratios))
        lines += [f"    {name:<{width}} {ratio:6.2f}x" for name, ratio in ratios.items()]
    lines.append(f"  peak: {result['peak_source']}")
    lines.append(
        f"  load average: {result['load_average_start']:.2f} at start, "
        f"{result['load_average_end']:.2f} at end, on {result['cpu_count']} CPUs"
    )
    return "\n".join(lines)
