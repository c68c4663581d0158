"""One preprocessing worker of the benchmark's preprocess part: a fresh interpreter that imports
only ``data_pipeline.preprocess`` (and the standard library), so that its peak memory is its own.

    python -m deepmil_jax.benchmark.preprocess_worker SIZE '["a.dcm", "b.dcm", ...]'

(``deepmil_jax`` and ``deepmil_jax.benchmark`` import nothing themselves, so ``-m`` loads no JAX.)

Protocol on stdout/stdin: preprocesses the first file once (imports, first-call costs), prints
``ready``, waits for a line on stdin, preprocesses every file, then prints one JSON line:
``{"images", "seconds", "peak_rss_mib"}``.

The peak is ``VmHWM`` of ``/proc/self/status`` where there is one, rather than ``ru_maxrss``: on
Linux ``ru_maxrss`` survives ``execve``, and a child started with vfork/fork inherits its
parent's high-water mark at exec, so a worker started from the benchmark (JAX, TensorFlow and
PyTorch loaded) would report the parent's peak. ``VmHWM`` belongs to the new address space and
starts from zero at exec.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from data_pipeline.preprocess import PreprocessConfig, preprocess_file


def peak_rss_mib() -> float:
    """This process image's peak resident memory in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024.0
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str]) -> None:
    size, paths = int(argv[0]), json.loads(argv[1])
    config = PreprocessConfig(size=(size, size))
    preprocess_file(paths[0], config)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for path in paths:
        preprocess_file(path, config)
    seconds = time.perf_counter() - start
    report = {"images": len(paths), "seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
