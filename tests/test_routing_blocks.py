"""The routing's blocks over sequences and tokens (gma_np.mixers.gma.routing._blocks).

A block is a range of the stacked sequences (e.g. q then k) times a range of tokens,
of at most ROUTING_ROWS rows. Here the block sizes are shrunk so that, at odd sizes
(B = 7, H = 3, N = 37), the block boundaries fall inside the P axis and across the
boundary between the q and k parts, and tokens taken in the direct form sit in
several blocks of both parts; the fast path is held to its direct-form twin
(route_forward_direct, route_backward_direct), to finite differences, and to itself
at 1 and 2 Numba threads, bit for bit.
"""

import numba
import numpy as np
import pytest

import gma_np
from gma_np import _threads
from gma_np._numerics import BLOCK_STREAMS, GRADIENT_CANCELLATION_BOUND, RTOL_EXACT
from gma_np.mixers.gma import routing
from tests.conftest import assert_close

B, H, N, K, d = 7, 3, 37, 5, 3


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 16 tokens and 3 x 16 rows: 37 tokens in 3 blocks of 13 would take 3
    sequences a block, 15 blocks in all, which two streams cannot share evenly, so 4 blocks
    of 10 tokens (10, 10, 10, 7) of 4 sequences (14 stacked sequences: 0-4, 4-8 across
    q | k at 7, 8-12, 12-14), 16 blocks."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)
    monkeypatch.setattr(routing, "ROUTING_ROWS", 3 * H * 16)


def problem(rng, dtype, per_head=True):
    """(q, k) (B, H, N, d) and a mixture whose components are far apart and sharp: the
    points drawn next to a component have their gradient taken in the direct form
    (size >> quad), those drawn near the centre of the means do not."""
    means = 3.0 * rng.standard_normal((H, K, d))
    log_var = 2 * np.log(0.3) + 0.2 * rng.standard_normal((H, K, d))
    logits = 0.5 * rng.standard_normal((H, K))
    near = rng.random((2, B, H, N)) < 0.5                         # half next to a component
    comp = rng.integers(0, K, size=(2, B, H, N))
    h = np.arange(H)[None, None, :, None]
    x = np.where(near[..., None],
                 means[h, comp] + 0.3 * rng.standard_normal((2, B, H, N, d)),
                 means.mean(axis=1)[None, None, :, None, :]
                 + 0.5 * rng.standard_normal((2, B, H, N, d)))
    q, k = x.astype(dtype)
    params = tuple(a.astype(dtype) for a in (means, log_var, logits))
    tau = rng.uniform(0.5, 1.5, H) if per_head else np.full(H, 0.8)
    return (q, k), params, tau


def route(xs, params, tau, dr, direct=False):
    mix = routing.prepare_mixture(*params)
    tau_dtype = np.dtype(params[0].dtype)
    fwd, bwd = ((routing.route_forward_direct, routing.route_backward_direct) if direct
                else (routing.route_forward, routing.route_backward))
    r, cache = fwd(xs, mix, tau, True, tau_dtype, names=("q", "k"))
    return r, cache, bwd(dr, cache)


