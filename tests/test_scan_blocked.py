"""The time-blocked causal scan (gma_np.memory.scan, SCAN_TOKENS tokens per pass over the state)
against the token-by-token scan beside it and the dense N x N reference, forward and backward, at
sizes that leave ragged edges (N not a multiple of the block, odd K and e); finite differences;
a forward started from a state; one thread against all, bit for bit. Both blocked forward
kernels (over the rows of S, which the wrappers run up to SCAN_ROWS_MAX_K components, and over
the columns of S^T above) are held to the same references directly."""

import dataclasses

import numba
import numpy as np
import pytest

import gma_np
from gma_np._numerics import ACCUM_DTYPE, DEFAULT_EPS
from gma_np.memory.ops import memory_backward, memory_forward
from gma_np.memory.reference import causal_mix_loop
from gma_np.memory.scan import (
    SCAN_CHECKPOINT_TOKENS,
    SCAN_PREFETCH_BLOCKS,
    SCAN_RECOMPUTE_TOKENS,
    SCAN_ROWS_MAX_K,
    SCAN_TOKENS,
    _causal_scan_backward,
    _causal_scan_backward_blocked,
    _causal_scan_forward,
    _causal_scan_forward_blocked,
    _causal_scan_forward_blocked_rows,
    _causal_backward,
    _causal_forward,
    _forward_blocked_kernel,
    _no_checkpoints,
    scan_checkpoints,
)
from tests.conftest import RTOL, assert_close, assert_results_close
from tests.conftest import causal_dense as dense
from tests.conftest import causal_scan as blocked_scan   # the wrappers run the blocked kernels

# (N, K, e): N below, at and past a block, not a multiple of it; odd and even K and e
SIZES = [(2, 5, 3), (3, 4, 4), (5, 5, 3), (37, 5, 3), (38, 6, 7), (40, 7, 8)]
SIZE_IDS = [f"N{n}-K{k}-e{e}" for n, k, e in SIZES]
NAMES = ("o", "drq", "drk", "dv")
FORWARD_KERNELS = {"rows": _causal_scan_forward_blocked_rows, "columns": _causal_scan_forward_blocked}


def softmax_rows(x):
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def make_mixing(rng, P, N, K, e, dtype, masked):
    """rq, rk (P, N, K) softmax rows (rk with some rows zeroed as padding keys, never the
    first), v, do (P, N, e)."""
    rq = softmax_rows(2.0 * rng.standard_normal((P, N, K)))
    rk = softmax_rows(2.0 * rng.standard_normal((P, N, K)))
    if masked:
        keep = rng.random((P, N)) > 0.3
        keep[:, 0] = True
        rk = rk * keep[:, :, None]
    v = rng.standard_normal((P, N, e))
    do = rng.standard_normal((P, N, e))
    return tuple(a.astype(dtype) for a in (rq, rk, v, do))


def token_scan(rq, rk, v, do, slot, eps):
    """The token-by-token kernels (the fast path the blocked one replaced in the wrappers)."""
    P, N, K = rq.shape
    e = v.shape[2]
    out = np.empty_like(v)
    _causal_scan_forward(rq, rk, v, slot, eps, np.zeros((P, K, e)), np.zeros((P, K)), out)
    width = K if slot else 1
    drq, drk, dv = np.empty_like(rq), np.empty_like(rk), np.empty_like(v)
    _causal_scan_backward(rq, rk, v, do, slot, eps, np.empty((P, K, e)), np.empty((P, K)),
                          np.empty((P, N, width)), np.empty((P, N, width)), drq, drk, dv)
    return out, drq, drk, dv


