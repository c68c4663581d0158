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


# ---- k chosen per image: extent estimate, soft top-k, adaptive label assignment ----------------
def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_extent(logits, mask):
    out = []
    for n in range(len(logits)):
        r = _np_sigmoid(_valid(logits, mask, n))
        out.append(min(max(r.sum(), 1.0), len(r)))  # expected count, clipped to [1, m_n]
    return np.array(out)


def ref_fractional_top(logits, mask, ks):
    """Per bag: 1 on the floor(k) largest logits, k - floor(k) on the next, 0 elsewhere."""
    out = np.zeros(logits.shape, np.float64).reshape(len(logits), -1)
    for n, k in enumerate(ks):
        keep = np.ones(out.shape[1], bool) if mask is None else np.asarray(mask[n]).ravel()
        idx = np.flatnonzero(keep)[np.argsort(-np.asarray(logits[n]).ravel()[keep])]
        whole = int(math.floor(k))
        out[n, idx[:whole]] = 1.0
        if whole < len(idx):
            out[n, idx[whole]] = k - whole
    return out.reshape(logits.shape)


@pytest.mark.parametrize("masked", [False, True])
def test_extent_k_is_the_clipped_sum_of_probabilities(masked):
    logits, _, mask = _case(11, shape=(6, 3, 4), masked=masked, scale=3.0)
    logits[2] = -20.0  # sum ~ 0: clipped up to 1
    logits[3] = 20.0  # sum = m_n: the count
    np.testing.assert_allclose(dm.extent_k(logits, mask=mask), ref_extent(logits, mask), rtol=1e-5)
    # hand computation: 0.5 + 0.5 + sigmoid(ln 3) = 0.75 + sigmoid(-ln 3) = 0.25 -> 2.0
    z = np.array([[0.0, 0.0, math.log(3.0), -math.log(3.0)]], np.float32)
    np.testing.assert_allclose(dm.extent_k(z), [2.0], rtol=1e-6)
    # no gradient: it chooses labels
    assert not np.any(jax.grad(lambda z: dm.extent_k(z).sum())(jnp.asarray(logits)))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 3, 2.4, 5.75])
def test_soft_top_k_tends_to_the_hard_top_k(k, masked):
    rng = np.random.default_rng(12)
    # distinct logits at least 0.05 apart, so that T = 1e-3 separates them by 50 temperatures
    logits = np.stack([rng.permutation(np.linspace(-4, 4, 12)) for _ in range(4)]).astype(
        np.float32
    )
    mask = None
    if masked:
        mask = np.ones(logits.shape, bool)
        mask[:, -4:] = False  # 8 valid instances per bag
        logits[:, -4:] = 50.0  # padding with the largest logits must not be chosen
    hard = ref_fractional_top(logits, mask, [k] * 4)
    soft = dm.soft_top_k(logits, k, temperature=1e-3, mask=mask)
    # a fractional boundary member moves by (float32 ulp of tau ~ 5e-7) * s' / T ~ 1e-4
    np.testing.assert_allclose(soft, hard, atol=1e-5 if k == int(k) else 2e-4)
    # at any temperature the memberships sum to k, and move away from the indicator as T grows
    errors = []
    for t in (0.05, 0.5, 2.0):
        s = np.asarray(dm.soft_top_k(logits, k, temperature=t, mask=mask), np.float64)
        np.testing.assert_allclose(s.sum(axis=1), k, rtol=1e-4)
        assert np.all((s >= 0) & (s <= 1))
        if masked:
            assert np.all(s[:, -4:] == 0)
        errors.append(np.abs(s - hard).max())
    assert errors[0] < errors[1] < errors[2]


def test_soft_top_k_gradients_are_the_implicit_ones():
    # against finite differences of the whole bisection (x64), in the logits, k and T
    rng = np.random.default_rng(13)
    logits = rng.standard_normal((3, 7))
    mask = np.ones((3, 7), bool)
    mask[1, 5:] = False
    weights = rng.standard_normal((3, 7))
    with jax.enable_x64(True):

        def f(z, k, t):
            s = dm.soft_top_k(z, k, temperature=t, mask=mask, iterations=200)
            return jnp.sum(s * weights)

        args = (jnp.asarray(logits), jnp.array([2.5, 1.3, 4.0]), jnp.asarray(0.7))
        check_grads(f, args, order=1, modes=("rev",), eps=1e-5)
        # padding gets no gradient
        assert np.all(np.asarray(jax.grad(f)(*args))[1, 5:] == 0)


