"""GMA mixing: the fast path (BLAS bidirectional, Numba causal scan) against the dense N x N
reference and the loop over t, forward and backward, and every configuration gradient-checked."""

import itertools
import tracemalloc

import numpy as np
import pytest

import gma_np
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward
from gma_np.mixers.gma.reference.recurrent import gma_loop
from gma_np.mixers.gma.configurations import GRADIENT_NAMES, configurations
from gma_np.selfcheck import check_configuration
from tests.conftest import assert_close, make_problem

GRID = configurations()


@pytest.mark.parametrize("point", GRID, ids=lambda point: point.name)
def test_fast_matches_dense_and_loop(point):
    """B=2, H=3, N=37, d=4, e=3, K=5: forward to 1e-12, gradients to 1e-11 (float64)."""
    causal, norm, cov, masked, per_head = point
    rng = np.random.default_rng(7)
    inputs, mask = make_problem(rng, B=2, H=3, N=37, d=4, e=3, K=5, covariance=cov,
                                per_head=per_head, masked=masked)
    opts = dict(causal=causal, norm=norm, key_mask=mask)
    o, cache = gma_np.gma_forward(**inputs, **opts)
    assert_close("o vs dense", o, gma_dense(**inputs, **opts), 1e-12)
    if causal:
        assert_close("o vs loop", o, gma_loop(**inputs, norm=norm, key_mask=mask), 1e-12)
    do = rng.standard_normal(o.shape)
    got = gma_np.gma_backward(do, cache)
    ref = gma_dense_backward(do, **inputs, **opts)
    assert set(got) == set(GRADIENT_NAMES)
    for name in ref:
        assert np.shape(got[name]) == np.shape(inputs[name]), name
        assert_close(f"d{name} vs dense", got[name], ref[name], 1e-11)


def test_causal_form_is_chosen_by_k_times_e():
    from gma_np._numerics import CHUNKED_MIN_KE
    from gma_np.memory.ops import causal_form
    assert causal_form(64, 64) == "scan"
    assert causal_form(256, 256) == "chunked"
    assert causal_form(1, CHUNKED_MIN_KE) == "chunked"
    assert causal_form(1, CHUNKED_MIN_KE - 1) == "scan"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_chunked_form_through_the_public_api_matches_dense(norm, masked, monkeypatch):
    """gma_forward / gma_backward with the chunked causal form forced (CHUNKED_MIN_KE = 0):
    the same 1e-12 / 1e-11 against the dense reference as the token scan."""
    from gma_np.memory import chunked, ops
    from gma_np.mixers.gma import mixing
    calls = []
    monkeypatch.setattr(ops, "CHUNKED_MIN_KE", 0)                   # read by causal_form
    monkeypatch.setattr(mixing, "CAUSAL_CHUNK", 16)                 # 37 tokens: 16, 16, 5
    for name in ("causal_chunked_forward", "causal_chunked_backward"):
        fn = getattr(chunked, name)
        monkeypatch.setattr(mixing, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    rng = np.random.default_rng(8)
    inputs, mask = make_problem(rng, B=2, H=3, N=37, d=4, e=3, K=5, per_head=True, masked=masked)
    opts = dict(causal=True, norm=norm, key_mask=mask)
    o, cache = gma_np.gma_forward(**inputs, **opts)
    assert_close("o vs dense", o, gma_dense(**inputs, **opts), 1e-12)
    do = rng.standard_normal(o.shape)
    got = gma_np.gma_backward(do, cache)
    ref = gma_dense_backward(do, **inputs, **opts)
    for name in ref:
        assert_close(f"d{name} vs dense", got[name], ref[name], 1e-11)
    assert calls == ["causal_chunked_forward", "causal_chunked_backward"]


@pytest.mark.parametrize("point", GRID, ids=lambda point: point.name)
def test_gradcheck_every_configuration(point):
    """Every gradient matches 5-point central differences to rtol 1e-6 (the `gma-np check` matrix)."""
    row = check_configuration(*point)
    assert row.gradcheck_ok, f"{row.config}: worst {row.worst_input} rel err {row.worst_rel_error:.2e}"
    assert row.worst_rel_error <= 1e-6
    assert row.reference_rel_error <= 1e-11, row


def test_dense_reference_backward_gradcheck():
    """The dense reference's own backward is right too (it is the ground truth of the others)."""
    rng = np.random.default_rng(3)
    inputs, mask = make_problem(rng, B=1, H=2, N=6, d=2, e=2, K=3, covariance="diag",
                                per_head=True, masked=True)
    for causal, norm in itertools.product((False, True), ("row", "slot")):
        opts = dict(causal=causal, norm=norm, key_mask=mask)
        report = gma_np.gradcheck(lambda **a: gma_dense(**a, **opts),
                                  lambda do, **a: gma_dense_backward(do, **a, **opts), inputs)
        assert report.ok, f"{causal=} {norm=}\n{report}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_no_n_by_n_allocation(causal):
    """At N = 2048 the fast path's peak traced memory is far below one N x N float64 matrix."""
    rng = np.random.default_rng(0)
    B, H, N, d, e, K = 1, 1, 2048, 4, 4, 4
    inputs, _ = make_problem(rng, B=B, H=H, N=N, d=d, e=e, K=K)
    gma_np.gma(**{n: a[..., :8, :] if n in "qkv" else a for n, a in inputs.items()},
               causal=causal)                                    # compile outside the trace
    tracemalloc.start()
    o, cache = gma_np.gma_forward(**inputs, causal=causal)
    gma_np.gma_backward(np.ones_like(o), cache)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < N * N * 8 / 8, f"peak {peak} bytes, an N x N float64 matrix is {N * N * 8}"


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_all_keys_masked_reads_zero(causal, norm):
    """Nothing written: the read-out is 0 / eps = 0, and every gradient is finite."""
    rng = np.random.default_rng(1)
    inputs, _ = make_problem(rng, B=2, H=2, N=9, d=3, e=2, K=3)
    mask = np.zeros((2, 9), dtype=bool)
    mask[1, 4] = True                                            # sequence 1: one real key at t = 4
    o, cache = gma_np.gma_forward(**inputs, causal=causal, norm=norm, key_mask=mask)
    assert np.array_equal(o[0], np.zeros_like(o[0]))
    if causal:
        assert np.array_equal(o[1, :, :4], np.zeros_like(o[1, :, :4]))
    g = gma_np.gma_backward(np.ones_like(o), cache)
    assert all(np.isfinite(g[n]).all() for n in g)
    assert np.array_equal(g["k"][0], np.zeros_like(g["k"][0])), "masked keys get no gradient"


def test_zero_eps_on_empty_memory_is_an_error_not_nan():
    rng = np.random.default_rng(2)
    inputs, _ = make_problem(rng, B=1, H=1, N=5, d=2, e=2, K=2)
    with pytest.raises(FloatingPointError, match="eps"):
        gma_np.gma(**inputs, causal=True, eps=0.0, key_mask=np.zeros((1, 5), dtype=bool))
    o = gma_np.gma(**inputs, causal=True, eps=0.0)               # eps = 0 is fine otherwise
    assert np.isfinite(o).all()


def test_gma_equals_gma_forward_output():
    rng = np.random.default_rng(4)
    inputs, mask = make_problem(rng, B=2, H=2, N=11, d=3, e=5, K=4, masked=True)
    for causal in (False, True):
        o1 = gma_np.gma(**inputs, causal=causal, key_mask=mask, norm="slot")
        o2, _ = gma_np.gma_forward(**inputs, causal=causal, key_mask=mask, norm="slot")
        assert np.array_equal(o1, o2)
