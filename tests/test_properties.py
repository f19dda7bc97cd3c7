"""Property-based tests (hypothesis): GMA over shapes, dtypes, masks and parameter regimes.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size, K components.

Every example is a random GMA problem: shapes down to N = K = d = e = 1 and up to B*H = 32
sequences (of few tokens), float32 or float64, key masks with sequences that are all padding,
and regimes from narrow to wide components (log-variances -14..6), data at scale 1e-3..30,
means on or far from the data, temperatures 0.05..50, scalar or per head. Checked:

- the fast gma (forward and every gradient) against the dense N x N reference, causal and
  bidirectional, row and slot;
- causality: tokens at and after t change nothing before t, bit for bit;
- gma_recurrent in two chunks and gma_step token by token against the causal forward;
- responsibilities: rows sum to 1, and match the broadcasting reference;
- wild input (non-finite, overflowing, wrong type, shape or cache): a ValueError, TypeError
  or FloatingPointError naming the argument, or a finite answer that is right.

Tolerances follow the conditioning of the problem. The exponent l/tau of a responsibility
carries a rounding error of a few eps_64 |l| / tau in any float64 evaluation, the dense
reference's included, and the responsibilities inherit it as relative error; so two right
evaluations may differ by about eps_64 * COND, COND = 1 + max over points of the
responsibility-weighted |l| / tau (`_conditioning`). A gradient is a sum of terms that may
cancel (near one-hot routing cancels dr - <r, dr> almost exactly), so its error is judged
against the sizes of its terms (`_term_sizes`, the same sums with every term made
positive), as the random mode of gradcheck judges a dot product. Where the tolerance this
gives exceeds MEANINGLESS_TOL, a comparison could not tell a bug from rounding, and it is
not made (finiteness still is).

Settings: a fixed number of examples per test, no deadline (the first example waits for
Numba), derandomized when the CI environment variable is set (tests/conftest.py).
"""

import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

import gma_np  # noqa: E402
from gma_np._numerics import RTOL_EXACT  # noqa: E402
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward  # noqa: E402
from gma_np.mixers.gma.reference.routing import (  # noqa: E402
    _full_log_var,
    log_density_naive,
    log_likelihood_naive,
    responsibilities_naive,
)
from tests.conftest import make_problem  # noqa: E402

EPS64 = np.finfo(np.float64).eps
# Multiple of eps_64 * COND allowed between two right evaluations. Measured over 2,700
# examples of every regime: the difference, in units of (eps of the dtype + eps_64 COND)
# times the sizes, stayed under 0.5; the margin covers longer sums over N, K and d.
COND_FACTOR = 64.0
# Beyond this relative tolerance a comparison proves nothing: it is skipped.
MEANINGLESS_TOL = 1e-3
# Names an error message may start with or mention: the argument at fault.
ARGUMENTS = ("q", "k", "v", "means", "log_var", "logits", "temperature", "eps", "key_mask",
             "norm", "causal", "do", "cache", "x", "state", "gma", "responsibilities")


# ---------------------------------------------------------------------------------- problems

def _sizes():
    """(B, H, N, d, e, K): each of N, d, e, K often 1; B * H up to 32 with few tokens."""
    small = st.one_of(st.just(1), st.integers(1, 5))
    many_sequences = st.tuples(st.integers(2, 4), st.integers(4, 8), st.integers(1, 4),
                               small, small, small)
    few_sequences = st.tuples(st.integers(1, 3), st.integers(1, 3),
                              st.one_of(st.just(1), st.integers(1, 9)), small, small, small)
    return st.one_of(few_sequences, many_sequences)