def ref_soft_top_k(logits, mask, ks, temperature):
    """sigmoid((z - tau) / T) with tau the root of sum_j sigmoid((z_j - tau) / T) = k, found by
    scipy's Brent method in float64, one bag at a time."""
    from scipy.optimize import brentq

    out = np.zeros(np.shape(logits), np.float64).reshape(len(logits), -1)
    for n, k in enumerate(ks):
        z = _valid(logits, mask, n)
        keep = np.ones(out.shape[1], bool) if mask is None else np.asarray(mask[n]).ravel()
        excess = lambda tau, z=z, k=k: _np_sigmoid((z - tau) / temperature).sum() - k  # noqa: E731
        bound = 50.0 * temperature
        tau = brentq(excess, z.min() - bound, z.max() + bound, xtol=1e-12)
        out[n, keep] = _np_sigmoid((z - tau) / temperature)
    return out.reshape(np.shape(logits))


@pytest.mark.parametrize("masked", [False, True])
def test_soft_top_k_matches_a_root_finder_at_moderate_temperatures(masked):
    # away from the hard limit, where every membership is strictly inside (0, 1); without a
    # temperature it is T = 1, the documented default
    logits, _, mask = _case(25, shape=(4, 2, 5), masked=masked)
    ks = np.array([2.5, 1.0, 0.4, 3.2])
    np.testing.assert_allclose(
        dm.soft_top_k(logits, ks, mask=mask), ref_soft_top_k(logits, mask, ks, 1.0), atol=2e-6
    )
    np.testing.assert_allclose(
        dm.soft_top_k(logits, 1.5, temperature=0.3, mask=mask),
        ref_soft_top_k(logits, mask, [1.5] * 4, 0.3),
        atol=2e-6,
    )


def test_soft_top_k_threshold_reaches_float32_resolution_for_logits_of_1e4():
    """Docstring: 60 halvings reach float32 resolution for logits of +-1e4. There a float32
    threshold moves by ~1e-3 per ulp, a whole temperature at T = 1e-3, so the sum cannot be k
    exactly: it must lie between the sums (float64) at the float32 thresholds one ulp either side
    of the pair that brackets the exact threshold (Brent's method in float64)."""
    from scipy.optimize import brentq

    rng = np.random.default_rng(27)
    t = 1e-3
    logits = (1e4 * rng.standard_normal((8, 36))).astype(np.float32)
    ks = np.array([27.47, 0.01, 3.5, 12.3, 0.43, 5.6, 20.2, 33.9])
    got = np.asarray(dm.soft_top_k(logits, ks, temperature=t), np.float64).sum(axis=1)
    down, up = np.float32(-np.inf), np.float32(np.inf)
    for z, k, total in zip(logits.astype(np.float64), ks, got, strict=True):

        def excess(tau, z=z, k=k):
            return 0.5 * np.sum(1.0 + np.tanh((z - tau) / (2 * t))) - k  # sigmoid via tanh

        exact = brentq(excess, z.min() - 50 * t, z.max() + 50 * t, xtol=1e-300)
        below = np.float32(exact)
        below = below if below <= exact else np.nextafter(below, down)  # float32 <= exact
        above = np.nextafter(below, up)
        lowest = excess(float(np.nextafter(above, up))) + k
        highest = excess(float(np.nextafter(below, down))) + k
        assert lowest - 1e-4 <= total <= highest + 1e-4, (k, lowest, total, highest)


def test_integer_logits_are_refused():
    """Integer scores would sort and pool without complaint (bag_logits would return ints)."""
    z = jnp.array([[0, 2, -1]], jnp.int32)
    with pytest.raises(TypeError, match="instance_logits must be a float array"):
        dm.bag_logits(z)
    with pytest.raises(TypeError, match="instance_logits must be a float array"):
        dm.max_pooling_loss(z, jnp.array([1]))