def test_the_kernels_are_written_for_four_tokens():
    """The loop bodies unroll four tokens by hand (eight in the backward's pass 1); the
    constants name that, nothing else."""
    assert SCAN_TOKENS == 4
    assert SCAN_RECOMPUTE_TOKENS == 8


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,K,e", SIZES, ids=SIZE_IDS)
def test_blocked_matches_token_scan_and_dense(N, K, e, dtype, norm, masked):
    """P=3: every output and gradient to 1e-12 (float64) or 2e-6 (float32) of the token scan
    and of the dense reference, in the dtype of the inputs."""
    rng = np.random.default_rng(N * 100 + K * 10 + e)
    args = make_mixing(rng, 3, N, K, e, dtype, masked)
    slot = norm == "slot"
    assert_results_close(NAMES, blocked_scan(*args, slot, DEFAULT_EPS), dtype,
                         token_scan=token_scan(*args, slot, DEFAULT_EPS),
                         dense=dense(*args, slot, DEFAULT_EPS))


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_one_token_matches_token_scan(norm):
    """N = 1: a block that is all ragged edge. (Not against the dense form: the row gradient
    of a query that reads one key is eps-sized, rk (v . do) eps / den^2, a cancellation both
    scans share; from N = 2 on the other rows set the scale.)"""
    args = make_mixing(np.random.default_rng(3), 3, 1, 5, 3, np.float64, masked=False)
    for name, g, r in zip(NAMES, blocked_scan(*args, norm == "slot", DEFAULT_EPS),
                          token_scan(*args, norm == "slot", DEFAULT_EPS)):
        assert_close(f"{name} vs token scan", g, r, 1e-12)


def test_the_wrappers_pick_the_forward_kernel_by_K():
    """Rows of S up to SCAN_ROWS_MAX_K components, columns of S^T above."""
    assert _forward_blocked_kernel(1) is _causal_scan_forward_blocked_rows
    assert _forward_blocked_kernel(SCAN_ROWS_MAX_K) is _causal_scan_forward_blocked_rows
    assert _forward_blocked_kernel(SCAN_ROWS_MAX_K + 1) is _causal_scan_forward_blocked


@pytest.mark.parametrize("kernel", list(FORWARD_KERNELS))
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,K,e", SIZES, ids=SIZE_IDS)
def test_both_forward_kernels_match_token_scan_and_dense(N, K, e, dtype, norm, kernel):
    """Each blocked forward kernel called directly (the wrappers run only one per K), P=3,
    masked keys: the outputs to 1e-12 (float64) or 2e-6 (float32) of the token scan and of
    the dense reference, and the final state to 1e-12 of the token scan's."""
    rng = np.random.default_rng(N * 100 + K * 10 + e + 1)
    rq, rk, v, do = make_mixing(rng, 3, N, K, e, dtype, masked=True)
    slot = norm == "slot"
    P = rq.shape[0]
    S, z, out = np.zeros((P, K, e)), np.zeros((P, K)), np.empty_like(v)
    check = np.full(P, np.nan)
    FORWARD_KERNELS[kernel](rq, rk, v, slot, DEFAULT_EPS, S, z, out, check,
                            *_no_checkpoints(P, K, e))
    assert np.array_equal(check, np.zeros(P)), "finite outputs: every check sum is 0"
    S_ref, z_ref, out_ref = np.zeros((P, K, e)), np.zeros((P, K)), np.empty_like(v)
    _causal_scan_forward(rq, rk, v, slot, DEFAULT_EPS, S_ref, z_ref, out_ref)
    assert out.dtype == dtype
    assert_close("o vs token scan", out, out_ref, RTOL[dtype])
    assert_close("o vs dense", out, dense(rq, rk, v, do, slot, DEFAULT_EPS)[0], RTOL[dtype])
    assert_close("S vs token scan", S, S_ref, 1e-12)
    assert_close("z vs token scan", z, z_ref, 1e-12)