@pytest.mark.parametrize("small_gemm", [10 ** 6, 200], ids=["block", "small-gemm"])
def test_blocks_cover_each_entry_once_within_the_rows(monkeypatch, small_gemm):
    """Every (sequence, token) in exactly one block; at most ROUTING_BLOCK tokens a block and
    at most ROUTING_SMALL_GEMM multiply-adds a GEMM (tokens x 2d x K), the tokens split into
    blocks of equal size but the last; a block's sequences within ROUTING_ROWS."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)
    monkeypatch.setattr(routing, "ROUTING_SMALL_GEMM", small_gemm)
    dd, kk = 3, 5                                                 # 2d x K = 30 per token
    cap = min(16, small_gemm // (2 * dd * kk))                    # 16, or 6 by the GEMM bound
    for rows in (1, 12, 36, 100, 144, 10 ** 6):
        monkeypatch.setattr(routing, "ROUTING_ROWS", rows)
        for P, H_, N_ in [(14, 3, 37), (1, 4, 5), (64, 4, 128), (5, 1, 1)]:
            seen = np.zeros((P, N_), dtype=int)
            blocks = list(routing._blocks(P, H_, N_, dd, kk))
            for p0, p1, n0, n1 in blocks:
                assert 0 <= p0 < p1 <= P and 0 <= n0 < n1 <= N_
                assert n1 - n0 <= cap
                # at least one sequence a block; more only within the rows
                assert p1 - p0 == 1 or (p1 - p0) * H_ * (n1 - n0) <= rows
                seen[p0:p1, n0:n1] += 1
            assert (seen == 1).all(), (rows, P, H_, N_)
            assert blocks == list(routing._blocks(P, H_, N_, dd, kk))   # sizes only decide them
            # as few token blocks as the cap allows, or up to BLOCK_STREAMS - 1 more where
            # that shares the blocks evenly among the streams; of one size but the last
            # (shorter by less than a block: 37 tokens at a cap of 16 are 13, 13, 11, not
            # 16, 16, 5)
            sizes = [n1 - n0 for p0, _, n0, n1 in blocks if p0 == 0]
            fewest = -(-N_ // cap)
            assert fewest <= len(sizes) < fewest + BLOCK_STREAMS
            if len(sizes) > fewest:
                assert len(blocks) % BLOCK_STREAMS == 0
            assert len(set(sizes[:-1])) <= 1 and 0 < sizes[-1] <= sizes[0]
            assert sizes[0] - sizes[-1] < len(sizes)


def test_small_blocks_split_the_stacked_sequences_across_q_and_k(small_blocks):
    blocks = list(routing._blocks(2 * B, H, N, d, K))
    starts = sorted({(p0, p1) for p0, p1, _, _ in blocks})
    assert starts == [(0, 4), (4, 8), (8, 12), (12, 14)]          # (4, 8) holds q[4:7], k[0]
    assert sorted({(n0, n1) for _, _, n0, n1 in blocks}) == [(0, 10), (10, 20), (20, 30), (30, 37)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_blocked_routing_matches_the_direct_form(rng, small_blocks, dtype, monkeypatch):
    # float32 too takes the tokens next to a component in the direct form (its own bound
    # would take none of these)
    monkeypatch.setattr(routing, "GRADIENT_CANCELLATION_BOUND_FLOAT32", GRADIENT_CANCELLATION_BOUND)
    xs, params, tau = problem(rng, dtype)
    dr = rng.standard_normal((2 * B, H, N, K)).astype(dtype)
    r, cache, grads = route(xs, params, tau, dr)
    # direct-form tokens in blocks of both parts, and GEMM tokens beside them
    marked = cache.direct_rows.astype(bool)
    assert marked[:B].any() and marked[B:].any() and not marked.all()
    assert marked[6:9].any() and (~marked[6:9]).any()             # the block across q | k
    # the direct form on the same values, all in one piece (no blocks)
    r_ref, _, ref = route(xs, params, tau, dr, direct=True)
    rtol = RTOL_EXACT[np.dtype(dtype)]
    assert r.dtype == dtype
    assert_close("r", r, r_ref, rtol)
    for name in ("means", "log_var", "logits", "temperature"):
        assert np.asarray(grads[name]).dtype == dtype, name
        assert_close(name, grads[name], ref[name], 10 * rtol)
    assert_close("x", grads["x"], ref["x"], 10 * rtol)


def test_blocked_routing_gives_the_same_bits_at_one_and_two_threads(rng, small_blocks,
                                                                   monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here")                  # nothing to compare
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)         # two streams on two threads
    xs, params, tau = problem(rng, np.float64)
    dr = rng.standard_normal((2 * B, H, N, K))
    results = []
    n = numba.get_num_threads()
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            results.append(route(xs, params, tau, dr))
        finally:
            numba.set_num_threads(n)
    (r1, c1, g1), (r2, c2, g2) = results
    assert np.array_equal(r1, r2) and np.array_equal(c1.direct_rows, c2.direct_rows)
    assert c1.direct_rows.any()
    for name in g1:
        assert np.array_equal(g1[name], g2[name]), name


def test_blocked_routing_gradcheck(monkeypatch):
    """Finite differences through route_forward of stacked (q, k), blocks of 2 tokens and
    one sequence, so that every block boundary is inside a part or between them."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 2)              # 2 tokens a block
    monkeypatch.setattr(routing, "ROUTING_ROWS", 1)               # one sequence a block
    rng = np.random.default_rng(7)
    b, h, n, kk, dd = 2, 2, 5, 3, 2
    inputs = dict(q=rng.standard_normal((b, h, n, dd)), k=rng.standard_normal((b, h, n, dd)),
                  means=rng.standard_normal((h, kk, dd)),
                  log_var=0.3 * rng.standard_normal((h, kk, dd)),
                  logits=0.5 * rng.standard_normal((h, kk)), temperature=rng.uniform(0.5, 1.5, h))

    def fun(q, k, means, log_var, logits, temperature):
        mix = routing.prepare_mixture(means, log_var, logits)
        return routing.route_forward((q, k), mix, temperature, True, names=("q", "k"))[0]

    def grad(dr, q, k, means, log_var, logits, temperature):
        mix = routing.prepare_mixture(means, log_var, logits)
        _, cache = routing.route_forward((q, k), mix, temperature, True, names=("q", "k"))
        g = routing.route_backward(dr, cache)
        x = g.pop("x")                                            # (2b, h, n, d): q then k
        g["q"], g["k"] = x[:b], x[b:]
        return g

    report = gma_np.gradcheck(fun, grad, inputs, mode="full")
    assert report.ok, report
    assert {c.name for c in report.inputs} == set(inputs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_the_kernels_that_write_dx_check_it(rng, small_blocks, monkeypatch, dtype):
    """route_backward's dx_check is 0 exactly when every entry of dx as stored is finite,
    whichever kernel wrote the row: a NaN in dr at one token taken in the direct form
    (_log_density_backward_rows), at one GEMM token (_dx_and_sums_from_gemm), and, in
    float32, a dr whose dx is finite in float64 but overflows float32 when stored."""
    monkeypatch.setattr(routing, "GRADIENT_CANCELLATION_BOUND_FLOAT32", GRADIENT_CANCELLATION_BOUND)
    xs, params, tau = problem(rng, dtype)
    mix = routing.prepare_mixture(*params)
    r, cache = routing.route_forward(xs, mix, tau, True, np.dtype(dtype), names=("q", "k"))
    marked = cache.direct_rows.astype(bool)
    dr = rng.standard_normal(r.shape).astype(dtype)

    def dx_check(dr):
        out = np.full(1, -1.0)
        grads = routing.route_backward(dr, cache, out)
        assert (out[0] == 0) == bool(np.isfinite(grads["x"]).all()), (out, grads["x"])
        return out[0]

    assert dx_check(dr) == 0
    for rows in (marked, ~marked):
        p, h, n = (int(i[0]) for i in np.nonzero(rows))
        bad = dr.copy()
        bad[p, h, n, 1] = np.nan
        assert np.isnan(dx_check(bad))
    if dtype == np.float32:
        huge = np.clip(dr, -3, 3) * np.float32(1e38)           # finite; dx beyond 3.4e38
        assert np.isnan(dx_check(huge))