@st.composite
def problems(draw):
    """A GMA problem: (inputs for gma, key_mask, description for the failure message)."""
    B, H, N, d, e, K = draw(_sizes())
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    param_dtype = draw(st.sampled_from([np.float64, dtype]))
    log_var_center = draw(st.floats(-14.0, 6.0))
    scale = 10.0 ** draw(st.floats(-3.0, np.log10(30.0)))
    tau = 10.0 ** draw(st.floats(np.log10(0.05), np.log10(50.0)))
    means_far = draw(st.booleans())
    spherical = draw(st.booleans())
    per_head = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["none", "random", "some sequences all padding"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    means = scale * rng.standard_normal((H, K, d)) * (10.0 if means_far else 1.0)
    log_var = log_var_center + 0.3 * rng.standard_normal((H, K) if spherical else (H, K, d))
    temperature = tau * np.exp(0.2 * rng.standard_normal(H)) if per_head else tau
    inputs = dict(
        q=(scale * rng.standard_normal((B, H, N, d))).astype(dtype),
        k=(scale * rng.standard_normal((B, H, N, d))).astype(dtype),
        v=rng.standard_normal((B, H, N, e)).astype(dtype),
        means=means.astype(param_dtype), log_var=log_var.astype(param_dtype),
        logits=(0.5 * rng.standard_normal((H, K))).astype(param_dtype),
        temperature=temperature.astype(param_dtype) if per_head else float(temperature))
    mask = None
    if mask_kind != "none":
        mask = rng.random((B, N)) < 0.7
        if mask_kind == "some sequences all padding":
            mask[rng.random(B) < 0.5] = False
            mask[0] = False
    about = (f"B={B} H={H} N={N} d={d} e={e} K={K} {np.dtype(dtype).name} params "
             f"{np.dtype(param_dtype).name}, log_var ~ {log_var_center:.3g}, scale {scale:.3g}, "
             f"tau {tau:.3g}{' per head' if per_head else ''}, means {'far' if means_far else 'near'}, "
             f"{'spherical' if spherical else 'diag'}, mask {mask_kind}, seed {seed}")
    return inputs, mask, about


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _tau(inputs):
    return np.broadcast_to(_f64(inputs["temperature"]), (np.shape(inputs["means"])[0],))


def _routing(x, inputs):
    """(l, a = l / tau, r) of the points x (B, H, N, d), in float64, by the reference."""
    l = log_density_naive(_f64(x), _f64(inputs["means"]), _f64(inputs["log_var"]), _f64(inputs["logits"]))
    a = l / _tau(inputs)[:, None, None]
    return l, a, np.exp(a - logsumexp(a, axis=-1, keepdims=True))


def _conditioning(inputs):
    """COND = 1 + max over the points of q and k of (max_k r |l| + sum_k r |l|) / tau."""
    cond = 1.0
    for name in ("q", "k"):
        l, _, r = _routing(inputs[name], inputs)
        weighted = (r * np.abs(l)).max(-1) + (r * np.abs(l)).sum(-1)          # (B, H, N)
        cond = max(cond, 1.0 + float((weighted / _tau(inputs)[:, None]).max()))
    return cond


def _tolerance(dtype, cond):
    return RTOL_EXACT[np.dtype(dtype)] + COND_FACTOR * EPS64 * cond


def _term_sizes(inputs, do, causal, norm, key_mask, eps=1e-6):
    """For every gradient of gma, the sum of the absolute values of the terms it sums.

    The backward of gma_np/mixers/gma/reference/dense.py, with every term taken positive:
    |do| and |v| for do and v, the positive factors (r, A, W, 1/den) as they are.
    """
    q, v = _f64(inputs["q"]), _f64(inputs["v"])
    B, H, N, d = q.shape
    tau = _tau(inputs)
    mask = np.ones((B, N)) if key_mask is None else key_mask.astype(np.float64)
    routed = {n: _routing(inputs[n], inputs) for n in ("q", "k")}
    rq, rk = routed["q"][2], routed["k"][2] * mask[:, None, :, None]          # (B, H, N, K)
    do, v_abs = np.abs(_f64(do)), np.abs(v)
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    s_drq, s_drk, s_dv = np.empty(rq.shape), np.empty(rk.shape), np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            Rq, Rk, Do = rq[b, h], rk[b, h], do[b, h]
            if norm == "slot":
                W = 1.0 / (L @ Rk + eps)                                      # (N, K)
                A = ((Rq * W) @ Rk.T) * L
                s_dA = (Do @ v_abs[b, h].T) * L
                s_dU = s_dA @ Rk
                s_dv[b, h] = A.T @ Do
                s_drq[b, h] = s_dU * W
                s_drk[b, h] = s_dA.T @ (Rq * W) + L.T @ (s_dU * Rq * W * W)
            else:
                A = (Rq @ Rk.T) * L
                den = A.sum(1, keepdims=True) + eps                           # (N, 1)
                O = np.abs((A @ v[b, h]) / den)
                s_dA = (Do @ v_abs[b, h].T + (Do * O).sum(1, keepdims=True)) / den * L
                s_dv[b, h] = A.T @ (Do / den)
                s_drq[b, h] = s_dA @ Rk
                s_drk[b, h] = s_dA.T @ Rq
    s_drk *= mask[:, None, :, None]
    lv = _full_log_var(_f64(inputs["log_var"]), d)                             # (H, K, d)
    sizes, params = {"v": s_dv}, {}
    for name, s_dr in (("q", s_drq), ("k", s_drk)):
        _, a, r = routed[name]
        s_da = r * (s_dr + (r * s_dr).sum(-1, keepdims=True))                 # (B, H, N, K)
        s_dl = s_da / tau[:, None, None]
        diff = np.abs(_f64(inputs[name])[..., :, None, :] - _f64(inputs["means"])[:, None, :, :])
        w = diff * np.exp(-lv)[:, None]                                        # (B, H, N, K, d)
        sizes[name] = (s_dl[..., None] * w).sum(-2)
        for key, value in (("means", (s_dl[..., None] * w).sum(axis=(0, 2))),
                           ("log_var", 0.5 * (s_dl[..., None] * (diff * w + 1.0)).sum(axis=(0, 2))),
                           ("log_pi", s_dl.sum(axis=(0, 2))),
                           ("temperature", (s_da * np.abs(a)).sum(axis=(0, 2, 3)) / tau)):
            params[key] = params.get(key, 0.0) + value
    logits = _f64(inputs["logits"])
    pi = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    sizes["means"] = params["means"]
    sizes["log_var"] = params["log_var"] if np.ndim(inputs["log_var"]) == 3 else params["log_var"].sum(-1)
    sizes["logits"] = params["log_pi"] + pi * params["log_pi"].sum(-1, keepdims=True)
    sizes["temperature"] = params["temperature"]
    return sizes


def _assert_within(name, got, ref, sizes, tol, dtype, about):
    """max |got - ref| <= tol * max(sizes + |ref|), plus the dtype's underflow threshold
    (a float32 responsibility below it is flushed, and what it carries with it)."""
    got, ref, sizes = _f64(got), _f64(ref), np.abs(_f64(sizes))
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, reference {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: not finite where the reference is ({about})"
    err = np.abs(got - ref)
    scale = float(np.max(sizes + np.abs(ref)))
    bound = tol * scale + np.finfo(dtype).tiny * (1.0 + scale)
    worst = np.unravel_index(np.argmax(err), err.shape) if err.ndim else ()
    assert err.max() <= bound, (f"{name}: |fast - reference| = {err.max():.3e} > {bound:.3e} "
                                f"(tol {tol:.2e} x scale {scale:.3e}) at {worst}: fast {got[worst]!r}, "
                                f"reference {ref[worst]!r}; {about}")


def _reference(fn, *args, **kwargs):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------- properties

@settings(max_examples=150)
@given(problem=problems(), causal=st.booleans(), norm=st.sampled_from(["row", "slot"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_fast_gma_matches_the_dense_reference(problem, causal, norm, seed):
    inputs, mask, about = problem
    about = f"{'causal' if causal else 'bidirectional'} {norm}, {about}"
    opts = dict(causal=causal, norm=norm, key_mask=mask)
    dtype = inputs["q"].dtype
    o, cache = gma_np.gma_forward(**inputs, **opts)
    assert o.dtype == dtype and o.shape == inputs["v"].shape
    do = np.random.default_rng(seed).standard_normal(o.shape).astype(dtype)
    grads = gma_np.gma_backward(do, cache)
    tol = _tolerance(dtype, _conditioning(inputs))
    assert np.isfinite(o).all(), f"o: not finite ({about})"
    for name, g in grads.items():
        assert np.isfinite(g).all(), f"d{name}: not finite ({about})"
    if tol > MEANINGLESS_TOL:
        return
    # o is a weighted mean of the rows of v (row) or a sum with weights <= 1 (slot): |v| sizes it
    o_sizes = np.broadcast_to(np.abs(_f64(inputs["v"])).max(), o.shape)
    _assert_within("o", o, _reference(gma_dense, **inputs, **opts), o_sizes, tol, dtype, about)
    ref = _reference(gma_dense_backward, _f64(do), **inputs, **opts)
    sizes = _reference(_term_sizes, inputs, do, causal, norm, mask)
    for name in ref:
        assert np.shape(grads[name]) == np.shape(inputs[name]), f"d{name}: shape"
        _assert_within(f"d{name}", grads[name], ref[name], sizes[name], tol, dtype, about)


@settings(max_examples=80)
@given(problem=problems(), norm=st.sampled_from(["row", "slot"]), data=st.data())
def test_tokens_from_t_on_change_nothing_before_t(problem, norm, data):
    inputs, mask, about = problem
    B, H, N, _ = inputs["q"].shape
    t = data.draw(st.integers(0, N - 1), label="t")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    changed = dict(inputs)
    for name in ("q", "k", "v"):
        a = inputs[name].copy()
        a[:, :, t:] = (rng.standard_normal(a[:, :, t:].shape) * np.abs(a).max()).astype(a.dtype)
        changed[name] = a
    changed_mask = None if mask is None else mask.copy()
    if mask is not None:
        changed_mask[:, t:] = ~changed_mask[:, t:]
    o_a, cache_a = gma_np.gma_forward(**inputs, causal=True, norm=norm, key_mask=mask)
    o_b, cache_b = gma_np.gma_forward(**changed, causal=True, norm=norm, key_mask=changed_mask)
    assert np.array_equal(o_a[:, :, :t], o_b[:, :, :t]), f"an output before t={t} changed ({about})"
    do = np.zeros(o_a.shape, dtype=o_a.dtype)
    do[:, :, :t] = rng.standard_normal((B, H, t, o_a.shape[3]))
    g_a, g_b = gma_np.gma_backward(do, cache_a), gma_np.gma_backward(do, cache_b)
    for name in ("q", "k", "v"):
        assert np.array_equal(g_a[name][:, :, :t], g_b[name][:, :, :t]), f"d{name} before t={t} changed"
        assert not np.any(g_a[name][:, :, t:]), f"d{name} at or after t={t} is not zero ({about})"
    for name in ("means", "log_var", "logits", "temperature"):
        assert np.array_equal(g_a[name], g_b[name]), f"d{name} changed with the tokens from t={t} on"


@settings(max_examples=80)
@given(problem=problems(), norm=st.sampled_from(["row", "slot"]), data=st.data())
def test_decoding_equals_the_causal_forward(problem, norm, data):
    inputs, mask, about = problem
    N = inputs["q"].shape[2]
    dtype = inputs["q"].dtype
    split = data.draw(st.integers(1, N), label="split")
    params = {n: inputs[n] for n in ("means", "log_var", "logits")}
    opts = dict(norm=norm, temperature=inputs["temperature"])
    full = gma_np.gma(**inputs, causal=True, norm=norm, key_mask=mask)
    tol = _tolerance(dtype, _conditioning(inputs))
    if tol > MEANINGLESS_TOL:
        tol = np.inf                                    # finiteness and shapes only
    sizes = np.broadcast_to(np.abs(_f64(inputs["v"])).max(), full.shape)

    def part(lo, hi):
        return [inputs[n][:, :, lo:hi] for n in ("q", "k", "v")]

    chunks, state = [], None
    for lo, hi in ((0, split), (split, N)):
        if lo == hi:
            continue
        o, state = gma_np.gma_recurrent(*part(lo, hi), **params, state=state, **opts,
                                        key_mask=None if mask is None else mask[:, lo:hi])
        chunks.append(o)
    _assert_within("gma_recurrent", np.concatenate(chunks, axis=2), full, sizes, tol, dtype, about)
    state, steps = None, []
    for t in range(N):
        o_t, state = gma_np.gma_step(inputs["q"][:, :, t], inputs["k"][:, :, t], inputs["v"][:, :, t],
                                     **params, state=state, **opts,
                                     key_mask_t=None if mask is None else mask[:, t])
        assert o_t.dtype == dtype
        steps.append(o_t)
    _assert_within("gma_step", np.stack(steps, axis=2), full, sizes, tol, dtype, about)


@settings(max_examples=120)
@given(problem=problems())
def test_responsibilities_sum_to_one_and_match_the_reference(problem):
    inputs, _, about = problem
    x, dtype = inputs["q"], inputs["q"].dtype
    K = inputs["means"].shape[1]
    args = (inputs["means"], inputs["log_var"], inputs["logits"])
    r = gma_np.responsibilities(x, *args, temperature=inputs["temperature"])
    assert r.dtype == dtype and r.shape == x.shape[:-1] + (K,)
    assert np.isfinite(r).all() and (r >= 0).all(), f"r: not finite or negative ({about})"
    row_sums = _f64(r).sum(-1)
    assert np.abs(row_sums - 1).max() <= 4 * K * np.finfo(dtype).eps, (
        f"r: a row sums to {row_sums.flat[np.argmax(np.abs(row_sums - 1))]!r} ({about})")
    cond = _conditioning(dict(inputs, k=inputs["q"]))
    tol = _tolerance(dtype, cond)
    if tol <= MEANINGLESS_TOL:
        ref = _reference(responsibilities_naive, x, *args, inputs["temperature"])
        _assert_within("r", r, ref, np.ones(r.shape), tol, dtype, about)
        # log p(x): its rounding error is relative to the size of the log-densities
        args64 = [_f64(x)] + [_f64(a) for a in args]
        l_sizes = np.abs(_reference(log_density_naive, *args64)).max(-1)          # (B, H, N)
        _assert_within("log_likelihood", gma_np.log_likelihood(x, *args),
                       _reference(log_likelihood_naive, *args64), l_sizes,
                       4 * COND_FACTOR * np.finfo(dtype).eps, dtype, about)


# ---------------------------------------------------------------------------------- wild input

KEEP = object()      # _wild: leave the cache gma_forward made
WILD_KINDS = [
    "overflowing q", "huge log_var", "tiny log_var", "tiny temperature", "huge temperature",
    "non-finite entry", "zero eps on an empty memory", "integer q", "complex v", "list means",
    "wrong d", "wrong K in logits", "mask of ints 2", "mask shape", "temperature <= 0",
    "temperature shape", "eps negative", "norm name", "do shape", "do non-finite", "cache {}",
    "cache None"]
# Kinds the first version of this suite found failing (non-finite responsibilities without
# an error, a FloatingPointError blaming eps, an AttributeError for a wrong cache): also
# pinned by test_pinned_cases_of_wild_input, on a fixed example each.
PINNED_KINDS = ("overflowing q", "tiny log_var", "cache {}", "cache None")


def _wild(draw, inputs, mask, kind=None):
    """One way of making a valid problem invalid or extreme (`kind`, else drawn).

    Returns (what, inputs, mask, eps, norm, do, cache): do None means ones like o, cache KEEP
    the one gma_forward returned.
    """
    if kind is None:
        kind = draw(st.sampled_from(WILD_KINDS))
    inputs = dict(inputs)
    eps, norm, do, cache = 1e-6, "row", None, KEEP
    B, H, N, d = inputs["q"].shape
    if kind == "overflowing q":
        with np.errstate(over="ignore"):
            q = inputs["q"] * inputs["q"].dtype.type(10.0 ** draw(st.integers(30, 300)))
        inputs["q"] = np.clip(q, -np.finfo(q.dtype).max, np.finfo(q.dtype).max)
    elif kind == "huge log_var":
        inputs["log_var"] = np.full_like(inputs["log_var"], draw(st.floats(50.0, 1e4)))
    elif kind == "tiny log_var":
        inputs["log_var"] = np.full_like(inputs["log_var"], draw(st.floats(-1e4, -50.0)))
    elif kind == "tiny temperature":
        inputs["temperature"] = 10.0 ** draw(st.floats(-300.0, -3.0))
    elif kind == "huge temperature":
        inputs["temperature"] = 10.0 ** draw(st.floats(3.0, 300.0))
    elif kind == "non-finite entry":
        name = draw(st.sampled_from(["q", "k", "v", "means", "log_var", "logits"]))
        a = inputs[name].copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        inputs[name] = a
    elif kind == "zero eps on an empty memory":
        eps, mask = 0.0, np.zeros((B, N), dtype=bool)
    elif kind == "integer q":
        inputs["q"] = np.round(inputs["q"]).astype(np.int64)
    elif kind == "complex v":
        inputs["v"] = inputs["v"].astype(np.complex128)
    elif kind == "list means":
        inputs["means"] = inputs["means"].tolist()
    elif kind == "wrong d":
        inputs["means"] = np.concatenate([inputs["means"], inputs["means"][..., :1]], axis=-1)
    elif kind == "wrong K in logits":
        inputs["logits"] = np.zeros((H, inputs["logits"].shape[1] + 1))
    elif kind == "mask of ints 2":
        mask = np.full((B, N), 2)
    elif kind == "mask shape":
        mask = np.ones((B, N + 1), dtype=bool)
    elif kind == "temperature <= 0":
        inputs["temperature"] = draw(st.sampled_from([0.0, -1.0]))
    elif kind == "temperature shape":
        inputs["temperature"] = np.ones(H + 1)
    elif kind == "eps negative":
        eps = -1e-3
    elif kind == "norm name":
        norm = "rows"
    elif kind == "do shape":
        shape = inputs["v"].shape
        do = np.ones(shape[:3] + (shape[3] + 1,))
    elif kind == "do non-finite":
        do = np.full(inputs["v"].shape, np.nan)
    elif kind == "cache {}":
        cache = {}
    elif kind == "cache None":
        cache = None
    return kind, inputs, mask, eps, norm, do, cache


def _assert_clear(err, what, eps):
    """A ValueError, TypeError or FloatingPointError whose message names an argument, and,
    with eps > 0, does not put the blame on eps and an empty memory."""
    assert isinstance(err, (ValueError, TypeError, FloatingPointError)), (
        f"{what}: {type(err).__name__}: {err}")
    message = str(err)
    assert message and any(message.startswith(a) or f"{a}:" in message or f"{a} " in message
                           for a in ARGUMENTS), f"{what}: the message names no argument: {message!r}"
    if isinstance(eps, float) and eps > 0:
        assert "empty memory" not in message and "eps > 0" not in message, (
            f"{what}: with eps = {eps} the error blames eps: {message!r}")


def _outcome(fn, what, eps):
    """fn()'s result, or None after checking that what it raised is a clear error."""
    try:
        return fn()
    except Exception as err:                                           # noqa: BLE001
        _assert_clear(err, what, eps)
        return None


def _check_wild(kind, wild, mask, eps, norm, do, cache, causal, about):
    what = f"{kind} ({'causal' if causal else 'bidirectional'}; {about})"
    opts = dict(causal=causal, norm=norm, eps=eps, key_mask=mask)
    routing = (wild["q"], wild["means"], wild["log_var"], wild["logits"])
    r = _outcome(lambda: gma_np.responsibilities(*routing, temperature=wild["temperature"]), what, eps)
    if r is not None:
        assert np.isfinite(r).all(), f"{what}: responsibilities returned non-finite values, no error"
    forward = _outcome(lambda: gma_np.gma_forward(**wild, **opts), what, eps)
    if forward is None:
        return
    o, made = forward
    assert np.isfinite(o).all(), f"{what}: gma returned a non-finite output without an error"
    grads = _outcome(lambda: gma_np.gma_backward(np.ones_like(o) if do is None else do,
                                                 made if cache is KEEP else cache), what, eps)
    if grads is None:
        return
    assert do is None and cache is KEEP, f"{what}: gma_backward accepted it"
    for name, g in grads.items():
        assert np.isfinite(g).all(), f"{what}: d{name} is not finite, without an error"
    wild = {n: np.asarray(a) if isinstance(a, list) else a for n, a in wild.items()}
    cond = _reference(_conditioning, wild)
    tol = _tolerance(o.dtype, cond) if np.isfinite(cond) else np.inf
    ref = _reference(gma_dense, **wild, **opts)
    if tol <= MEANINGLESS_TOL and np.isfinite(ref).all():
        sizes = np.broadcast_to(np.abs(_f64(wild["v"])).max(), o.shape)
        _assert_within("o", o, ref, sizes, tol, o.dtype, what)


@settings(max_examples=150)
@given(problem=problems(), causal=st.booleans(), data=st.data())
def test_wild_input_gets_a_clear_error_or_a_right_finite_answer(problem, causal, data):
    inputs, mask, about = problem
    _check_wild(*_wild(data.draw, inputs, mask), causal, about)


# The one draw each pinned case makes in _wild: the power of ten q is scaled by, the log_var.
PINNED_DRAWS = {"overflowing q": 200, "tiny log_var": -800.0}


@pytest.mark.parametrize("kind", PINNED_KINDS)
def test_pinned_cases_of_wild_input(kind):
    inputs, _ = make_problem(np.random.default_rng(0), B=1, H=2, N=5, d=3, e=2, K=3)
    wild = _wild(lambda strategy: PINNED_DRAWS.get(kind), inputs, None, kind=kind)
    _check_wild(*wild, False, "B=1 H=2 N=5 d=3 e=2 K=3")
