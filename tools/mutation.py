"""Mutation testing of the modules that decide the numbers, one module (target) at a time
(docs/mutation-testing.md). A developer's tool, not part of CI.

    .venv/bin/python tools/mutation.py [--jobs 2] [--max-children N] [--clean] [--committed]
                                       [TARGET ...]

For each target (default: every one in ``TARGETS``) this copies the sources, the tests and
``pyproject.toml`` into ``mutants/<target>/`` (ignored by git), narrows the copy's
``[tool.mutmut]`` to the target's module or package (``only_mutate``) and its fast test modules
(``pytest_add_cli_args_test_selection``), and runs mutmut there (niced, on the CPU, with XLA's
compilation cache kept per target, its output in ``mutants/<target>/mutmut.log``): each mutant runs
only the tests that call the mutated function. ``--jobs`` targets run side by side, each testing
``--max-children`` mutants at once. It prints a progress line a minute and, per target,
caught / (caught + uncaught) (caught: a test failed, timed out or crashed), the uncaught mutants,
and the wall and CPU time of the run. A target keeps mutmut's results while its module is
unchanged: a later run tests only the earlier survivors (tests may have been added); any change to
the module's text, comments included, starts the target over, and ``--clean`` does so always.
``cd mutants/<target> && ../../.venv/bin/mutmut show NAME`` shows a mutant.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = ROOT / ".venv" / "bin" / "mutmut"
COPIED = ("deepmil_jax", "data_pipeline", "tests")


@dataclasses.dataclass(frozen=True)
class Target:
    path: str  # the module mutated, or a package's folder (every module in it)
    functions: tuple[str, ...]  # mutmut's mutant-name patterns of the functions tested
    tests: tuple[str, ...]  # the fast test modules that test them

    def files(self, source: Path) -> list[str]:
        """The modules mutated, relative to ``source``."""
        if self.path.endswith(".py"):
            return [self.path]
        return sorted(p.relative_to(source).as_posix() for p in (source / self.path).glob("*.py"))


def _all(module: str) -> tuple[str, ...]:
    return (f"{module}.*",)


# longest first: run side by side (--jobs), the targets then end at about the same time
TARGETS = {
    # decoding, geometry and the breast mask; the film heuristics are tested on synthetic films
    "preprocess": Target(
        "data_pipeline/preprocess.py",
        _all("data_pipeline.preprocess"),
        ("tests/test_preprocess.py", "tests/test_synthetic_film.py"),
    ),
    "losses": Target("deepmil_jax/losses", _all("deepmil_jax.losses"), ("tests/test_losses.py",)),
    "input_pipeline": Target(
        "data_pipeline/input_pipeline.py",
        _all("data_pipeline.input_pipeline"),
        ("tests/test_input_pipeline.py",),
    ),
    # the parts that decide numbers: the losses of the schemes, the steps, the predictions
    "steps": Target(
        "deepmil_jax/steps.py",
        (
            "deepmil_jax.steps.x_scheme_loss*",
            "deepmil_jax.steps.x_loss_fn*",
            "deepmil_jax.steps.x__train_step*",
            "deepmil_jax.steps.x_train_step*",
            "deepmil_jax.steps.x__eval_step*",
            "deepmil_jax.steps.x_eval_step*",
            "deepmil_jax.steps.x_make_optimizer*",
            "deepmil_jax.steps.xǁTrainerǁpredict*",
        ),
        ("tests/test_steps.py",),
    ),
    # render_heatmap's drawing is marked no-mutate in the module
    "heatmap": Target(
        "deepmil_jax/heatmap.py", _all("deepmil_jax.heatmap"), ("tests/test_heatmap.py",)
    ),
    "metrics": Target(
        "deepmil_jax/metrics.py", _all("deepmil_jax.metrics"), ("tests/test_metrics.py",)
    ),
    "folds": Target(
        "data_pipeline/folds.py", _all("data_pipeline.folds"), ("tests/test_folds.py",)
    ),
    # the label rules only; the rest of inbreast.py reads files
    "inbreast": Target(
        "data_pipeline/inbreast.py",
        (
            "data_pipeline.inbreast.x_birads_label*",
            "data_pipeline.inbreast.x__normalise_birads*",
            "data_pipeline.inbreast.x__parse_label*",
        ),
        ("tests/test_inbreast.py",),
    ),
}


def _sync(source: Path, dest: Path, mutants: Path) -> None:
    """Makes ``dest`` a copy of ``source`` (Python and fixture files), touching only files that
    changed; mutmut keeps an unchanged copy of a file in ``mutants/`` forever, so a changed
    file's copy there is removed for mutmut to copy it again."""
    wanted = set()
    for path in source.rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        rel = path.relative_to(source)
        wanted.add(rel)
        target = dest / rel
        if target.exists() and target.read_bytes() == path.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        stale = mutants / source.name / rel
        if stale.exists():
            stale.unlink()
    for path in list(dest.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            if path.relative_to(dest) not in wanted:
                path.unlink()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _pyproject(target: Target, source: Path) -> str:
    """The project's pyproject.toml with its ``[tool.mutmut]`` narrowed to ``target``."""
    text = (source / "pyproject.toml").read_text()
    settings = tomllib.loads(text)["tool"]["mutmut"]
    settings["only_mutate"] = target.files(source)
    settings["pytest_add_cli_args_test_selection"] = list(target.tests)
    # the tests a mutant calls run likeliest catch first (tools/mutation_order.py)
    settings["pytest_add_cli_args"] = settings["pytest_add_cli_args"] + ["-p", "mutation_order"]
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            kept.append(line)
    section = ["[tool.mutmut]"] + [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    return "\n".join(kept + [""] + section) + "\n"


def committed_source() -> Path:
    """The sources, tests and pyproject.toml as committed (git HEAD), in ``mutants/HEAD``."""
    source = ROOT / "mutants" / "HEAD"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", *COPIED, "pyproject.toml"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return source


def prepare(name: str, target: Target, source: Path) -> Path:
    work = ROOT / "mutants" / name
    mutants = work / "mutants"
    # mutmut keeps each mutant's verdict by name (function + number) and re-tests a function only
    # when its code (ast.dump, comments ignored) changes; a new `# pragma: no mutate` renumbers
    # the function's mutants without changing that, so old verdicts would label other mutants.
    # Any change to the text of the target's modules (or which modules it has) therefore starts
    # the target over.
    files = target.files(source)
    if target.files(work) != files or any(
        not (work / f).exists() or (work / f).read_bytes() != (source / f).read_bytes()
        for f in files
    ):
        shutil.rmtree(mutants, ignore_errors=True)
    for part in COPIED:
        _sync(source / part, work / part, mutants)
    pyproject = _pyproject(target, source)
    path = work / "pyproject.toml"
    if not path.exists() or path.read_text() != pyproject:
        path.write_text(pyproject)
    return work


# mutmut's verdicts that count as caught: a test failed, or the tests ran past the time limit
# (an endless loop) or crashed
CAUGHT = ("killed", "timeout", "segfault")


def statuses(work: Path, target: Target) -> dict[str, str]:
    """mutmut's verdict on each of the target's mutants ("not checked" when not yet run)."""
    from mutmut.stats import status_by_exit_code

    codes = {}
    for file in target.files(work):
        meta = json.loads((work / "mutants" / (file + ".meta")).read_text())
        codes.update(meta["exit_code_by_key"])
    return {
        key: status_by_exit_code[code]
        for key, code in sorted(codes.items())
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in target.functions)
    }


def tally(work: Path, target: Target) -> tuple[dict[str, int], list[str]]:
    """Counts of each verdict among the target's mutants, and the uncaught ones."""
    counts: dict[str, int] = {}
    survivors = []
    for key, status in statuses(work, target).items():
        counts[status] = counts.get(status, 0) + 1
        if status not in CAUGHT:
            survivors.append(f"{key}: {status}")
    return counts, survivors


TESTING = "testing mutants"  # Run.phase while mutmut tests the pending mutants


@dataclasses.dataclass
class Run:
    """One target's mutmut run: its phase while it runs, then its exit status and times."""

    phase: str = "waiting"
    returncode: int = 0
    wall: float = 0.0
    cpu: float = 0.0


def _mutmut(command: list[str], work: Path, env: dict[str, str], log: Path) -> tuple[int, float]:
    """Runs a mutmut command in ``work``, its output appended to ``log``: (exit status, CPU
    seconds of it and its descendants)."""
    with log.open("a") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run_target(name: str, work: Path, env: dict[str, str], children: int, run: Run) -> None:
    """Runs mutmut on one prepared target, its output in ``mutants/<name>/mutmut.log``."""
    target = TARGETS[name]
    log = work / "mutmut.log"
    log.write_text("")
    # XLA's compiled programs are kept between the mutants' test runs (and between runs of this
    # tool): a mutant recompiles only the programs its change alters (the cache is keyed by the
    # program, so a mutated program is never served an unmutated one's code); test_steps.py
    # takes 16 s instead of 40 s with a warm cache
    env = dict(env, JAX_COMPILATION_CACHE_DIR=str(work / ".jax_cache"))
    command = ["nice", "-n", "15", str(MUTMUT), "run", "--max-children", str(children)]
    start = time.monotonic()
    # 1. generate the mutants and map tests to functions (mutmut keeps both between runs); a name
    # that matches no mutant runs none (mutmut then stops with "nothing matches")
    run.phase = "mapping tests to functions"
    module = target.path.removesuffix(".py").replace("/", ".")
    code, run.cpu = _mutmut([*command, f"{module}.no_such_mutant"], work, env, log)
    run.returncode = 0 if "nothing matches" in log.read_text() else code or 1
    # 2. run the target's mutants not yet tested (new, or of a changed function) and the
    # survivors of earlier runs (tests may have been added since)
    if not run.returncode:
        pending = [key for key, status in statuses(work, target).items() if status not in CAUGHT]
        if pending:
            run.phase = TESTING
            run.returncode, cpu = _mutmut([*command, *pending], work, env, log)
            run.cpu += cpu
    run.wall = time.monotonic() - start
    run.phase = "done"


def _progress(name: str, work: Path, run: Run) -> str:
    """A running target's phase, with how many of its mutants have a verdict while testing."""
    if run.phase != TESTING:
        return f"{name}: {run.phase}"
    try:
        found = statuses(work, TARGETS[name])
    except (OSError, ValueError):  # not written yet, or being rewritten by mutmut
        return f"{name}: {run.phase}"
    checked = sum(status != "not checked" for status in found.values())
    return f"{name}: {run.phase}, {checked}/{len(found)} checked"


def report(name: str, work: Path, run: Run) -> str | None:
    """Prints the uncaught mutants of a finished target; its summary line (None: it failed)."""
    if run.returncode:
        print(
            f"{name}: mutmut failed with exit status {run.returncode}; see {work / 'mutmut.log'}",
            file=sys.stderr,
        )
        return None
    counts, survivors = tally(work, TARGETS[name])
    for line in survivors:
        print(f"  {name}: survived {line}")
    killed = sum(v for k, v in counts.items() if k in CAUGHT)
    # a mutant that no test reached, or not run, counts as surviving
    survived = sum(v for k, v in counts.items() if k not in CAUGHT)
    score = 100.0 * killed / max(killed + survived, 1)
    line = (
        f"{name}: {killed} / {killed + survived} = {score:.1f}% {counts}; "
        f"{run.wall / 60:.1f} min wall, {run.cpu / 60:.1f} min CPU"
    )
    print(line, flush=True)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="targets run side by side (default 2: one target's single-process phases, mapping "
        "tests and the unmutated run, leave a core to the other's mutants)",
    )
    parser.add_argument(
        "--max-children",
        type=int,
        help="mutants tested at once per target (default: the CPU count / the targets run side by "
        "side, at least 1)",
    )
    parser.add_argument(
        "--committed",
        action="store_true",
        help="test the files as committed (git HEAD) instead of the working tree's, e.g. while "
        "others edit the checkout",
    )
    parser.add_argument(
        "--clean", action="store_true", help="forget earlier runs' results: test every mutant"
    )
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.jobs < 1 or (args.max_children is not None and args.max_children < 1):
        parser.error("--jobs and --max-children must be at least 1")
    jobs = min(args.jobs, len(names))  # one target alone gets every core
    children = args.max_children or max(1, (os.cpu_count() or 1) // jobs)
    source = committed_source() if args.committed else ROOT
    works = {name: prepare(name, TARGETS[name], source) for name in names}
    if args.clean:
        for work in works.values():
            shutil.rmtree(work / "mutants", ignore_errors=True)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT / "tools"), os.environ.get("PYTHONPATH")])
        ),
    )
    runs = {name: Run() for name in names}
    start = time.monotonic()
    summary: dict[str, str | None] = {}
    # the targets start in the order given (TARGETS lists the longest first, which shortens the
    # whole run); a progress line every minute, a target's result as soon as it ends
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {
            pool.submit(run_target, name, works[name], env, children, runs[name]): name
            for name in names
        }
        waiting = set(futures)
        while waiting:
            done, waiting = concurrent.futures.wait(waiting, timeout=60)
            for future in done:
                name = futures[future]
                future.result()  # a bug in this tool surfaces here
                summary[name] = report(name, works[name], runs[name])
            busy = [
                _progress(name, works[name], run)
                for name, run in runs.items()
                if run.phase not in ("waiting", "done")
            ]
            if busy:
                print(f"[{(time.monotonic() - start) / 60:.1f} min] " + "; ".join(busy), flush=True)
    print("\n".join(line for name in names if (line := summary[name])))
    cpu = sum(run.cpu for run in runs.values())
    print(f"total: {(time.monotonic() - start) / 60:.1f} min wall, {cpu / 60:.1f} min CPU")
    return 1 if None in summary.values() else 0


if __name__ == "__main__":
    sys.exit(main())
