"""The fast paths against their naive twins, at small odd sizes.

- routing by one GEMM on centred points (ops.routing.log_density) against the
  direct-form kernel and the naive broadcast, including data where the
  expansion would cancel and the fallback must fire;
- the fused softmax kernel against scipy.special.softmax and logsumexp;
- the GEMM backward of the log-density against the direct-form kernel;
- the fused causal scans (forward, backward) against the dense N x N reference (the
  bidirectional kernels are held to it by tests/test_mixing.py and below);
- the serial gma_step kernel against gma(..., causal=True) token by token;
- thread count and NUMBA_DISABLE_JIT=1 change nothing.
"""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from scipy.special import logsumexp, softmax

import gma_np
from gma_np._numerics import (EXPANSION_CANCELLATION_BOUND, GRADIENT_CANCELLATION_BOUND,
                              GRADIENT_CANCELLATION_BOUND_FLOAT32)
from gma_np.mixers.gma import routing
from gma_np.mixers.gma.kernels import _log_density_expanded
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward
from gma_np.mixers.gma.reference.routing import log_density_naive, responsibilities_naive
from tests.conftest import assert_close, make_problem

COVARIANCES = ["diag", "spherical"]


def mixture(rng, H, K, d, covariance, scale=1.0, sigma=1.0, offset=0.0):
    means = offset + scale * rng.standard_normal((H, K, d))
    shape = (H, K, d) if covariance == "diag" else (H, K)
    log_var = 2 * np.log(sigma) + 0.3 * rng.standard_normal(shape)
    logits = 0.5 * rng.standard_normal((H, K))
    return means, log_var, logits


def points_near_components(rng, means, log_var, N):
    """x (2, H, N, d): each point drawn from one component of its head."""
    H, K, d = means.shape
    var = np.exp(log_var) if log_var.ndim == 3 else np.exp(log_var)[..., None] * np.ones(d)
    comp = rng.integers(0, K, size=(2, H, N))
    h = np.arange(H)[None, :, None]
    return means[h, comp] + np.sqrt(var[h, comp]) * rng.standard_normal((2, H, N, d))


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("case", ["unit", "offset1000", "spread100-sharp"])
def test_gemm_log_density_matches_direct_and_naive(rng, covariance, case, monkeypatch):
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)             # 37 tokens: blocks 16, 16, 5
    H, K, d, N = 3, 5, 7, 37
    kw = dict(unit={}, offset1000=dict(offset=1000.0),
              **{"spread100-sharp": dict(scale=100.0, sigma=0.1)})[case]
    means, log_var, logits = mixture(rng, H, K, d, covariance, **kw)
    x = points_near_components(rng, means, log_var, N)
    mix = routing.prepare_mixture(means, log_var, logits)
    fast = routing.log_density(x, mix)
    direct = routing.log_density_direct(x, mix)
    naive = log_density_naive(x, means, log_var, logits)
    # per entry, relative to max(|l|, 1): the entries that decide r are the ones near 0
    scale = np.maximum(np.abs(naive), 1.0)
    assert np.max(np.abs(fast - naive) / scale) <= 1e-13, "GEMM log-density vs naive"
    assert np.max(np.abs(direct - naive) / scale) <= 1e-13, "direct log-density vs naive"
    r = gma_np.responsibilities(x, means, log_var, logits)
    np.testing.assert_allclose(r, responsibilities_naive(x, means, log_var, logits),
                               rtol=0, atol=1e-12, err_msg="r")


def test_cancellation_fallback_is_what_keeps_it_accurate(rng):
    """Without the direct-form fallback the expansion loses digits on well separated,
    sharp components (the check above could not fail otherwise)."""
    H, K, d, N = 2, 5, 7, 37
    means, log_var, logits = mixture(rng, H, K, d, "diag", scale=1e4, sigma=0.05)
    x = points_near_components(rng, means, log_var, N)
    mix = routing.prepare_mixture(means, log_var, logits)
    feats = routing.features(x, mix, 0, N)
    naive = log_density_naive(x, means, log_var, logits)
    scale = np.maximum(np.abs(naive), 1.0)
    errs = {}
    for bound in (EXPANSION_CANCELLATION_BOUND, np.inf):
        g = np.matmul(feats, mix.w_forward)
        _log_density_expanded(g, feats, x, x, 0, mix.means, mix.inv_var_max, mix.m2, mix.const,
                              mix.inv_var, bound, GRADIENT_CANCELLATION_BOUND, g,
                              np.empty(x.shape[:3], dtype=np.uint8))
        errs[bound] = np.max(np.abs(g - naive) / scale)
    assert errs[EXPANSION_CANCELLATION_BOUND] <= 1e-13, errs
    assert errs[np.inf] > 1e-10, f"expansion without fallback was accurate anyway: {errs}"


