"""pytest plugin for mutation runs (tools/mutation.py): runs first the tests most likely to catch
the mutant, so that mutmut (which runs with ``-x``) stops after as little test time as possible.

Two things decide the order of the tests a mutant calls:

1. the tests that caught earlier mutants of the same function, most catches first: mutmut runs
   a function's mutants one after another, and most of them are caught by the same few tests
   (its unit tests), which are seldom the fastest of the tests that happen to call it. Each
   catch is one line, ``function<TAB>test``, appended to ``mutation-catches.tsv`` in the working
   directory (a line is written in one ``write``, so the parallel mutant runs do not interleave
   lines);
2. then by the durations mutmut recorded when it mapped tests to functions, fastest first.

Outside a mutmut run (no ``mutmut-stats.json`` in the working directory) it changes nothing.
"""

import collections
import json
import os
from pathlib import Path

CATCHES = Path("mutation-catches.tsv")


def _function() -> str | None:
    """The mutated function's mangled name (the mutant's name without its number), or None in
    mutmut's runs without a mutant (the stats and clean runs)."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    return mutant.rsplit("__mutmut_", 1)[0] if "__mutmut_" in mutant else None


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    function = _function()
    caught = collections.Counter()
    if function is not None and CATCHES.is_file():
        for line in CATCHES.read_text().splitlines():
            name, _, test = line.partition("\t")
            if name == function:
                caught[test] += 1
    # a test mutmut has no duration for goes last; sorted() keeps the collection order of ties
    items[:] = sorted(
        items, key=lambda item: (-caught[item.nodeid], seconds.get(item.nodeid, float("inf")))
    )


def pytest_runtest_logreport(report):
    function = _function()
    if function is not None and report.failed:
        fd = os.open(CATCHES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{function}\t{report.nodeid}\n".encode())
        finally:
            os.close(fd)
