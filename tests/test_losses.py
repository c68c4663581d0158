"""The MIL losses against a literal numpy reading of the paper's equations (loops over images)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import deepmil_jax as dm

jax.config.update("jax_enable_x64", False)


# ---- independent reference: float64 numpy, one image and one sorted instance at a time ----------
def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _valid(logits, mask, n):
    row = np.asarray(logits[n], np.float64).ravel()
    return row if mask is None else row[np.asarray(mask[n]).ravel()]


def _k_of(k, count):
    if isinstance(k, int):
        return min(k, count)
    return max(1, min(count, math.ceil(round(k * count, 6))))


def ref_max_pooling(logits, labels, mask=None):
    total = 0.0
    for n in range(len(labels)):
        p = max(_sigmoid(z) for z in _valid(logits, mask, n))  # Eq. 2-3
        y = labels[n]
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))  # Eq. 4
    return total / len(labels)


def ref_label_assign(logits, labels, k, mask=None):
    total, count = 0.0, 0
    for n in range(len(labels)):
        r = sorted((_sigmoid(z) for z in _valid(logits, mask, n)), reverse=True)
        top = _k_of(k, len(r))
        for j, rj in enumerate(r):
            t = labels[n] if j < top else 0  # Eq. 5
            total += -(t * math.log(rj) + (1 - t) * math.log(1 - rj))
            count += 1
    return total / count  # Eq. 6: averaged over m * N instances


def ref_sparse(logits, labels, mu, mask=None):
    total = 0.0
    for n in range(len(labels)):
        r = sorted((_sigmoid(z) for z in _valid(logits, mask, n)), reverse=True)
        y = labels[n]
        total += -(y * math.log(r[0]) + (1 - y) * math.log(1 - r[0])) + mu * sum(abs(x) for x in r)
    return total / len(labels)


def ref_bag(logits, mask, pooling, k=0.1, temperature=1.0):
    out = []
    for n in range(len(logits)):
        z = _valid(logits, mask, n)
        r = np.array([_sigmoid(v) for v in z])
        if pooling == "max":
            out.append(z.max())
            continue
        if pooling == "mean":
            p = r.mean()
        elif pooling == "topk_mean":
            p = np.sort(r)[::-1][: _k_of(k, len(r))].mean()
        elif pooling == "lse":
            out.append(math.log(np.mean(np.exp(temperature * z))) / temperature)
            continue
        elif pooling == "noisy_or":
            p = 1 - np.prod(1 - r)
        out.append(math.log(p / (1 - p)))
    return np.array(out)


# ---- fixtures -------------------------------------------------------------------------------
def _case(seed, shape=(5, 4, 3), masked=False, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, 2, shape[0])
    labels[0], labels[1] = 1, 0
    mask = None
    if masked:
        mask = rng.random(shape) < 0.7
        mask.reshape(shape[0], -1)[:, 0] = True  # every bag keeps a valid instance
    return logits, labels, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_pooling_matches_reference(seed, masked):
    logits, labels, mask = _case(seed, masked=masked)
    got = dm.max_pooling_loss(logits, labels, mask=mask)
    np.testing.assert_allclose(got, ref_max_pooling(logits, labels, mask), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_label_assign_matches_reference(k, masked):
    logits, labels, mask = _case(3, shape=(6, 6, 6), masked=masked)
    got = dm.label_assign_loss(logits, labels, k, mask=mask)
    np.testing.assert_allclose(got, ref_label_assign(logits, labels, k, mask), rtol=1e-5)


@pytest.mark.parametrize("mu", [0.0, 1e-5, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_matches_reference(mu, masked):
    logits, labels, mask = _case(4, shape=(4, 9), masked=masked)
    got = dm.sparse_loss(logits, labels, mu, mask=mask)
    np.testing.assert_allclose(got, ref_sparse(logits, labels, mu, mask), rtol=1e-5)


@pytest.mark.parametrize("pooling", dm.POOLINGS)
@pytest.mark.parametrize("masked", [False, True])
def test_bag_logits_match_reference(pooling, masked):
    logits, _, mask = _case(5, shape=(5, 12), masked=masked)
    kwargs = {"k": 0.25, "temperature": 2.5}
    got = dm.bag_logits(logits, mask=mask, pooling=pooling, **kwargs)
    np.testing.assert_allclose(got, ref_bag(logits, mask, pooling, **kwargs), rtol=1e-4, atol=1e-5)


def test_hand_computed_case():
    # Two images, three instances. Max pooling: BCE(2, 1) and BCE(0.5, 0).
    z = jnp.array([[0.0, 2.0, -1.0], [0.5, -3.0, 0.0]])
    y = jnp.array([1, 0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))) / 2
    np.testing.assert_allclose(dm.max_pooling_loss(z, y), expected, rtol=1e-6)
    # Label assignment with k=1: image 0 -> target 1 on logit 2, 0 on the rest; image 1 all 0.
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: BCE(z, 0) = softplus(z)
    expected = (sp(-2.0) + sp(0.0) + sp(-1.0) + sp(0.5) + sp(-3.0) + sp(0.0)) / 6
    np.testing.assert_allclose(dm.label_assign_loss(z, y, 1), expected, rtol=1e-6)


def test_identities():
    logits, labels, _ = _case(7, shape=(6, 36))
    # sparse with mu = 0 is max pooling
    np.testing.assert_allclose(
        dm.sparse_loss(logits, labels, 0.0), dm.max_pooling_loss(logits, labels), rtol=1e-6
    )
    # label assignment with all-negative labels is the mean BCE of every instance against 0
    zeros = np.zeros_like(labels)
    mean_bce = np.mean(np.log1p(np.exp(logits.astype(np.float64))))
    np.testing.assert_allclose(dm.label_assign_loss(logits, zeros, 6), mean_bce, rtol=1e-5)
    # label assignment with k = m and positive labels is the mean BCE against 1
    ones = np.ones_like(labels)
    mean_bce1 = np.mean(np.log1p(np.exp(-logits.astype(np.float64))))
    np.testing.assert_allclose(dm.label_assign_loss(logits, ones, 36), mean_bce1, rtol=1e-5)
    # the grid shape does not matter: (N, 6, 6) equals (N, 36)
    np.testing.assert_allclose(
        dm.label_assign_loss(logits.reshape(6, 6, 6), labels, 6),
        dm.label_assign_loss(logits, labels, 6),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y, m: dm.max_pooling_loss(z, y, mask=m),
        lambda z, y, m: dm.label_assign_loss(z, y, 3, mask=m),
        lambda z, y, m: dm.label_assign_loss(z, y, 0.3, mask=m),
        lambda z, y, m: dm.sparse_loss(z, y, 0.1, mask=m),
    ]
    + [lambda z, y, m, p=p: jnp.sum(dm.bag_logits(z, mask=m, pooling=p)) for p in dm.POOLINGS],
)
def test_padded_instance_changes_nothing(loss):
    logits, labels, _ = _case(8, shape=(4, 10))
    padded = np.concatenate([logits, np.full((4, 3), 50.0, np.float32)], axis=1)
    mask = np.concatenate([np.ones((4, 10), bool), np.zeros((4, 3), bool)], axis=1)
    np.testing.assert_allclose(loss(padded, labels, mask), loss(logits, labels, None), rtol=1e-5)
    # ... and no gradient reaches the padding
    grads = jax.grad(loss)(jnp.asarray(padded), labels, mask)
    assert np.all(np.asarray(grads)[:, 10:] == 0)


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y: dm.max_pooling_loss(z, y),
        lambda z, y: dm.label_assign_loss(z, y, 2),
        lambda z, y: dm.sparse_loss(z, y, 0.2),
    ]
    + [lambda z, y, p=p: jnp.sum(dm.bag_logits(z, pooling=p, k=2)) for p in dm.POOLINGS],
)
def test_gradients_match_finite_differences(loss):
    # distinct, well-separated logits so that the sort order is stable under the finite steps
    rng = np.random.default_rng(9)
    logits = rng.permutation(np.linspace(-3, 3, 18)).reshape(3, 6)
    labels = np.array([1, 0, 1])
    with jax.enable_x64(True):
        check_grads(
            lambda z: loss(z, labels),
            (jnp.asarray(logits, jnp.float64),),
            order=1,
            modes=("rev",),
            eps=1e-4,
        )


@pytest.mark.parametrize("value", [1e4, -1e4])
def test_extreme_logits_are_finite(value):
    z = jnp.full((2, 6, 6), value, jnp.float32).at[0, 0, 0].set(-value)
    y = jnp.array([1, 0])
    losses = {
        "max": lambda z: dm.max_pooling_loss(z, y),
        "la": lambda z: dm.label_assign_loss(z, y, 6),
        "sparse": lambda z: dm.sparse_loss(z, y, 1e-5),
        **{p: lambda z, p=p: jnp.sum(dm.bag_logits(z, pooling=p)) for p in dm.POOLINGS},
    }
    for name, f in losses.items():
        value_, grad = jax.value_and_grad(f)(z)
        assert np.isfinite(value_), name
        assert np.all(np.isfinite(grad)), name
    # noisy-OR of very negative logits: log(m) + z, not -inf
    np.testing.assert_allclose(
        dm.bag_logits(jnp.full((1, 36), -1e4), pooling="noisy_or"),
        [-1e4 + math.log(36)],
        rtol=1e-6,
    )
    # a confident wrong answer costs |z|, exactly
    np.testing.assert_allclose(dm.max_pooling_loss(jnp.full((1, 4), -1e4), jnp.array([1])), 1e4)


def test_jit_and_vmap():
    # three independent batches of five images, mapped with vmap over a jitted loss
    logits, _, mask = _case(10, shape=(3, 5, 2, 8), masked=True)
    labels = np.random.default_rng(10).integers(0, 2, (3, 5))
    jitted = jax.jit(dm.label_assign_loss, static_argnums=2)
    batched = jax.vmap(lambda z, y, m: jitted(z, y, 0.2, mask=m))(logits, labels, mask)
    for i in range(3):
        expected = ref_label_assign(logits[i], labels[i], 0.2, mask[i])
        np.testing.assert_allclose(batched[i], expected, rtol=1e-5)
    sparse = jax.jit(lambda z, y, m: dm.sparse_loss(z, y, 0.1, mask=m))
    np.testing.assert_allclose(
        sparse(logits[0], labels[0], mask[0]),
        ref_sparse(logits[0], labels[0], 0.1, mask[0]),
        rtol=1e-5,
    )


def test_fraction_rounds_up_and_tolerates_float_error():
    counts = jnp.array([30, 36, 7, 1])
    np.testing.assert_array_equal(dm.num_top_instances(0.1, counts, 36), [3, 4, 1, 1])
    np.testing.assert_array_equal(dm.num_top_instances(0.5, counts, 36), [15, 18, 4, 1])
    np.testing.assert_array_equal(dm.num_top_instances(6, counts, 36), [6, 6, 6, 1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dm.label_assign_loss(jnp.zeros((2, 36)), jnp.array([0, 1]), 37), "larger than"),
        (lambda: dm.label_assign_loss(jnp.zeros((2, 36)), jnp.array([0, 1]), 0), "at least 1"),
        (lambda: dm.label_assign_loss(jnp.zeros((2, 36)), jnp.array([0, 1]), 1.0), "in \\(0, 1\\)"),
        (lambda: dm.label_assign_loss(jnp.zeros((2, 36)), jnp.array([0, 1]), True), "positive int"),
        (lambda: dm.max_pooling_loss(jnp.zeros((2, 36)), jnp.array([0, 2])), "0 or 1"),
        (lambda: dm.max_pooling_loss(jnp.zeros((2, 36)), jnp.array([0, 1, 1])), "shaped \\(N,\\)"),
        (lambda: dm.max_pooling_loss(jnp.zeros((36,)), jnp.array([0])), "\\(N, m\\)"),
        (
            lambda: dm.sparse_loss(
                jnp.zeros((2, 4)), jnp.array([0, 1]), 0.1, mask=jnp.ones((2, 5), bool)
            ),
            "mask must have",
        ),
        (lambda: dm.bag_logits(jnp.zeros((2, 4)), pooling="median"), "pooling must be"),
    ],
)
def test_bad_arguments_fail_clearly(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_k_larger_than_m_fails_under_jit():
    with pytest.raises(ValueError, match="larger than"):
        jax.jit(lambda z, y: dm.label_assign_loss(z, y, 40))(jnp.zeros((2, 6, 6)), jnp.ones(2))


def test_l2_penalty():
    params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.full((2, 2), 3.0)}, "step": jnp.array(7)}
    np.testing.assert_allclose(dm.l2_penalty(params), 0.5 * (1 + 4 + 4 * 9))
    g = jax.grad(dm.l2_penalty)({"w": jnp.array([1.5, -2.0])})
    np.testing.assert_allclose(g["w"], [1.5, -2.0])


def test_docstrings_document_shapes_and_equations():
    doc = dm.label_assign_loss.__doc__
    assert "Eq. 5-6" in doc and "(N, H, W)" in doc and "Example" in doc


def test_l2_penalty_is_a_float32_scalar_for_any_params():
    """Docstring: a scalar in float32 at least; no floating leaf gives 0."""
    none = dm.l2_penalty({"step": jnp.array(7, jnp.int32)})
    assert none.shape == () and none.dtype == jnp.float32 and float(none) == 0.0
    assert dm.l2_penalty({}).dtype == jnp.float32
    # bfloat16 parameters are squared and summed in float32: 1 + 2^-7 squares exactly in float32
    # (1 + 2^-6 + 2^-14) but rounds to 1 + 2^-6 in bfloat16.
    half = dm.l2_penalty({"w": jnp.full((4,), 1 + 2**-7, jnp.bfloat16)})
    assert half.dtype == jnp.float32
    assert float(half) == 0.5 * 4 * (1 + 2**-7) ** 2


def test_noisy_or_with_only_very_unlikely_instances_matches_float64():
    """Noisy-OR around its small-t branch (sum of softplus < 1e-3), where log t is a log-sum-exp of
    log softplus(z): against 1 - prod(1 - r) computed in float64 with log1p/expm1."""
    z = np.array(
        [
            [-7.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # one valid instance: softplus(-7.5) = 5.5e-4
            [-19.0, -17.5, -16.0, -14.0, -12.0, -10.0],
            [-9.0, -9.5, -11.0, -13.0, -15.0, -18.0],
            [-1.5, -3.0, 0.0, 0.0, 0.0, 0.0],  # t = 0.25: the other branch, log(1 - e^-t) + t
            [-7.0, -7.0, 0.0, 0.0, 0.0, 0.0],  # t = 1.8e-3, just above the switch at 1e-3
        ],
        np.float32,
    )
    mask = np.ones(z.shape, bool)
    mask[0, 1:] = False
    mask[3:, 2:] = False
    expected = []
    for row, keep in zip(z.astype(np.float64), mask, strict=True):
        log_q = np.sum(np.log1p(-1.0 / (1.0 + np.exp(-row[keep]))))  # log prod(1 - r)
        p = -np.expm1(log_q)
        expected.append(np.log(p) - log_q)  # logit p = log p - log(1 - p)
    got = dm.bag_logits(jnp.asarray(z), mask=jnp.asarray(mask), pooling="noisy_or")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6)


def test_num_top_instances_returns_int32_and_refuses_a_zero_fraction():
    counts = jnp.array([4, 6, 30, 36], jnp.int32)
    top = dm.num_top_instances(0.1, counts, 36)
    assert top.dtype == jnp.int32
    np.testing.assert_array_equal(top, [1, 1, 3, 4])  # ceil(0.4), ceil(0.6), 3 exactly, ceil(3.6)
    assert dm.num_top_instances(6, counts, 36).dtype == jnp.int32
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            dm.num_top_instances(bad, counts, 36)


def test_num_top_instances_is_at_least_one_and_at_most_the_count():
    counts = jnp.array([1, 0, 3], jnp.int32)  # 0: a bag with no valid instance left
    np.testing.assert_array_equal(dm.num_top_instances(1e-5, counts, 36), [1, 0, 1])
    np.testing.assert_array_equal(dm.num_top_instances(0.99, counts, 36), [1, 0, 3])
    np.testing.assert_array_equal(dm.num_top_instances(2, counts, 36), [1, 0, 2])


def test_bag_logits_defaults_are_max_pooling_and_temperature_one():
    z = jnp.array([[0.0, 2.0, -1.0], [3.0, -2.0, 1.0]])
    np.testing.assert_array_equal(dm.bag_logits(z), [2.0, 3.0])
    lse = [math.log(np.mean(np.exp(row))) for row in np.asarray(z, np.float64)]  # T = 1
    np.testing.assert_allclose(dm.bag_logits(z, pooling="lse"), lse, rtol=1e-6)


def test_lse_pooling_refuses_zero_temperature_and_keeps_bfloat16():
    z = jnp.array([[0.5, -1.0, 2.0]])
    with pytest.raises(ValueError, match="temperature"):
        dm.bag_logits(z, pooling="lse", temperature=0.0)
    half = dm.bag_logits(z.astype(jnp.bfloat16), pooling="lse")
    assert half.dtype == jnp.bfloat16
