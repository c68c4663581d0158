"""pytest plugin for mutation runs (tools/mutation.py): runs the tests a mutant calls fastest
first, by the durations mutmut recorded when it mapped tests to functions, so that a mutant a quick test catches
stops there (mutmut runs with ``-x``) instead of after the slow tests mutmut happened to list
first. Outside a mutmut run (no ``mutmut-stats.json`` in the working directory) it changes
nothing."""

import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    # a test mutmut has no duration for goes last; sorted() keeps the collection order of ties
    items[:] = sorted(items, key=lambda item: seconds.get(item.nodeid, float("inf")))
