"""Tests of deepmil_jax.steps, the numbers of training and evaluation: each scheme's loss against
numpy re-computations of the paper's equations, the objective's weight-decay term, Adam's update
by its formula, dropout seeded by the step, and the evaluation's predictions (order, padding, max
pooling); each scheme's output grid, bf16 compute with float32 state, and k=auto. Small models
(99x99 images, a 2x2 instance grid) keep it fast."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import SMALL as SHARED_SMALL
from conftest import _params
from flax import nnx

from deepmil_jax import steps
from deepmil_jax.config import Config

# 99x99 images give a 2x2 grid of instances; k=2 of 4 differs from max pooling.
SMALL = Config(
    scheme="label_assign",
    k=2,
    image_size=99,
    batch_size=4,
    eval_batch_size=4,
    learning_rate=1e-3,
    weight_decay=0.5,
    seed=1,
)


def _bce(z, y):
    """-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) in float64."""
    z = np.asarray(z, np.float64)
    return np.logaddexp(0.0, z) - y * z


def _max_pooling(z, y):  # Eq. 4: the bag's probability is its largest instance probability
    z = np.asarray(z, np.float64).reshape(len(y), -1)
    return np.mean(_bce(z.max(axis=1), y))


def _label_assign(z, y, k):  # Eq. 5-6: the top k instances take the image label, the rest 0
    z = np.asarray(z, np.float64).reshape(len(y), -1)
    ranked = -np.sort(-z, axis=1)
    targets = np.where(np.arange(z.shape[1])[None, :] < k, np.asarray(y)[:, None], 0.0)
    return np.mean(_bce(ranked, targets))


def _sparse(z, y, mu):  # Eq. 7: max pooling plus mu times the L1 norm of the probabilities
    z = np.asarray(z, np.float64).reshape(len(y), -1)
    return np.mean(_bce(z.max(axis=1), y) + mu * (1 / (1 + np.exp(-z))).sum(axis=1))


def _half_squared_norm(params):
    return 0.5 * sum(np.sum(np.asarray(p, np.float64) ** 2) for p in jax.tree.leaves(params))


def _numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _batch(seed, n=4, size=99):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, 1), dtype=np.float32)
    images[:, 30:70, 40:80] += 1.5  # a bright region, so that the instances differ
    labels = np.array([1, 0, 1, 0, 1, 1][:n], np.int32)
    return images, labels


def _eval_logits(trainer, images):
    """The instance logits of the model in evaluation mode, eagerly (no jitted step)."""
    model = nnx.merge(trainer.context.eval_graph, trainer.state["params"], trainer.state["rest"])
    return np.asarray(model(images), np.float64)


@pytest.fixture(scope="module")
def trainer():
    return steps.Trainer(SMALL, steps.make_mesh())


@pytest.mark.parametrize(
    "scheme,k,reference",
    [
        ("alexnet", 2, lambda z, y: _max_pooling(z, y)),
        ("max_pooling", 2, lambda z, y: _max_pooling(z, y)),
        ("label_assign", 2, lambda z, y: _label_assign(z, y, 2)),
        ("label_assign", 0.25, lambda z, y: _label_assign(z, y, 3)),  # ceil(0.25 * 9)
        ("sparse", 2, lambda z, y: _sparse(z, y, 0.5)),
    ],
)
def test_scheme_loss_is_the_papers_equation(scheme, k, reference):
    rng = np.random.default_rng(0)
    logits = (2 * rng.standard_normal((5, 3, 3))).astype(np.float32)
    labels = np.array([1, 0, 1, 1, 0], np.int32)
    config = dataclasses.replace(SMALL, scheme=scheme, k=k, mu=0.5)
    loss = float(steps.scheme_loss(steps.LossSpec.of(config.canonical()), logits, labels))
    assert loss == pytest.approx(reference(logits, labels), rel=1e-5)
    # the references differ, so that each scheme is told from the others
    values = [_max_pooling(logits, labels), _label_assign(logits, labels, 2)]
    values += [_label_assign(logits, labels, 3), _sparse(logits, labels, 0.5)]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 0.05


@pytest.mark.parametrize("scheme", ["mean_pooling", "attention", "learned_lse"])
def test_the_other_schemes_are_the_cross_entropy_of_the_models_bag_logits(scheme):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 3, 3)).astype(np.float32)
    bag = (2 * rng.standard_normal(5)).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 1], np.int32)
    config = steps.LossSpec.of(dataclasses.replace(SMALL, scheme=scheme).canonical())
    loss = float(steps.scheme_loss(config, logits, labels, bag))
    assert loss == pytest.approx(np.mean(_bce(bag, labels)), rel=1e-5)
    with pytest.raises(ValueError, match="bag_logits"):
        steps.scheme_loss(config, logits, labels)


def test_loss_fn_of_mean_pooling_is_the_cross_entropy_of_the_mean_probability():
    trainer = steps.Trainer(dataclasses.replace(SMALL, scheme="mean_pooling"), steps.make_mesh())
    images, labels = _batch(4)
    state = trainer.state
    loss, data = jax.jit(steps.loss_fn, static_argnums=0)(
        trainer.context, state["params"], state["rest"], images, labels, 0
    )
    z = _eval_logits(trainer, images).reshape(len(labels), -1)
    p = np.mean(1 / (1 + np.exp(-z)), axis=1)  # the bag: the mean instance probability
    expected = np.mean(-labels * np.log(p) - (1 - labels) * np.log(1 - p))
    assert abs(expected - _max_pooling(z, labels)) > 0.01  # mean and max pooling differ here
    assert float(data) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(
        expected + 0.5 * _half_squared_norm(state["params"]), rel=1e-5
    )


def test_loss_fn_is_the_data_term_plus_half_lambda_times_the_squared_weights(trainer):
    images, labels = _batch(0)
    state = trainer.state
    loss, data = jax.jit(steps.loss_fn, static_argnums=0)(
        trainer.context, state["params"], state["rest"], images, labels, 0
    )
    # no dropout in the MIL model, so training and evaluation mode give the same logits
    expected = _label_assign(_eval_logits(trainer, images), labels, 2)
    assert float(data) == pytest.approx(expected, rel=1e-5)
    penalty = _half_squared_norm(state["params"])
    assert 0.5 * penalty > 0.01 * expected  # the term is large enough to be seen
    assert float(loss) == pytest.approx(expected + 0.5 * penalty, rel=1e-5)


def _adam(p, m, v, g, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One step of Adam (Kingma & Ba, Algorithm 1) in float64: new params, m, v."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_train_step_is_adam_on_the_objective():
    trainer = steps.Trainer(SMALL, steps.make_mesh())
    objective = jax.value_and_grad(steps.loss_fn, argnums=1, has_aux=True)
    objective = jax.jit(objective, static_argnums=0)
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    p = leaves(trainer.state["params"])
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for step in (0, 1):
        images, labels = _batch(step)
        state = _numpy(trainer.state)
        (loss, data), grads = objective(
            trainer.context, state["params"], state["rest"], images, labels, step
        )
        out = trainer.train_step({"image": images, "label": labels}, step)
        assert set(out) == {"loss", "data_loss"}
        assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)
        assert float(out["data_loss"]) == pytest.approx(float(data), rel=1e-5)
        g = leaves(grads)
        new = [_adam(*x, step + 1, SMALL.learning_rate) for x in zip(p, m, v, g, strict=True)]
        p, m, v = (list(x) for x in zip(*new, strict=True))
        after = leaves(trainer.state["params"])
        error = np.concatenate([np.abs(a - b).ravel() for a, b in zip(after, p, strict=True)])
        # Each weight moves by about lr. A weight whose gradient is near zero moves by an amount
        # that the rounding of its gradient decides (the jitted step's differs from ours), so a
        # few in a million may be off by more than 2% of lr (of 2.3 million, 0 to 3 here).
        assert np.mean(error > 0.02 * SMALL.learning_rate) < 1e-5
        p = after  # go on from the step's float32 weights
    assert int(trainer.state["opt_state"][0].count) == 2


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_dropout_acts_in_training_only_and_follows_the_step():
    # fc6 and fc7 with dropout; they need 227x227 images
    config = dataclasses.replace(SMALL, scheme="alexnet", image_size=227)
    trainer = steps.Trainer(config, steps.make_mesh())
    images, labels = _batch(1, size=227)
    state = trainer.state
    loss_fn = jax.jit(steps.loss_fn, static_argnums=0)

    def data_term(step):
        return float(
            loss_fn(trainer.context, state["params"], state["rest"], images, labels, step)[1]
        )

    no_dropout = _max_pooling(_eval_logits(trainer, images), labels)
    first, again, second = data_term(0), data_term(0), data_term(1)
    assert first == again  # the same step, the same masks
    assert first != second  # another step, other masks
    assert abs(first - no_dropout) > 1e-4 and abs(second - no_dropout) > 1e-4
    # evaluation: dropout off, deterministic
    logits = np.asarray(steps.eval_step(trainer.context, trainer.state, images)[0], np.float64)
    np.testing.assert_allclose(logits, _eval_logits(trainer, images), rtol=1e-4, atol=1e-5)

    # called outside jit too, loss_fn leaves the state it is given (its dropout key) unchanged
    def values(tree):
        key = jax.dtypes.prng_key
        raw = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, key) else x for x in tree]
        return [np.array(x) for x in raw]

    rest = values(jax.tree.leaves(state["rest"]))
    steps.loss_fn(trainer.context, state["params"], state["rest"], images[:1], labels[:1], 5)
    after = values(jax.tree.leaves(state["rest"]))
    assert len(rest) == 2 and all(map(np.array_equal, rest, after))  # key and count


def test_eval_step_gives_the_evaluation_models_float32_logits(trainer):
    images, _ = _batch(2)
    logits, bag = steps.eval_step(trainer.context, trainer.state, images)
    assert logits.shape == (4, 2, 2) and logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), _eval_logits(trainer, images), atol=5e-5)
    # label assignment's bag logit is the max instance logit (Eq. 2-3)
    assert bag.shape == (4,) and bag.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(bag), np.asarray(logits).reshape(4, -1).max(axis=1))
    # the state is not given away: it still evaluates
    again, _ = steps.eval_step(trainer.context, trainer.state, images)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_predict_orders_by_index_drops_padding_and_takes_the_max_instance(trainer):
    images, _ = _batch(3, n=6)
    images[5] = 0.0  # the padding image of the second batch
    batches = [
        {"image": images[[3, 0, 4, 1]], "mask": np.ones(4, bool), "index": np.array([3, 0, 4, 1])},
        {
            "image": images[[2, 5, 5, 5]],
            "mask": np.array([True, False, False, False]),
            "index": np.array([2, -1, -1, -1]),
        },
    ]
    out = trainer.predict(batches)
    expected = _eval_logits(trainer, images[:5])
    flat = expected.reshape(5, -1)
    assert np.ptp(flat, axis=1).min() > 0.05  # max, mean and other poolings differ here
    np.testing.assert_array_equal(out["index"], np.arange(5))
    np.testing.assert_allclose(out["instance_logits"], expected, atol=5e-5)
    np.testing.assert_allclose(out["probability"], 1 / (1 + np.exp(-flat.max(axis=1))), atol=2e-5)


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_model_outputs_per_scheme():
    for scheme, grid in (("label_assign", (2, 2)), ("max_pooling", (6, 6)), ("alexnet", (1, 1))):
        size = 99 if scheme == "label_assign" else 227
        model = steps.create_model(dataclasses.replace(Config(), scheme=scheme), nnx.Rngs(0))
        model.eval()
        out = model(np.zeros((2, size, size, 1), np.float32))
        assert out.shape == (2, *grid), scheme


@pytest.mark.slow  # two trainers compiled, ~13 s on 2 cores
def test_bf16_computes_in_bfloat16_and_keeps_float32_state():
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((4, 99, 99, 1), dtype=np.float32),
        "label": np.array([1, 0, 1, 0], np.int32),
    }
    losses = {}
    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(SHARED_SMALL, precision=precision, batch_size=4)
        trainer = steps.Trainer(config, steps.make_mesh())
        losses[precision] = float(trainer.train_step(batch, 0)["loss"])
        dtypes = {x.dtype for x in jax.tree.leaves(steps.checkpointed(trainer.state))}
        assert dtypes <= {np.dtype("float32"), np.dtype("int32")}, dtypes
        conv = trainer.context.train_graph
        assert ("bfloat16" in str(conv)) == (precision == "bf16")
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert losses["bf16"] != losses["fp32"]


@pytest.mark.slow  # AlexNet at 227x227, ~11 s on 2 cores
def test_alexnet_baseline_trains_with_dropout():
    config = dataclasses.replace(SHARED_SMALL, scheme="alexnet", image_size=227, batch_size=2)
    trainer = steps.Trainer(config, steps.make_mesh())
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((2, 227, 227, 1), dtype=np.float32), "label": np.array([1, 0])}
    before = _params(trainer.state)
    first = float(trainer.train_step(batch, 0)["loss"])
    assert np.isfinite(first)
    assert any(not np.array_equal(before[k], v) for k, v in _params(trainer.state).items())
    # evaluation is deterministic (dropout off): the same images give the same bag logits
    stream = [{"image": batch["image"], "mask": np.ones(2, bool), "index": np.arange(2)}] * 2
    out = trainer.predict(stream)
    logits = out["instance_logits"]  # sorted by index: image 0 twice, then image 1 twice
    np.testing.assert_array_equal(out["index"], [0, 0, 1, 1])
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[2], logits[3])


@pytest.mark.slow  # two trainers and gradients, ~17 s on 2 cores
def test_weight_decay_adds_exactly_lam_times_params_to_the_gradient():
    rng = np.random.default_rng(0)
    images = rng.random((4, 99, 99, 1), dtype=np.float32)
    labels = np.array([1, 0, 1, 0], np.int32)
    grads = {}
    for lam in (0.0, 0.5):
        trainer = steps.Trainer(
            dataclasses.replace(SHARED_SMALL, weight_decay=lam), steps.make_mesh()
        )
        params = trainer.state["params"]
        context, rest = trainer.context, trainer.state["rest"]
        grads[lam] = jax.grad(
            lambda p, c=context, r=rest: steps.loss_fn(c, p, r, images, labels, 0)[0]
        )(params)
    # both trainers start from the same seed, so the parameters are the same
    flat = _params({"params": params})
    zero, decayed = (_params({"params": grads[lam]}) for lam in (0.0, 0.5))
    for key in flat:
        np.testing.assert_allclose(decayed[key] - zero[key], 0.5 * flat[key], rtol=1e-4, atol=1e-6)


def test_evaluation_probability_is_the_sigmoid_of_the_max_instance_logit():
    config = dataclasses.replace(SHARED_SMALL, scheme="label_assign", image_size=131)  # a 3x3 grid
    trainer = steps.Trainer(config, steps.make_mesh())
    rng = np.random.default_rng(1)
    images = rng.random((5, 131, 131, 1), dtype=np.float32)
    images[:, 40:80, 50:90] += 2.0  # a bright region, so the instances differ
    batch = {"image": images, "mask": np.ones(5, bool), "index": np.arange(5)}
    out = trainer.predict([batch])
    model = nnx.merge(trainer.context.eval_graph, trainer.state["params"], trainer.state["rest"])
    logits = np.asarray(model(images)).reshape(5, -1)
    assert np.ptp(logits, axis=1).min() > 0.1  # max, mean and any other pooling differ here
    # jitted (CPU compiler options) and eager convolutions round differently, by ~1e-5
    np.testing.assert_allclose(out["instance_logits"].reshape(5, -1), logits, atol=5e-5)
    np.testing.assert_allclose(out["probability"], 1 / (1 + np.exp(-logits.max(axis=1))), atol=2e-5)


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_k_auto_trains_on_each_images_rounded_extent():
    config = dataclasses.replace(SHARED_SMALL, k="auto", image_size=131, batch_size=4)  # 3x3 grid
    trainer = steps.Trainer(config, steps.make_mesh())
    rng = np.random.default_rng(4)
    images = rng.random((4, 131, 131, 1), dtype=np.float32)
    labels = np.array([1, 1, 0, 1], np.int32)
    state, context = trainer.state, trainer.context
    data = float(steps.loss_fn(context, state["params"], state["rest"], images, labels, 0)[1])
    model = nnx.merge(context.train_graph, state["params"], state["rest"])
    z = np.asarray(model(images), np.float64).reshape(4, -1)
    # numpy reference: k_n = round(sum_j sigmoid(z_nj)) clipped to [1, 9]; Eq. 5-6 with it
    r = 1 / (1 + np.exp(-z))
    total = 0.0
    for n in range(4):
        k = int(np.clip(np.round(r[n].sum()), 1, 9))
        order = np.argsort(-z[n])
        t = np.zeros(9)
        t[order[:k]] = labels[n]
        total += -(t * np.log(r[n]) + (1 - t) * np.log(1 - r[n])).sum()
    assert data == pytest.approx(total / 36, rel=1e-4)
    assert np.isfinite(float(trainer.train_step({"image": images, "label": labels}, 0)["loss"]))
