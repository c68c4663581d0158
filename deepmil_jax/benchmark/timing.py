"""Timed repeats, run in alternation, and the figures made of them (medians, per-repeat lists)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def interleave(bodies: Mapping[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Runs the named bodies in turn, repeat after repeat (so that machine load affects each
    alike); each body returns the images it processed. Returns images/s per repeat, by name."""
    rates: dict[str, list[float]] = {name: [] for name in bodies}
    for _ in range(repeats):
        for name, body in bodies.items():
            start = time.perf_counter()
            images = body()
            rates[name].append(images / (time.perf_counter() - start))
    return rates


@dataclasses.dataclass
class Figures:
    """The benchmark's figures: ``values`` (the JSON object's top level) and the per-repeat
    rates each median among them was taken from (``per_repeat``)."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_repeat: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_rates(cls, rates: Mapping[str, list[float]]) -> Figures:
        """The median of each list of rates under its name, the lists kept as ``per_repeat``."""
        return cls({name: median(r) for name, r in rates.items()}, dict(rates))

    def update(self, other: Figures) -> None:
        self.values.update(other.values)
        self.per_repeat.update(other.per_repeat)