def test_fused_softmax_matches_scipy(rng):
    P, H, N, K = 2, 3, 37, 5
    l = 30 * rng.standard_normal((P, H, N, K)) - 500.0             # far from every component
    inv_tau = rng.uniform(0.3, 3.0, H)
    a = l * inv_tau[None, :, None, None]
    r = np.full((P, H, N + 3, K), np.nan)                          # the block lands at rows 3..
    shift = np.full((P, H, N + 3), np.nan)
    routing.softmax_rows_forward(l.copy(), inv_tau, 3, r, shift)
    assert np.isnan(r[:, :, :3]).all() and np.isnan(shift[:, :, :3]).all()
    r = r[:, :, 3:]
    np.testing.assert_array_equal(shift[:, :, 3:], l.max(-1))
    # exp(a - m) / sum against scipy: both round |a| ~ 1000 once, 1000 * eps_64 ~ 2e-13
    np.testing.assert_allclose(r, softmax(a, axis=-1), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(r, np.exp(a - logsumexp(a, axis=-1, keepdims=True)),
                               rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_gemm_log_density_backward_matches_direct(rng, covariance, monkeypatch):
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)             # 37 tokens: blocks 16, 16, 5
    H, K, d, N = 3, 5, 7, 37
    means, log_var, logits = mixture(rng, H, K, d, covariance, offset=30.0)
    x = points_near_components(rng, means, log_var, N)
    mix = routing.prepare_mixture(means, log_var, logits)
    dl = rng.standard_normal((2, H, N, K))
    l = log_density_naive(x, means, log_var, logits)
    shift = l.max(axis=-1)                                         # (2, H, N)
    dx, grads, dl_dot = routing.log_density_backward(dl, x, mix, np.float64, shift=shift)
    dx_ref, grads_ref = routing.log_density_backward_direct(dl, x, mix)
    assert_close("dx", dx, dx_ref, 1e-12)
    for name in grads_ref:
        assert_close(name, grads[name], grads_ref[name], 1e-11)
    # the sum behind the temperature gradient, entry by entry from l recomputed
    assert_close("sum dl*(l - max l)", dl_dot, (dl * (l - shift[..., None])).sum(axis=(0, 2, 3)), 1e-12)


def float32_routing_errors(rng, monkeypatch, bound):
    """Max error of each gradient of the float32 fast log-likelihood, with the float32 gradient
    bound set to `bound`, against the float64 direct form on the same float32 values,
    in units of a float32 rounding of its largest entry. The points sit next to very
    sharp components (sigma ~ 5e-5) whose means are ~30 from their centre: |x'|^2 / sigma^2
    against quad ~ d, a ratio of ~1e11, where the expansion of the log-variances'
    gradient loses ~37 of float64's 53 bits."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)             # 37 tokens: blocks 16, 16, 5
    monkeypatch.setattr(routing, "GRADIENT_CANCELLATION_BOUND_FLOAT32", bound)
    H, K, d, N = 2, 5, 7, 37
    means, log_var, logits = mixture(rng, H, K, d, "diag", scale=30.0, sigma=5e-5)
    x = points_near_components(rng, means, log_var, N)
    f32 = [a.astype(np.float32) for a in (x, means, log_var, logits)]
    # the log-likelihood: its gradient reaches the nearest component (through r it would
    # vanish, r being one-hot to the last bit next to so sharp a component)
    dll = rng.standard_normal((2, H, N)).astype(np.float32)
    _, cache = gma_np.log_likelihood_forward(*f32)
    fast = gma_np.log_likelihood_backward(dll, cache)
    x64, mix = f32[0].astype(np.float64), routing.prepare_mixture(*(a.astype(np.float64) for a in f32[1:]))
    l = routing.log_density_direct(x64, mix)                      # (2, H, N, K)
    posterior = np.exp(l - logsumexp(l, axis=-1, keepdims=True))
    dx, direct = routing.log_density_backward_direct(dll[..., None] * posterior, x64, mix)
    direct["x"] = dx
    assert all(fast[name].dtype == np.float32 for name in direct)
    eps32 = np.finfo(np.float32).eps
    return {name: float(np.max(np.abs(fast[name] - direct[name])) / (eps32 * np.max(np.abs(direct[name]))))
            for name in direct}


def test_float32_gradients_keep_the_direct_form_where_float32_would_see_the_cancellation(
        rng, monkeypatch):
    """Every gradient float32: the looser bound (GRADIENT_CANCELLATION_BOUND_FLOAT32) still
    takes the tokens whose expansion would show in float32 in the direct form, and the
    gradients are within a few float32 roundings of the float64 direct form; without the
    fallback (bound inf) the log-variances' gradient is not (so the check could fail)."""
    errs = float32_routing_errors(rng, monkeypatch, GRADIENT_CANCELLATION_BOUND_FLOAT32)
    assert max(errs.values()) <= 4.0, errs
    errs_off = float32_routing_errors(np.random.default_rng(0), monkeypatch, np.inf)
    assert errs_off["log_var"] > 100.0, errs_off


def test_float32_gradient_bound_applies_only_when_every_gradient_is_float32():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert routing.gradient_bound((f32, f32, f32, f32, f32)) == GRADIENT_CANCELLATION_BOUND_FLOAT32
    for dtypes in [(f32, f64, f32, f32, f32), (f32, f32, f32, f32, f64), (f64,) * 5]:
        assert routing.gradient_bound(dtypes) == GRADIENT_CANCELLATION_BOUND


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_fused_causal_scan_matches_dense(norm, masked):
    rng = np.random.default_rng(41)
    inputs, mask = make_problem(rng, B=2, H=3, N=37, d=5, e=3, K=4, per_head=True, masked=masked)
    o, cache = gma_np.gma_forward(**inputs, causal=True, norm=norm, key_mask=mask)
    assert_close("o", o, gma_dense(**inputs, causal=True, norm=norm, key_mask=mask), 1e-12)
    do = rng.standard_normal(o.shape)
    got = gma_np.gma_backward(do, cache)
    ref = gma_dense_backward(do, **inputs, causal=True, norm=norm, key_mask=mask)
    for name in ref:
        assert_close(f"d{name}", got[name], ref[name], 1e-11)


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_step_kernel_matches_causal_gma(norm, dtype):
    rng = np.random.default_rng(43)
    inputs, mask = make_problem(rng, B=2, H=3, N=11, d=5, e=3, K=4, per_head=True, masked=True)
    for n in ("q", "k", "v"):
        inputs[n] = inputs[n].astype(dtype)
    full = gma_np.gma(**inputs, causal=True, norm=norm, key_mask=mask)
    mix = {n: inputs[n] for n in ("means", "log_var", "logits")}
    state = None
    for t in range(inputs["q"].shape[2]):
        o_t, state = gma_np.gma_step(inputs["q"][:, :, t], inputs["k"][:, :, t], inputs["v"][:, :, t],
                                     **mix, state=state, norm=norm, temperature=inputs["temperature"],
                                     key_mask_t=mask[:, t])
        assert o_t.dtype == dtype
        assert_close(f"o[{t}]", o_t, full[:, :, t], 1e-12 if dtype == np.float64 else 2e-6)


def test_prepared_mixture_is_not_served_stale(rng):
    """gma_step reuses the last prepared mixture only while the values are the same."""
    inputs, _ = make_problem(rng, B=1, H=2, N=1, d=3, e=2, K=3)
    mix = {n: inputs[n].copy() for n in ("means", "log_var", "logits")}
    q, k, v = (inputs[n][:, :, 0] for n in ("q", "k", "v"))
    o1, _ = gma_np.gma_step(q, k, v, **mix)
    mix["means"] += 0.5                                      # in place: same object, new values
    o2, _ = gma_np.gma_step(q, k, v, **mix)
    ref = gma_dense(q[:, :, None], k[:, :, None], v[:, :, None], **mix, causal=True)[:, :, 0]
    assert not np.array_equal(o1, o2)
    assert_close("o after the mixture changed", o2, ref, 1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_thread_count_changes_nothing(causal):
    """Large enough to run in parallel (gma_np._numerics.PARALLEL_MIN_WORK): 1 thread and
    all threads give bit-identical outputs and gradients (each sequence is one thread's;
    block sums are added in block order)."""
    rng = np.random.default_rng(47)
    inputs, _ = make_problem(rng, B=1, H=4, N=1031, d=16, e=16, K=16)
    results = []
    n = numba.get_num_threads()
    for threads in (1, n):
        numba.set_num_threads(threads)
        try:
            o, cache = gma_np.gma_forward(**inputs, causal=causal)
            results.append((o, gma_np.gma_backward(np.ones_like(o), cache)))
        finally:
            numba.set_num_threads(n)
    (o1, g1), (o2, g2) = results
    assert np.array_equal(o1, o2)
    for name in ("q", "k", "v", "means", "log_var", "logits"):
        assert np.array_equal(g1[name], g2[name]), name


def test_kernels_run_as_plain_python():
    """With NUMBA_DISABLE_JIT=1 every kernel is an ordinary Python loop, and agrees."""
    code = """
import numpy as np, gma_np
from gma_np.selfcheck import make_problem
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward
rng = np.random.default_rng(5)
for norm, causal in (("row", True), ("slot", True), ("row", False), ("slot", False)):
    inputs, mask = make_problem(rng, B=1, H=2, N=6, d=3, e=2, K=3, masked=True)
    o, cache = gma_np.gma_forward(**inputs, causal=causal, norm=norm, key_mask=mask)
    ref = gma_dense(**inputs, causal=causal, norm=norm, key_mask=mask)
    assert np.abs(o - ref).max() <= 1e-12 * np.abs(ref).max(), norm
    do = rng.standard_normal(o.shape)
    g = gma_np.gma_backward(do, cache)
    gr = gma_dense_backward(do, **inputs, causal=causal, norm=norm, key_mask=mask)
    for n in ("q", "k", "v", "means"):
        assert np.abs(g[n] - gr[n]).max() <= 1e-11 * np.abs(gr[n]).max(), n
    o_t, _ = gma_np.gma_step(inputs["q"][:, :, 0], inputs["k"][:, :, 0], inputs["v"][:, :, 0],
                             inputs["means"], inputs["log_var"], inputs["logits"], norm=norm)
print("ok")
"""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
