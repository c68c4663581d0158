"""The registry: every entry works end to end, a new scheme is one entry, the instance grid from
the architecture tables is the model's, and the package keeps its layering (DESIGN.md)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepmil_jax import registry, steps
from deepmil_jax.config import Config, scheme_configs
from deepmil_jax.errors import ConfigError
from deepmil_jax.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = Config(scheme="max_pooling", image_size=99, batch_size=4, init="random")


def _batch(n: int = 4, size: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(n, size, size, 1)).astype(np.float32)
    return {"image": images, "label": np.array([0, 1] * (n // 2), np.int32)}


def _train_one_step(config: Config) -> tuple[float, float]:
    """(the data term the step reports, the largest parameter change) of one step."""
    trainer = steps.Trainer(config, steps.make_mesh())
    before = jax.tree.map(np.asarray, trainer.state["params"])
    out = trainer.train_step(_batch(), 0)
    after = jax.tree.map(np.asarray, trainer.state["params"])
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    )
    return float(out["data_loss"]), moved


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s for s in registry.SCHEMES if s != "alexnet"])
def test_every_scheme_of_the_table_trains_a_step(scheme):
    loss, moved = _train_one_step(dataclasses.replace(SMALL, scheme=scheme, k=2))
    assert np.isfinite(loss) and loss > 0
    assert moved > 0


def toy_loss(bag_logits, labels):
    """A loss the package does not have: the squared error of the bag probability."""
    return jnp.mean((jax.nn.sigmoid(bag_logits) - labels) ** 2)


def test_a_new_scheme_is_one_entry(monkeypatch):
    monkeypatch.setitem(
        registry.SCHEMES,
        "toy",
        registry.Scheme("Toy", "mil", "mean", f"{__name__}:toy_loss", "bag", (), 0.0, None, "x"),
    )
    config = dataclasses.replace(SMALL, scheme="toy", weight_decay=0.0)
    trainer = steps.Trainer(config, steps.make_mesh())
    batch = _batch()
    model = nnx.merge(trainer.context.eval_graph, trainer.state["params"], trainer.state["rest"])
    z = np.asarray(model.instances_and_bag(jnp.asarray(batch["image"]))[0], np.float64)
    r = 1 / (1 + np.exp(-z.reshape(len(z), -1)))
    expected = np.mean((r.mean(1) - batch["label"]) ** 2)  # mean pooling, squared error
    out = trainer.train_step(batch, 0)
    assert float(out["data_loss"]) == pytest.approx(expected, rel=1e-4)
    assert "toy" in registry.SCHEMES and registry.SCHEMES["toy"].title == "Toy"


@pytest.mark.parametrize("backbone", list(registry.BACKBONES))
def test_the_grid_from_the_tables_is_the_models(backbone):
    model = nnx.eval_shape(lambda: build_model("max_pooling", backbone=backbone, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    for h, w in ((99, 99), (227, 227), (160, 333), (512, 512)):
        x = jax.ShapeDtypeStruct((1, h, w, 1), jnp.float32)
        out = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, x)
        assert registry.feature_grid(backbone, h, w) == tuple(out.shape[1:]), (h, w)
    assert model.backbone.out_features == registry.out_features(backbone)


def test_resnet_grid_at_output_stride_16():
    model = nnx.eval_shape(
        lambda: build_model("sparse", backbone="resnet18", output_stride=16, rngs=nnx.Rngs(0))
    )
    graph, state = nnx.split(model)
    out = jax.eval_shape(
        lambda s, x: nnx.merge(graph, s)(x), state, jax.ShapeDtypeStruct((1, 227, 227, 1), float)
    )
    assert (
        registry.feature_grid("resnet18", 227, 227, output_stride=16)
        == out.shape[1:]
        == (
            15,
            15,
        )
    )


def test_the_dataset_table_is_the_pipelines():
    from data_pipeline import datasets

    assert set(registry.DATASETS) == set(datasets.SOURCES)


@pytest.mark.slow  # spawns a process: not in `pytest -m "not slow"`
def test_bad_k_and_scheme_lists_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--k: "):
        dataclasses.replace(SMALL, scheme="label_assign", k="inf").validate()
    with pytest.raises(ConfigError, match="label_assign:k=inf"):
        scheme_configs(SMALL, ["label_assign:k=inf"])
    with pytest.raises(ConfigError, match="same configuration"):
        scheme_configs(dataclasses.replace(SMALL, k=6), ["label_assign", "label_assign:k=6"])
    run = subprocess.run(
        [sys.executable, "-m", "deepmil_jax.evaluate", "--schemes=", f"--workdir={tmp_path}/cv"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1 and "--schemes: give at least one scheme" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "cv").exists()


def test_a_pretrained_backbone_defaults_to_its_packaged_weights():
    config = Config(backbone="efficientnet_lite0").canonical()
    assert config.init == "imagenet:efficientnet_lite0"
    assert (config.learning_rate, config.head_learning_rate, config.warmup_epochs) == (
        1e-4,
        1e-3,
        1,
    )
    assert Config().canonical().init == "random"
    with pytest.raises(ConfigError, match="--backbone=efficientnet_lite0"):
        Config(init="imagenet:efficientnet_lite0").validate()


# ---- layering (../shared/DESIGN.md) ------------------------------------------------------------

FORBIDDEN = {
    "data_pipeline": ("jax", "flax", "deepmil_jax"),
    "deepmil_jax.losses": ("flax", "tensorflow", "data_pipeline"),
    "deepmil_jax.registry": ("jax", "flax", "tensorflow"),
    "deepmil_jax.config": ("jax", "flax", "tensorflow"),
    "deepmil_jax.cli": ("jax", "flax", "tensorflow"),
    "deepmil_jax.architecture": ("jax", "numpy"),
}


def _modules(package: str) -> list[str]:
    root = ROOT / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _all_imports(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth (top-level names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _path(name: str) -> Path:
    rel = Path(*name.split("."))
    return ROOT / (rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py"))


def test_each_layer_imports_only_what_it_may():
    """The import statements of each module (also those inside functions; ``cli`` and ``config``
    may import JAX in a function that runs once a program starts)."""
    for rule, banned in FORBIDDEN.items():
        if rule in ("deepmil_jax.cli", "deepmil_jax.config"):
            continue
        package = rule.split(".")[0]
        for name in (m for m in _modules(package) if m == rule or m.startswith(rule + ".")):
            named = _all_imports(_path(name))
            bad = sorted(m for m in named if m.split(".")[0] in banned or m in banned)
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize(
    "name",
    [
        "deepmil_jax.registry",
        "deepmil_jax.config",
        "deepmil_jax.cli",
        "deepmil_jax.architecture",
        "deepmil_jax.losses",
    ],
)
def test_the_light_modules_load_nothing_heavy(name):
    """Imported alone, in a fresh interpreter (what libraries they pull in counts too)."""
    script = f"import sys, {name}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-500:]
    loaded = {m.split(".")[0] for m in run.stdout.split()}
    assert not loaded & set(FORBIDDEN[name]), loaded & set(FORBIDDEN[name])


def _module_imports(path: Path) -> set[str]:
    """The project modules a file imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if __name__ == "__main__":` blocks run only as a program
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("deepmil_jax", "data_pipeline")}


def test_no_import_circle():
    names = set(_modules("deepmil_jax") + _modules("data_pipeline"))
    graph = {}
    for name in names:
        graph[name] = {m for m in _module_imports(_path(name)) if m in names and m != name}

    # a package's __init__ importing its own modules is how re-exports work: not a circle
    def edges(name):
        return {m for m in graph[name] if not (m.startswith(name + "."))}

    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for nxt in edges(name):
            if state.get(nxt) == 1 and not name.startswith(nxt + "."):
                raise AssertionError(f"import circle: {' -> '.join([*trail, name, nxt])}")
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
@pytest.mark.parametrize("freeze", [False, True])
def test_backbone_and_head_learning_rates_and_the_frozen_backbone(freeze):
    """Adam's first step moves each parameter by about its learning rate (m / sqrt(v) = +-1)."""
    config = Config(
        scheme="max_pooling",
        backbone="resnet18",
        image_size=64,
        batch_size=4,
        init="random",
        learning_rate=1e-4,
        head_learning_rate=1e-3,
        warmup_epochs=0,
        freeze_backbone=freeze,
    )
    trainer = steps.Trainer(config, steps.make_mesh())
    before = jax.tree.map(np.asarray, trainer.state["params"])
    trainer.train_step(_batch(4, 64), 0)
    after = jax.tree.map(np.asarray, trainer.state["params"])

    def moved(part):
        pairs = zip(jax.tree.leaves(after[part]), jax.tree.leaves(before[part]), strict=True)
        return max(float(np.max(np.abs(a - b))) for a, b in pairs)

    assert moved("head") == pytest.approx(1e-3, rel=1e-3)
    assert moved("backbone") == (0.0 if freeze else pytest.approx(1e-4, rel=1e-3))