def test_float32_inputs_keep_float32_under_x64():
    """With x64 enabled JAX's default float is float64; the functions documented as float32
    (float64 for float64 logits), and the losses, must not turn float32 logits into float64,
    even given float64 numpy k and temperature, as a caller's x64 code would pass them."""
    rng = np.random.default_rng(26)
    z = rng.standard_normal((3, 8)).astype(np.float32)
    scores = rng.standard_normal((3, 8)).astype(np.float32)
    y = np.array([1, 0, 1])
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            zz, ss = jnp.asarray(z, dtype), jnp.asarray(scores, dtype)
            member = dm.soft_top_k(zz, np.array([2.5, 1.0, 4.0]), temperature=np.float64(0.5))
            assert member.dtype == dtype
            bag, weights = dm.attention_pooling(zz, ss)
            assert bag.dtype == dtype and weights.dtype == dtype
            assert dm.extent_k(zz).dtype == dtype and dm.relative_extent_k(zz).dtype == dtype
            for k in (3, 0.25, *dm.AUTO_K):
                assert dm.label_assign_loss(zz, y, k).dtype == dtype, k
            assert dm.max_pooling_loss(zz, y).dtype == dtype


@pytest.mark.parametrize("masked", [False, True])
def test_auto_k_extent_is_label_assignment_with_each_images_rounded_extent(masked):
    logits, labels, mask = _case(14, shape=(6, 3, 3), masked=masked, scale=3.0)
    ks = ref_extent(logits, mask)
    total, count = 0.0, 0
    for n in range(len(labels)):  # one image at a time: the fixed-k reference with k = round(K_n)
        one = None if mask is None else mask[n : n + 1]
        valid = len(_valid(logits, mask, n))
        total += valid * ref_label_assign(
            logits[n : n + 1], labels[n : n + 1], int(round(ks[n])), one
        )
        count += valid
    got = dm.adaptive_label_assign_loss(logits, labels, mask=mask)
    np.testing.assert_allclose(got, total / count, rtol=1e-5)
    np.testing.assert_allclose(dm.label_assign_loss(logits, labels, "auto", mask=mask), got)
    assert any(round(k) > 1 for k in ks) and any(round(k) != round(ks[0]) for k in ks)


def test_auto_k_soft_tends_to_the_fractional_extent_assignment():
    logits, labels, mask = _case(15, shape=(5, 12), masked=True, scale=3.0)
    ks = ref_extent(logits, mask)
    targets = labels[:, None] * ref_fractional_top(logits, mask, ks)
    z = logits.astype(np.float64)
    bce = -(targets * np.log(_np_sigmoid(z)) + (1 - targets) * np.log(_np_sigmoid(-z)))
    expected = bce[mask].sum() / mask.sum()
    got = dm.adaptive_label_assign_loss(logits, labels, method="soft", temperature=1e-3, mask=mask)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # the default temperature gives another loss, and "auto_soft" is that one
    default = dm.adaptive_label_assign_loss(logits, labels, method="soft", mask=mask)
    assert abs(float(default) - expected) > 1e-3
    np.testing.assert_allclose(
        dm.label_assign_loss(logits, labels, "auto_soft", mask=mask), default
    )


@pytest.mark.parametrize("method", ["extent", "soft"])
@pytest.mark.parametrize("value", [1e4, -1e4])
def test_auto_k_is_finite_at_extreme_logits_and_works_under_jit_and_vmap(method, value):
    z = jnp.full((2, 6, 6), value, jnp.float32).at[0, 0, 0].set(-value)
    y = jnp.array([1, 0])
    loss = jax.jit(lambda z, y: dm.adaptive_label_assign_loss(z, y, method=method))
    v, g = jax.value_and_grad(loss)(z, y)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    # a batch of batches through vmap equals the loss of each batch
    logits, _, mask = _case(16, shape=(3, 4, 9), masked=True)
    labels = np.random.default_rng(16).integers(0, 2, (3, 4))
    f = lambda z, y, m: dm.adaptive_label_assign_loss(z, y, method=method, mask=m)  # noqa: E731
    batched = jax.vmap(f)(logits, labels, mask)
    for i in range(3):
        np.testing.assert_allclose(batched[i], f(logits[i], labels[i], mask[i]), rtol=1e-5)