@pytest.mark.parametrize("pairs", [False, True], ids=["one-row", "two-rows"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,K,e", SIZES, ids=SIZE_IDS)
def test_both_backward_loop_forms_match_token_scan_and_dense(N, K, e, dtype, norm, pairs):
    """The blocked backward called directly with one or two state rows per pass (the wrapper
    takes one by K), P=3, masked keys, with pass 2's prefetch reads one block ahead (so that
    they run from the second block on): drq, drk, dv to 1e-12 (float64) or 2e-6 (float32)
    of the token scan and of the dense reference."""
    rng = np.random.default_rng(N * 100 + K * 10 + e + 2)
    rq, rk, v, do = make_mixing(rng, 3, N, K, e, dtype, masked=True)
    slot = norm == "slot"
    P, width = rq.shape[0], (K if slot else 1)
    got = (np.empty_like(rq), np.empty_like(rk), np.empty_like(v))
    check = np.full(P, np.nan)
    _causal_scan_backward_blocked(rq, rk, v, do, slot, DEFAULT_EPS, pairs, 1,
                                  *_no_checkpoints(P, K, e), np.empty((P, K, e)), np.empty((P, K)),
                                  np.empty((P, N, width)), np.empty((P, N, width)), *got, check)
    assert np.array_equal(check, np.zeros(P)), "finite dv: every check sum is 0"
    assert_results_close(NAMES[1:], got, dtype,
                         token_scan=token_scan(rq, rk, v, do, slot, DEFAULT_EPS)[1:],
                         dense=dense(rq, rk, v, do, slot, DEFAULT_EPS)[1:])


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,K,e", [(37, 5, 3), (40, SCAN_ROWS_MAX_K + 3, 8)],
                         ids=["N37-K5-e3", "N40-K35-e8"])
def test_prefetch_reads_change_no_bit(N, K, e, dtype, norm):
    """Pass 2's reads of the rows a few blocks ahead (the `ahead` argument; the wrapper sets
    it by the size of a sequence's rows) only bring them into cache: drq, drk, dv are the
    same bits with none, one block and SCAN_PREFETCH_BLOCKS ahead, one and two rows per
    pass, ragged last block (N = 37) and K above SCAN_ROWS_MAX_K."""
    rng = np.random.default_rng(N + K + e)
    rq, rk, v, do = make_mixing(rng, 2, N, K, e, dtype, masked=True)
    slot = norm == "slot"
    P, width = rq.shape[0], (K if slot else 1)
    for pairs in (False, True):
        results = []
        for ahead in (0, 1, SCAN_PREFETCH_BLOCKS):
            got = (np.empty_like(rq), np.empty_like(rk), np.empty_like(v))
            _causal_scan_backward_blocked(rq, rk, v, do, slot, DEFAULT_EPS, pairs, ahead,
                                          *_no_checkpoints(P, K, e),
                                          np.empty((P, K, e)), np.empty((P, K)),
                                          np.empty((P, N, width)), np.empty((P, N, width)),
                                          *got, np.empty(P))
            results.append(got)
        for ahead, got in zip((1, SCAN_PREFETCH_BLOCKS), results[1:]):
            for name, g, r in zip(NAMES[1:], got, results[0]):
                assert np.array_equal(g, r), f"{name}: ahead={ahead}, pairs={pairs} changed bits"


@pytest.mark.parametrize("kernel", list(FORWARD_KERNELS))
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_blocked_forward_from_a_state_matches_the_loop(dtype, norm, kernel):
    """Started from a non-zero state (what decoding a chunk does), the outputs and the final
    state are those of the loop over t (gma_np.memory.reference.causal_mix_loop)."""
    rng = np.random.default_rng(7)
    P, N, K, e = 2, 11, 5, 3
    rq, rk, v, _ = make_mixing(rng, P, N, K, e, dtype, masked=True)
    S0 = rng.random((P, K, e))
    z0 = rng.random((P, K)) + 0.5
    S, z, out = S0.copy(), z0.copy(), np.empty_like(v)
    FORWARD_KERNELS[kernel](rq, rk, v, norm == "slot", DEFAULT_EPS, S, z, out, np.empty(P),
                            *_no_checkpoints(P, K, e))
    for p in range(P):
        o_ref, S_ref, z_ref = causal_mix_loop(*(a[p].astype(np.float64) for a in (rq, rk, v)),
                                              norm == "slot", DEFAULT_EPS, S0[p], z0[p])
        assert_close(f"o[{p}]", out[p], o_ref, RTOL[dtype])
        assert_close(f"S[{p}]", S[p], S_ref, 1e-12)
        assert_close(f"z[{p}]", z[p], z_ref, 1e-12)


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_blocked_backward_by_finite_differences(norm):
    """Full central differences in float64 through the memory op, form "scan": N = 10
    (pass 2: two blocks of four and a ragged one; pass 1: a block of eight and a ragged
    one), K = 3, e = 2, a padding key (after the first token)."""
    rng = np.random.default_rng(5)
    # features away from 0: the slot read divides by z_t + eps, which at t = 0 is one key's
    # feature, and a finite-difference step on a tiny one would measure its curvature
    rq, rk, v = rng.random((2, 10, 3)) + 0.5, rng.random((2, 10, 3)) + 0.5, rng.standard_normal((2, 10, 2))
    rk[0, 2] = 0.0
    slot = norm == "slot"

    def fun(rq, rk, v):
        return memory_forward(rq, rk, v, causal=True, slot=slot, eps=DEFAULT_EPS, form="scan")

    def grad(do, rq, rk, v):
        return dict(zip(("rq", "rk", "v"), memory_backward(
            rq, rk, v, do, causal=True, slot=slot, eps=DEFAULT_EPS, form="scan")))

    report = gma_np.gradcheck(fun, grad, dict(rq=rq, rk=rk, v=v), mode="full")
    assert report.ok, report


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_backward_by_chunks_by_finite_differences(norm):
    """Full central differences in float64 through the wrappers with checkpoints every 8
    tokens: N = 21 (chunks of 8, 8 and 5; pass 1 of the last a ragged block), K = 3, e = 2,
    a padding key in the middle chunk."""
    rng = np.random.default_rng(6)
    rq, rk = rng.random((2, 21, 3)) + 0.5, rng.random((2, 21, 3)) + 0.5
    v = rng.standard_normal((2, 21, 2))
    rk[1, 10] = 0.0
    slot = norm == "slot"

    def fun(rq, rk, v):
        return _causal_forward(rq, rk, v, slot, DEFAULT_EPS, None, scan_checkpoints(2, 21, 3, 2, 8))

    def grad(do, rq, rk, v):
        checkpoints = scan_checkpoints(2, 21, 3, 2, 8)
        _causal_forward(rq, rk, v, slot, DEFAULT_EPS, None, checkpoints)
        drq, drk = np.empty_like(rq), np.empty_like(rk)
        dv = _causal_backward(rq, rk, v, do, slot, DEFAULT_EPS, drq, drk, None, checkpoints)
        return {"rq": drq, "rk": drk, "v": dv}

    report = gma_np.gradcheck(fun, grad, dict(rq=rq, rk=rk, v=v), mode="full")
    assert report.ok, report


def test_blocked_backward_writes_its_scratch_before_reading_it():
    """The backward's state scratch S, z (and its own zero-padded copy for two rows per pass
    at an odd K) is written before it is read: filled with NaN, an odd K gives the token
    kernel's gradients, one and two rows per pass."""
    rng = np.random.default_rng(9)
    rq, rk, v, do = make_mixing(rng, 2, 9, 5, 3, np.float64, masked=False)
    P, N, K = rq.shape
    e = v.shape[2]
    got = [np.empty_like(rq), np.empty_like(rk), np.empty_like(v)]
    for pairs in (False, True):
        _causal_scan_backward_blocked(rq, rk, v, do, False, DEFAULT_EPS, pairs, 0,
                                      *_no_checkpoints(P, K, e),
                                      np.full((P, K, e), np.nan), np.full((P, K), np.nan),
                                      np.empty((P, N, 1)), np.empty((P, N, 1)), *got, np.empty(P))
        ref = token_scan(rq, rk, v, do, False, DEFAULT_EPS)[1:]
        for name, g, r in zip(NAMES[1:], got, ref):
            assert_close(f"{name}, pairs={pairs}", g, r, 1e-12)


@pytest.mark.parametrize("K", [16, SCAN_ROWS_MAX_K + 3], ids=["rows", "columns"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_thread_count_changes_nothing(norm, K):
    """P=4, N=1031, e=16, K = 16 (the rows forward kernel, one row per pass backward) or 35
    (the columns kernel, two rows): above PARALLEL_MIN_WORK, so the kernels run in parallel;
    one thread and all threads give bit-identical outputs and gradients (each sequence is
    one thread's)."""
    rng = np.random.default_rng(13)
    args = make_mixing(rng, 4, 1031, K, 16, np.float32, masked=True)
    n = numba.get_num_threads()
    results = []
    for threads in (1, n):
        numba.set_num_threads(threads)
        try:
            results.append(blocked_scan(*args, norm == "slot", DEFAULT_EPS))
        finally:
            numba.set_num_threads(n)
    for name, a, b in zip(NAMES, *results):
        assert np.array_equal(a, b), name
    assert ACCUM_DTYPE == np.float64


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_the_kernels_check_what_they_store(dtype, norm):
    """Each blocked kernel's check sum is NaN for exactly the sequences whose stored output
    (forward) or dv (backward) holds a NaN or an inf, 0 for the others: a NaN in v or do of
    sequence 1 at its last token (N = 37, in the ragged last block), and, in float32, a do
    whose dv is finite in the kernel's float64 sums but overflows float32 when stored."""
    rng = np.random.default_rng(11)
    P, N, K, e = 3, 37, SCAN_ROWS_MAX_K + 3, 5
    slot = norm == "slot"
    width = K if slot else 1
    rq, rk, v, do = make_mixing(rng, P, N, K, e, dtype, masked=True)

    def forward(kernel, v):
        check = np.full(P, -1.0)
        FORWARD_KERNELS[kernel](rq, rk, v, slot, DEFAULT_EPS, np.zeros((P, K, e)),
                                np.zeros((P, K)), np.empty_like(v), check,
                                *_no_checkpoints(P, K, e))
        return check

    def backward(pairs, do):
        check = np.full(P, -1.0)
        _causal_scan_backward_blocked(rq, rk, v, do, slot, DEFAULT_EPS, pairs, 0,
                                      *_no_checkpoints(P, K, e),
                                      np.empty((P, K, e)), np.empty((P, K)),
                                      np.empty((P, N, width)), np.empty((P, N, width)),
                                      np.empty_like(rq), np.empty_like(rk), np.empty_like(v), check)
        return check

    for value in (np.nan, np.inf):
        bad_v, bad_do = v.copy(), do.copy()
        bad_v[1, N - 1, 2] = value
        bad_do[1, N - 1, 2] = value
        for kernel in FORWARD_KERNELS:
            check = forward(kernel, bad_v)
            assert np.isnan(check[1]) and check[0] == 0 and check[2] == 0, (kernel, value, check)
        for pairs in (False, True):
            check = backward(pairs, bad_do)
            assert np.isnan(check[1]) and check[0] == 0 and check[2] == 0, (pairs, value, check)
    if dtype == np.float32:
        huge = do.copy()
        huge[1] = np.float32(3e38)                     # dv's float64 sums pass 3.4e38
        for pairs in (False, True):
            check = backward(pairs, huge)
            assert np.isnan(check[1]) and check[0] == 0 and check[2] == 0, (pairs, check)


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,K,e,chunk", [
    (37, 5, 3, 8), (64, SCAN_ROWS_MAX_K + 3, 8, 16),
    (SCAN_CHECKPOINT_TOKENS + 45, 5, 3, SCAN_CHECKPOINT_TOKENS)],
                         ids=["N37-K5-e3-chunk8", "N64-K35-e8-chunk16",
                              "N301-K5-e3-default-chunk"])
def test_checkpoints_change_no_bit(N, K, e, chunk, dtype, norm):
    """The backward by chunks from the forward's checkpoints (SCAN_CHECKPOINT_TOKENS; small
    chunks here): the forward writes the same outputs and the states the token scan has
    after chunk, 2 chunk, ... tokens; the backward from them gives the same bits as the
    backward in one chunk, with one and two rows per pass and with pass 2's reads ahead;
    a ragged last chunk (N = 37: chunks of 8 and a last of 5, whose pass 1 is one ragged
    block) and chunks that divide N (64), K on both sides of SCAN_ROWS_MAX_K (the rows and
    the columns forward kernel), masked keys; and the default chunk at N = 301, where the
    backward without the states is one chunk longer than SCAN_CHECKPOINT_TOKENS."""
    rng = np.random.default_rng(N + K + e + chunk)
    rq, rk, v, do = make_mixing(rng, 3, N, K, e, dtype, masked=True)
    slot = norm == "slot"
    P, width = rq.shape[0], (K if slot else 1)
    checkpoints = scan_checkpoints(P, N, K, e, chunk)
    M = checkpoints[1].shape[1]
    assert M == -(-N // chunk) - 1
    out = _causal_forward(rq, rk, v, slot, DEFAULT_EPS, None, checkpoints)
    assert np.array_equal(out, _causal_forward(rq, rk, v, slot, DEFAULT_EPS))
    for j in range(M):                                  # the state after (j + 1) chunk tokens
        t = (j + 1) * chunk
        S, z = np.zeros((P, K, e)), np.zeros((P, K))
        _causal_scan_forward(rq[:, :t], rk[:, :t], v[:, :t], slot, DEFAULT_EPS, S, z,
                             np.empty_like(v[:, :t]))
        assert_close(f"checkpoint {j}: S", checkpoints[1][:, j], S, 1e-13)
        assert_close(f"checkpoint {j}: z", checkpoints[2][:, j], z, 1e-13)
    for pairs in (False, True):
        results = []
        for ahead, ck in ((0, _no_checkpoints(P, K, e)), (0, checkpoints), (1, checkpoints)):
            got = (np.empty_like(rq), np.empty_like(rk), np.empty_like(v))
            _causal_scan_backward_blocked(rq, rk, v, do, slot, DEFAULT_EPS, pairs, ahead, *ck,
                                          np.empty((P, K, e)), np.empty((P, K)),
                                          np.empty((P, N, width)), np.empty((P, N, width)),
                                          *got, np.empty(P))
            results.append(got)
        for label, got in zip(("checkpoints", "checkpoints, reads ahead"), results[1:]):
            for name, g, r in zip(NAMES[1:], got, results[0]):
                assert np.array_equal(g, r), f"{name}: {label}, pairs={pairs} changed bits"
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    dv = _causal_backward(rq, rk, v, do, slot, DEFAULT_EPS, drq, drk, None, checkpoints)
    assert_results_close(NAMES[1:], (drq, drk, dv), dtype,
                         dense=dense(rq, rk, v, do, slot, DEFAULT_EPS)[1:])


def test_gma_keeps_the_scan_states_for_its_backward():
    """gma_forward on the token scan keeps the states every SCAN_CHECKPOINT_TOKENS tokens
    in its cache (none up to that many tokens), and gma_backward's gradients from them are
    the same bits as without them (the backward in one chunk)."""
    rng = np.random.default_rng(21)
    B, H, d, K, e = 1, 2, 3, 4, 5
    for N, M in ((SCAN_CHECKPOINT_TOKENS, 0), (2 * SCAN_CHECKPOINT_TOKENS + 3, 2)):
        q, k = rng.standard_normal((2, B, H, N, d))
        v, do = rng.standard_normal((2, B, H, N, e))
        means, log_var = rng.standard_normal((2, H, K, d))
        logits = rng.standard_normal((H, K))
        o, cache = gma_np.gma_forward(q, k, v, means, 0.3 * log_var, logits, causal=True)
        assert cache.checkpoints[1].shape == (B * H, M, K, e)
        grads = gma_np.gma_backward(do, cache)
        plain = gma_np.gma_backward(do, dataclasses.replace(cache, checkpoints=None))
        for name in grads:
            assert np.array_equal(grads[name], plain[name]), name


def test_checkpoints_of_another_shape_are_refused():
    """The kernels index the checkpoints unchecked, so the wrappers refuse any that
    scan_checkpoints would not make for the call (too few states would leave tokens out)."""
    rng = np.random.default_rng(4)
    rq, rk, v, do = make_mixing(rng, 2, 40, 3, 4, np.float64, masked=False)
    good = scan_checkpoints(2, 40, 3, 4, 8)
    _causal_forward(rq, rk, v, False, DEFAULT_EPS, None, good)
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    bad = [scan_checkpoints(2, 32, 3, 4, 8), scan_checkpoints(2, 40, 3, 5, 8),
           scan_checkpoints(2, 40, 3, 4, 12), (8, good[1].astype(np.float32), good[2])]
    for checkpoints in bad:
        with pytest.raises(ValueError, match="checkpoints: expected scan_checkpoints"):
            _causal_forward(rq, rk, v, False, DEFAULT_EPS, None, checkpoints)
        with pytest.raises(ValueError, match="checkpoints: expected scan_checkpoints"):
            _causal_backward(rq, rk, v, do, False, DEFAULT_EPS, drq, drk, None, checkpoints)
