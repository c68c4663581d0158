#!/usr/bin/env bash
# The mini-MIAS study of the README ("Real mammograms: mini-MIAS"): patient-grouped 5-fold
# cross-validation of AlexNet from random weights against EfficientNet-Lite0 from ImageNet, then
# one table over all of them (tools/mias_study.py).
# Usage: bash tools/mias_study.sh MIAS_DIR [RUNS_DIR]   (MIAS_DIR: Info.txt and mdbNNN.pgm)
set -euo pipefail
cd "$(dirname "$0")/.."
mias=${1:?give the mini-MIAS folder (Info.txt and the mdbNNN.pgm files)}
runs=${2:-runs/mias}
py=.venv/bin/python
common=(--dataset=mias "--manual_dir=$mias" --num_folds=5 --split=patient)
# 1. today's baseline: AlexNet from random weights (its paper scheme and max pooling)
$py -m deepmil_jax.evaluate "${common[@]}" --schemes=alexnet,max_pooling \
    "--workdir=$runs/alexnet_random"
# 2. EfficientNet-Lite0, frozen ImageNet features, the paper's logistic-regression head
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --freeze_backbone \
    --schemes=max_pooling --epochs=8 "--workdir=$runs/lite0_probe_227"
# 3. EfficientNet-Lite0 fine-tuned, at 227 pixels
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --epochs=5 \
    --schemes=max_pooling,attention,label_assign:k=12,label_assign:k=3,label_assign:k=auto_relative,sparse,gated_attention,learned_lse \
    "--workdir=$runs/lite0_ft_227"
# 4. the same at 512 pixels (a 16x16 grid): fine-tuned, and an attention head on frozen features
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --image_size=512 \
    --epochs=5 --schemes=label_assign:k=auto_relative "--workdir=$runs/lite0_ft_512"
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --image_size=512 \
    --freeze_backbone --epochs=8 --schemes=attention "--workdir=$runs/lite0_frozen_512"
# 5. longer: fine-tuning 25 epochs; frozen heads at a 10x head learning rate
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --epochs=25 \
    --schemes=label_assign:k=auto_relative,max_pooling "--workdir=$runs/lite0_ft_227_e25"
$py -m deepmil_jax.evaluate "${common[@]}" --backbone=efficientnet_lite0 --freeze_backbone \
    --head_learning_rate=1e-2 --epochs=20 --schemes=mean_pooling,max_pooling \
    "--workdir=$runs/lite0_frozen_227_hlr1e-2"
# 6. the same films and trainer, another label: dense tissue (Info.txt's D), which a film shows.
#    A folder CSV of the PGMs, the two breasts of a woman as one patient; its own folder (other
#    folds, another label), so it stays out of the table below.
density="$runs-density"
mkdir -p "$density"
$py - "$mias" "$density/density.csv" <<'PY'
import csv, sys
from pathlib import Path

mias, out = Path(sys.argv[1]).resolve(), sys.argv[2]
tissue = {}
for fields in map(str.split, (mias / "Info.txt").read_text().splitlines()):
    if fields and fields[0].startswith("mdb"):
        tissue.setdefault(fields[0], fields[1])
with open(out, "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["image", "label", "patient"])
    for name, kind in sorted(tissue.items()):
        woman = (int(name[3:]) + 1) // 2
        rows.writerow([mias / f"{name}.pgm", int(kind == "D"), f"woman{woman:03d}"])
PY
$py -m deepmil_jax.evaluate --dataset=folder "--manual_dir=$density/density.csv" \
    --patient_column=patient --num_folds=5 --split=patient --backbone=efficientnet_lite0 \
    --epochs=5 --schemes=mean_pooling "--workdir=$density"
$py tools/mias_study.py "$runs"
