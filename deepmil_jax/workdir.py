"""The files of a training workdir besides the checkpoints: config.json (the settings, compared
canonically before a run resumes), metrics.jsonl and TensorBoard events, the prediction CSVs and
results.json. Every file is written aside and renamed, so a kill never leaves half a file."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from deepmil_jax import heatmap
from deepmil_jax.config import Config
from deepmil_jax.errors import ConfigError


def read_config(workdir: Path) -> Config:
    """The canonical Config saved in a training workdir's config.json (ConfigError if unusable)."""
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise ConfigError(
            f"{workdir} is not a training workdir (no config.json); give the --workdir of a "
            "python -m deepmil_jax.train run."
        )
    try:
        fields = json.loads(config_file.read_text())
        if not isinstance(fields, dict):
            raise TypeError("not a JSON object")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown settings {', '.join(unknown)}")
        fields["head_hidden"] = tuple(fields.get("head_hidden", ()))
        return Config(**fields).canonical()
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{config_file} cannot be read ({e}); it was not written by this version of "
            "deepmil_jax.train or was edited. Restore it, or retrain in a new --workdir."
        ) from None


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def write_predictions(path: Path, examples, indices, probs, instance_logits) -> None:
    """One row per image: ids, label, probability, the top patch and, for an image with mass
    outlines, the fraction of the top patch inside them (``heatmap.cell_coverage``) and the
    heatmap's intersection over union with them (``heatmap.heatmap_iou``); blank without."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "file_id",
                "patient_id",
                "label",
                "birads",
                "probability",
                "top_patch_row",
                "top_patch_col",
                "top_patch_mass_coverage",
                "mass_iou",
            ]
        )
        for i, p, z in zip(indices, probs, instance_logits, strict=True):
            row, col = heatmap.top_cell(z)
            mask = examples.mass_masks[i]
            truth = ["", ""]
            if mask.any():
                coverage = heatmap.cell_coverage(mask, z.shape)[row, col]
                truth = [f"{coverage:.4f}", f"{heatmap.heatmap_iou(z, mask):.4f}"]
            out.writerow(
                [
                    examples.file_ids[i],
                    examples.patient_ids[i],
                    int(examples.labels[i]),
                    examples.birads[i],
                    f"{p:.6f}",
                    row,
                    col,
                    *truth,
                ]
            )
    tmp.replace(path)


def check_same_run(workdir: Path, config: Config) -> None:
    """Refuses a workdir that holds a run with other settings (only --epochs may grow).

    Settings are compared canonically (paths absolute and normalised). A workdir whose run never
    saved a checkpoint holds nothing to resume and is taken over."""
    if not (workdir / "config.json").exists():
        return
    saved = read_config(workdir).to_json()
    current = config.to_json()
    changed = sorted(k for k in current if k != "epochs" and saved.get(k) != current[k])
    has_run = (workdir / "results.json").exists() or any((workdir / "checkpoints").glob("[0-9]*"))
    if changed and has_run:
        details = ", ".join(f"--{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"{workdir} holds a run with other settings ({details}); re-run with the same flags to "
            "resume it, or give a new --workdir."
        )


def check_epochs(workdir: Path, config: Config, done: int) -> None:
    if done > config.epochs:
        raise ConfigError(
            f"--epochs={config.epochs}: {workdir} has already trained {done} epochs; give "
            f"--epochs={done} or more (more continues training), or a new --workdir."
        )


def rewrite_metrics(workdir: Path, history: list[dict]) -> None:
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(workdir / "metrics.jsonl")


def summary_writer(workdir: Path):
    import tensorflow as tf

    return tf.summary.create_file_writer(str(workdir / "tensorboard"))


def write_summary(writer, record: dict) -> None:
    import tensorflow as tf

    with writer.as_default(step=record["epoch"]):
        for key, value in record.items():
            if key != "epoch" and value is not None:
                tf.summary.scalar(key, value)
    writer.flush()


def finished_config(workdir: Path) -> dict | None:
    """The settings ``results.json`` was made with, or None when the run has not finished
    (ConfigError when the file cannot be read)."""
    path = workdir / "results.json"
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} cannot be read ({e}); delete it to test the run again from its checkpoints."
        ) from None
