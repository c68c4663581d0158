"""A few train steps on fixed data, for the device-count and multi-process equality tests.

    python tests/dist_worker.py OUT.npz --devices=4 [--process_id=0 --num_processes=2 --port=N]

Forces ``--devices`` CPU devices in this process, runs three steps of the label-assignment train
step on one fixed global batch of 8 (each process feeding its own slice), and writes the final
parameters (process 0) to OUT.npz.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

from deepmil_jax import config as config_module  # noqa: E402
from deepmil_jax import steps  # noqa: E402

config = config_module.Config(scheme="label_assign", k=2, image_size=99, batch_size=8, seed=3)
trainer = steps.Trainer(config, steps.make_mesh())
rng = np.random.default_rng(0)
images = rng.random((8, 99, 99, 1), dtype=np.float32)
labels = np.array([1, 0, 0, 1, 0, 1, 0, 0], np.int32)
share = 8 // args.num_processes
mine = slice(args.process_id * share, (args.process_id + 1) * share)
for step in range(3):
    out = trainer.train_step({"image": images[mine], "label": labels[mine]}, step)
loss = float(out["loss"])
if args.process_id == 0:
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.state["params"])
    }
    np.savez(args.out, loss=loss, devices=jax.device_count(), **flat)
print("ok", jax.device_count(), loss, file=sys.stderr)