def test_auto_k_assignment_carries_no_gradient_and_negatives_are_plain_bce():
    # all-negative images: every target is 0 whatever k, so the loss is the mean softplus
    logits, _, _ = _case(17, shape=(4, 9))
    zeros = np.zeros(4, int)
    mean_bce = np.mean(np.log1p(np.exp(logits.astype(np.float64))))
    for method in ("extent", "soft"):
        got = dm.adaptive_label_assign_loss(logits, zeros, method=method)
        np.testing.assert_allclose(got, mean_bce, rtol=1e-5)
    # the gradient is that of the BCE with fixed targets: sigmoid(z) - t, over the N m instances
    ones = np.ones(4, int)
    with jax.enable_x64(True):
        z = jnp.asarray(logits, jnp.float64)
        member = np.asarray(dm.soft_top_k(z, dm.extent_k(z), temperature=0.25))
        g = jax.grad(lambda z: dm.adaptive_label_assign_loss(z, ones, method="soft"))(z)
        np.testing.assert_allclose(g, (_np_sigmoid(logits) - member) / logits.size, atol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: dm.adaptive_label_assign_loss(jnp.zeros((2, 4)), jnp.ones(2), method="x"),
            "method",
        ),
        (
            lambda: dm.adaptive_label_assign_loss(
                jnp.zeros((2, 4)), jnp.ones(2), method="soft", temperature=0.0
            ),
            "temperature",
        ),
        (lambda: dm.label_assign_loss(jnp.zeros((2, 4)), jnp.ones(2), "automatic"), "auto"),
        (
            lambda: dm.attention_pooling(jnp.zeros((2, 4)), jnp.zeros((2, 5))),
            "attention_logits must have",
        ),
        (lambda: dm.bag_loss(jnp.zeros((2, 4)), jnp.ones(2)), "shaped \\(N,\\)"),
    ],
)
def test_new_functions_refuse_bad_arguments(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ---- attention pooling, learned temperature, bag loss -------------------------------------------
def ref_attention(logits, scores, mask):
    bags, weights = [], []
    for n in range(len(logits)):
        z, s = _valid(logits, mask, n), _valid(scores, mask, n)
        a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        bags.append(float(a @ z))
        w = np.zeros(np.asarray(logits[n]).size)
        keep = np.ones(w.size, bool) if mask is None else np.asarray(mask[n]).ravel()
        w[keep] = a
        weights.append(w.reshape(np.shape(logits[n])))
    return np.array(bags), np.array(weights)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_pooling_matches_reference(masked):
    logits, _, mask = _case(18, shape=(5, 3, 4), masked=masked)
    scores = np.random.default_rng(18).standard_normal(logits.shape).astype(np.float32) * 3
    bag, weights = dm.attention_pooling(logits, scores, mask=mask)
    ref_bags, ref_weights = ref_attention(logits, scores, mask)
    np.testing.assert_allclose(bag, ref_bags, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-7)
    # limits: equal scores give the mean logit; one dominant score gives that instance's logit
    flat = dm.attention_pooling(logits, np.zeros_like(scores), mask=mask)[0]
    np.testing.assert_allclose(
        flat, [np.mean(_valid(logits, mask, n)) for n in range(5)], rtol=1e-5
    )
    peaked = np.where(np.arange(12).reshape(3, 4) == 0, 1e4, 0.0).astype(np.float32)
    peaked = np.broadcast_to(peaked, logits.shape)
    np.testing.assert_allclose(
        dm.attention_pooling(logits, peaked, mask=mask)[0], logits[:, 0, 0], rtol=1e-6
    )


@pytest.mark.parametrize("value", [1e4, -1e4])
def test_attention_pooling_is_finite_with_gradients(value):
    z = jnp.full((2, 6, 6), value).at[0, 0, 0].set(-value)
    s = jnp.full((2, 6, 6), -value).at[1, 2, 3].set(value)
    mask = jnp.ones((2, 6, 6), bool).at[:, 5].set(False)

    def loss(z, s):
        return dm.bag_loss(dm.attention_pooling(z, s, mask=mask)[0], jnp.array([1, 0]))

    v, (gz, gs) = jax.value_and_grad(loss, argnums=(0, 1))(z, s)
    assert np.isfinite(v) and np.all(np.isfinite(gz)) and np.all(np.isfinite(gs))
    assert np.all(np.asarray(gz)[:, 5] == 0) and np.all(np.asarray(gs)[:, 5] == 0)
    rng = np.random.default_rng(19)
    with jax.enable_x64(True):
        args = (jnp.asarray(rng.standard_normal((3, 5))), jnp.asarray(rng.standard_normal((3, 5))))
        check_grads(
            lambda z, s: jnp.sum(dm.attention_pooling(z, s)[0] ** 2), args, order=1, modes=("rev",)
        )


def test_bag_loss_is_eq4_for_any_bag_logits():
    logits, labels, mask = _case(20, shape=(6, 8), masked=True)
    np.testing.assert_allclose(
        dm.bag_loss(dm.bag_logits(logits, mask=mask), labels),
        ref_max_pooling(logits, labels, mask),
        rtol=1e-5,
    )
    bag = np.array([2.0, -1.0, 0.5], np.float32)
    y = np.array([1, 0, 0])
    expected = np.mean(
        [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    )
    np.testing.assert_allclose(dm.bag_loss(bag, y), expected, rtol=1e-6)


def test_lse_pooling_takes_a_traced_learned_temperature():
    logits, _, mask = _case(21, shape=(4, 9), masked=True)

    @jax.jit
    def pooled(log_t):
        return dm.bag_logits(logits, mask=mask, pooling="lse", temperature=jnp.exp(log_t))

    for t in (0.3, 4.0):
        np.testing.assert_allclose(
            pooled(math.log(t)), ref_bag(logits, mask, "lse", temperature=t), rtol=1e-5
        )
    # the temperature's gradient is finite and moves the pooling between mean and max
    g = jax.grad(lambda lt: pooled(lt).sum())(0.0)
    assert np.isfinite(g) and g > 0  # sharper pooling raises every bag logit towards the max


def ref_relative_extent(logits, mask):
    out = []
    for n in range(len(logits)):
        r = _np_sigmoid(_valid(logits, mask, n))
        out.append(min(max(r.sum() / r.max(), 1.0), len(r)))
    return np.array(out)


@pytest.mark.parametrize("masked", [False, True])
def test_relative_extent_counts_instances_as_probable_as_the_top_one(masked):
    logits, labels, mask = _case(23, shape=(8, 3, 4), masked=masked, scale=3.0)
    logits[0] = 0.5  # all alike: every valid instance counts
    expected = ref_relative_extent(logits, mask)
    got = dm.relative_extent_k(logits, mask=mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert expected[0] == len(_valid(logits, mask, 0))
    # where every probability is tiny (computed in log space, not as 0 / 0)
    np.testing.assert_allclose(
        dm.relative_extent_k(logits - 30.0, mask=mask),
        ref_relative_extent(logits - 30.0, mask),
        rtol=1e-5,
    )
    # finite at the extremes, where r underflows (K = m when all are equal, 1 for one at the top)
    z = jnp.full((2, 6), -1e4).at[1, 2].set(1e4)
    np.testing.assert_allclose(dm.relative_extent_k(z), [6.0, 1.0])
    # no gradient: like extent_k, it chooses labels
    assert not np.any(jax.grad(lambda z: dm.relative_extent_k(z, mask=mask).sum())(logits))
    # the loss: label assignment with k_n = round(K_n), one image at a time
    total, count = 0.0, 0
    for n in range(len(labels)):
        one = None if mask is None else mask[n : n + 1]
        valid = len(_valid(logits, mask, n))
        total += valid * ref_label_assign(
            logits[n : n + 1], labels[n : n + 1], int(round(expected[n])), one
        )
        count += valid
    got = dm.label_assign_loss(logits, labels, "auto_relative", mask=mask)
    np.testing.assert_allclose(got, total / count, rtol=1e-5)
    v, g = jax.value_and_grad(
        lambda z: dm.adaptive_label_assign_loss(z, labels, method="relative", mask=mask)
    )(jnp.full(logits.shape, -1e4).at[0, 0, 0].set(1e4))
    assert np.isfinite(v) and np.all(np.isfinite(g))


def test_the_registry_knows_the_same_auto_k_values():
    from deepmil_jax import registry

    assert registry.AUTO_K == dm.AUTO_K


def test_docstring_examples_give_what_they_show():
    """help(deepmil_jax.losses...) shows worked examples; each must print what it claims."""
    import doctest

    from deepmil_jax import losses

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for name in losses.__all__:  # the public functions only (not mutation testing's copies)
        for test in finder.find(getattr(losses, name), name, globs=vars(losses).copy()):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 10 and result.failed == 0
