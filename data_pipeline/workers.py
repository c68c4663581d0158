"""Worker processes that die with the process that started them.

A ``ProcessPoolExecutor``'s workers block on their task queue; if the process that owns the pool
is killed (``kill -9``, the out-of-memory killer) nothing ever tells them, so they, the
``forkserver`` they were forked from and the resource tracker would stay for good.
``die_with(pid)`` is the pool's initializer: each worker

* asks Linux to send it SIGKILL when its parent (the forkserver) dies (``prctl(PR_SET_PDEATHSIG)``
  through ctypes), and
* starts a daemon thread that checks every ``POLL_S`` seconds that the pool's owner ``pid`` still
  runs (and that its own parent has not changed); if not, it exits at once. This works on every
  platform and covers the forkserver case, where the worker's parent is not the owner.

Once the workers are gone the forkserver and the resource tracker exit by themselves (their
pipes close). This module imports only the standard library, so workers stay light.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

__all__ = ["POLL_S", "die_with"]

POLL_S = 0.25
_PR_SET_PDEATHSIG = 1


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat) on Linux, None where unknown.

    Tells a process from a later one that reuses its pid. A zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(pid: int, start: str | None) -> bool:
    if start is not None:  # Linux: compare the start time (pid reuse, zombies)
        return _start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the thread below still watches
        pass


def die_with(pid: int) -> None:
    """Initializer of a worker process: exit as soon as process ``pid`` (the pool's owner) or this
    worker's parent is gone. Returns at once; the watching runs in a daemon thread."""
    parent = os.getppid()
    _set_parent_death_signal()
    start = None
    if os.path.exists("/proc/self/stat"):  # Linux
        start = _start_time(pid)
        if start is None:  # the owner is gone already
            os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != parent or not _alive(pid, start):
                os._exit(1)  # no cleanup: the owner that would want results is gone

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
