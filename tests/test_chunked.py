"""The chunked form of causal mixing (gma_np.memory.chunked) against the dense N x N reference and the
token scan, forward and backward; finite differences; exact causality; eps = 0; thread counts."""

import numba
import numpy as np
import pytest

from gma_np._numerics import DEFAULT_EPS
from gma_np.memory.chunked import causal_chunked_backward, causal_chunked_forward
from tests.conftest import assert_close, assert_results_close
from tests.conftest import causal_dense as dense
from tests.conftest import causal_scan as scan

P, N, K, E = 4, 37, 5, 3
CHUNKS = (1, 4, 16, 37, 64)


def softmax_rows(x):
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def make_mixing(rng, P=P, N=N, K=K, e=E, masked=False, dtype=np.float64, empty_start=False):
    """rq, rk (P, N, K) softmax rows (rk with masked rows zeroed), v, do (P, N, e).
    empty_start: the first 3 keys of sequence 0 are masked (its first queries read an empty
    memory: o = 0 / eps); else the first key of every sequence is real."""
    rq = softmax_rows(2.0 * rng.standard_normal((P, N, K)))                 # (P, N, K)
    rk = softmax_rows(2.0 * rng.standard_normal((P, N, K)))                 # (P, N, K)
    if masked:
        keep = rng.random((P, N)) > 0.3                                     # (P, N)
        keep[:, 0] = True                                                   # no empty first read
        if empty_start:
            keep[0, :3] = False
        rk = rk * keep[:, :, None]
    v = rng.standard_normal((P, N, e))                                      # (P, N, e)
    do = rng.standard_normal((P, N, e))                                     # (P, N, e)
    return tuple(a.astype(dtype) for a in (rq, rk, v, do))


def chunked(rq, rk, v, do, slot, eps, chunk):
    out = causal_chunked_forward(rq, rk, v, slot, eps, chunk)
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    dv = causal_chunked_backward(rq, rk, v, do, slot, eps, chunk, drq, drk)
    return out, drq, drk, dv


NAMES = ("o", "drq", "drk", "dv")


@pytest.mark.parametrize("chunk", CHUNKS, ids=[f"C{c}" for c in CHUNKS])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_matches_dense_and_scan(dtype, norm, masked, chunk):
    """P=4, N=37, K=5, e=3: every output and gradient to 1e-12 (float64) or 2e-6 (float32)."""
    rng = np.random.default_rng(11)
    args = make_mixing(rng, masked=masked, dtype=dtype, empty_start=True)
    slot = norm == "slot"
    assert_results_close(NAMES, chunked(*args, slot, DEFAULT_EPS, chunk), dtype,
                         dense=dense(*args, slot, DEFAULT_EPS), scan=scan(*args, slot, DEFAULT_EPS))


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_gradient_buffers_may_be_strided_views(norm):
    """drq, drk written through non-contiguous views, as gma_backward passes slices of one buffer."""
    rng = np.random.default_rng(12)
    rq, rk, v, do = make_mixing(rng, masked=True)
    slot = norm == "slot"
    _, drq_ref, drk_ref, dv_ref = chunked(rq, rk, v, do, slot, DEFAULT_EPS, 16)
    buf = np.full((P, N, 2 * K), np.nan)                                    # (P, N, 2K)
    dv = causal_chunked_backward(rq, rk, v, do, slot, DEFAULT_EPS, 16, buf[:, :, ::2], buf[:, :, 1::2])
    assert np.array_equal(buf[:, :, ::2], drq_ref) and np.array_equal(buf[:, :, 1::2], drk_ref)
    assert np.array_equal(dv, dv_ref)


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_backward_against_central_differences(norm, chunk):
    """float64, P=2, N=9, K=3, e=2: d sum(o * do) / d x by central differences, every element."""
    rng = np.random.default_rng(13)
    rq, rk, v, do = make_mixing(rng, P=2, N=9, K=3, e=2, masked=True)
    slot = norm == "slot"
    _, drq, drk, dv = chunked(rq, rk, v, do, slot, DEFAULT_EPS, chunk)
    h = 1e-6

    def loss():
        return float((causal_chunked_forward(rq, rk, v, slot, DEFAULT_EPS, chunk) * do).sum())

    for name, x, g in (("drq", rq, drq), ("drk", rk, drk), ("dv", v, dv)):
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            x0 = x[idx]
            x[idx] = x0 + h
            up = loss()
            x[idx] = x0 - h
            down = loss()
            x[idx] = x0
            fd[idx] = (up - down) / (2 * h)
        assert_close(f"{name} vs central differences", g, fd, 1e-7)


def bits(a):
    return a.view(np.uint64 if a.dtype == np.float64 else np.uint32)


@pytest.mark.parametrize("chunk,t", [(16, 16), (16, 32), (16, 21), (16, 1), (4, 8), (4, 35), (37, 18)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_future_tokens_change_nothing_before_t(dtype, norm, masked, chunk, t):
    """Tokens >= t changed (t at a chunk boundary or inside a chunk): outputs before t and the
    gradients of a loss on them, bit for bit the same."""
    rng = np.random.default_rng(14)
    rq, rk, v, do = make_mixing(rng, masked=masked, dtype=dtype)
    do[:, t:] = 0.0                                                         # loss on outputs before t
    rq2, rk2, v2 = rq.copy(), rk.copy(), v.copy()
    future = make_mixing(np.random.default_rng(15), N=N - t, masked=masked, dtype=dtype)
    rq2[:, t:], rk2[:, t:] = future[0], 3.0 * future[1]
    v2[:, t:] = 10.0 * future[2]
    slot = norm == "slot"
    a = chunked(rq, rk, v, do, slot, DEFAULT_EPS, chunk)
    b = chunked(rq2, rk2, v2, do, slot, DEFAULT_EPS, chunk)
    assert not np.array_equal(a[0][:, t:], b[0][:, t:]), "the change did not reach the future"
    for name, x, y in zip(NAMES, a, b):
        assert np.array_equal(bits(x[:, :t]), bits(y[:, :t])), f"{name} before t={t} changed"


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_eps_zero_without_empty_reads(norm, masked, chunk):
    """eps = 0, every query reads a non-empty memory (the first key is real, rk > 0): finite,
    and equal to the dense form; padding rows of the last chunk must not produce NaN either."""
    rng = np.random.default_rng(16)
    args = make_mixing(rng, masked=masked)
    slot = norm == "slot"
    with np.errstate(all="raise"):
        got = chunked(*args, slot, 0.0, chunk)
    for name, g, r in zip(NAMES, got, dense(*args, slot, 0.0)):
        assert np.isfinite(g).all(), f"{name} is not finite"
        assert_close(f"{name} vs dense (eps=0)", g, r, 1e-12)


@pytest.mark.skipif(numba.get_num_threads() < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_same_bits_for_any_thread_count(norm):
    """The sequences run in streams on threads; each is computed by the same calls either way."""
    rng = np.random.default_rng(17)
    args = make_mixing(rng, P=4, N=300, K=16, e=16, masked=True)
    slot = norm == "slot"
    n = numba.get_num_threads()
    many = chunked(*args, slot, DEFAULT_EPS, 32)
    numba.set_num_threads(1)
    try:
        one = chunked(*args, slot, DEFAULT_EPS, 32)
    finally:
        numba.set_num_threads(n)
    for name, x, y in zip(NAMES, many, one):
        assert np.array_equal(bits(x), bits(y)), f"{name} differs between 1 and {n} threads"
