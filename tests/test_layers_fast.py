"""gma_np.nn.layers and gma_np.optim: the fused kernels against their plain NumPy references.

Each fast layer is checked at odd sizes in both dtypes against its `_naive` twin, and the
ones that accumulate in float64 (layer norm, the softmax cross-entropy, the convolution's
filter gradient) against a float64 evaluation of the reference on the same values:

    float64   relative error <= 1e-12 (RTOL), max-norm over the tensor
    float32   relative error <= 2e-6 against the float64 reference, element by element
              where the fast path rounds once (layer norm, softmax), max-norm otherwise

The elementwise kernels (GELU forward and backward, the embedding scatter, the
convolution's forward, AdamW) do every operation of the reference in its order and
dtype: they are checked for the same bits. The softmax cross-entropy's log-sum-exp is
checked against scipy.special.logsumexp and softmax, with ties at the maximum and
infinite and NaN rows. The backward passes are also gradchecked in tests/test_nn.py
(the public layer functions are the fast ones); here every split matrix product is
checked to give the same bits on one thread and on two.
"""

import numba
import numpy as np
import pytest
import scipy.special

from gma_np.nn import _kernels as K
from gma_np.nn import layers as L
from gma_np.optim import AdamW, adamw_update_naive, global_norm, global_norm_naive
from tests.conftest import RTOL, assert_close

DTYPES = [np.float64, np.float32]
IDS = ["float64", "float32"]


def _f64(cache):
    """A cache (tuple of arrays and other things) with its float arrays widened to float64."""
    return tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                 for a in cache)


# ---------------------------------------------------------------- GELU

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_gelu_is_the_reference_bit_for_bit(rng, dtype):
    # 3 x 70001 elements: several GELU_BLOCKs and a ragged last one; values out to +-9,
    # where tanh saturates and 1 + t cancels
    x = (3.0 * rng.standard_normal((3, 70001))).astype(dtype)
    x[0, :5] = [-9.0, -5.0, 0.0, 5.0, 9.0]
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, cache = L.gelu_forward(x)
    y_ref, cache_ref = L.gelu_forward_naive(x)
    dx, dx_ref = L.gelu_backward(dy, cache), L.gelu_backward_naive(dy, cache_ref)
    for name, got, ref in (("y", y, y_ref), ("tanh", cache[1], cache_ref[1]), ("dx", dx, dx_ref)):
        assert got.dtype == dtype, name
        assert_close(name, got, ref, RTOL[dtype])
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_gelu_takes_strided_input_and_names_a_bad_dtype(rng):
    x = rng.standard_normal((7, 9)).T                               # not C-contiguous
    np.testing.assert_array_equal(L.gelu_forward(x)[0], L.gelu_forward_naive(x)[0])
    with pytest.raises(ValueError, match="x: expected a float32 or float64 array"):
        L.gelu_forward(np.arange(6).reshape(2, 3))


# ---------------------------------------------------------------- layer norm

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_layernorm_matches_the_reference(rng, dtype):
    # an offset row mean (cancellation in x - mean) and a row of equal entries (var = 0)
    x = (rng.standard_normal((3, 37, 29)) * 2.0 + 5.0).astype(dtype)
    x[1, 4] = 3.0
    g, b = rng.standard_normal(29).astype(dtype), rng.standard_normal(29).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, cache = L.layernorm_forward(x, g, b)
    dx, dg, db = L.layernorm_backward(dy, cache)
    # the reference in float64 on the same values; the backward from the same cache
    y_ref, (xhat_ref, rstd_ref, _) = L.layernorm_forward_naive(*(a.astype(np.float64) for a in (x, g, b)))
    dx_ref, dg_ref, db_ref = L.layernorm_backward_naive(dy.astype(np.float64), _f64(cache))
    elementwise = dtype == np.float32                  # one rounding of a float64 result
    for name, got, ref in (("y", y, y_ref), ("xhat", cache[0], xhat_ref), ("rstd", cache[1], rstd_ref),
                           ("dx", dx, dx_ref), ("dg", dg, dg_ref), ("db", db, db_ref)):
        assert got.dtype == dtype, name
        assert_close(name, got, ref, RTOL[dtype], atol_scale=not elementwise or name in ("dx", "dg"))


# ---------------------------------------------------------------- softmax cross-entropy

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_log_softmax_rows_is_scipys(rng, dtype):
    # more rows than SOFTMAX_BLOCK_ROWS (a ragged last block); ties at the maximum; large
    # logits (no overflow); a row of -inf, one with +inf, one with a NaN, one with -inf entries
    M, V = L.SOFTMAX_BLOCK_ROWS + 37, 29
    flat = (4.0 * rng.standard_normal((M, V))).astype(dtype)
    flat[3, [2, 7, 11]] = flat[3].max() + 1.0
    flat[5] = 80.0 + flat[5]
    flat[6] = -np.inf
    flat[7, 4] = np.inf
    flat[8, 9] = np.nan
    flat[9, :20] = -np.inf
    lse, probs = L.log_softmax_rows(flat)
    with np.errstate(invalid="ignore"):
        lse_ref = scipy.special.logsumexp(flat.astype(np.float64), axis=-1)
        probs_ref = scipy.special.softmax(flat.astype(np.float64), axis=-1)
    assert lse.dtype == np.float64 and probs.dtype == dtype
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(lse_ref))
    np.testing.assert_array_equal(lse[~np.isfinite(lse_ref)], lse_ref[~np.isfinite(lse_ref)])
    finite = np.isfinite(lse_ref)
    assert_close("lse", lse[finite], lse_ref[finite], 1e-15, atol_scale=False)
    rows = finite & np.isfinite(probs_ref).all(axis=1)
    assert_close("probs", probs[rows], probs_ref[rows], RTOL[dtype], atol_scale=False)
    np.testing.assert_array_equal(np.isnan(probs), np.isnan(probs_ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_cross_entropy_matches_the_reference(rng, dtype, masked):
    logits = (3.0 * rng.standard_normal((3, 53, 31))).astype(dtype)
    targets = rng.integers(0, 31, (3, 53))
    mask = rng.random((3, 53)) < 0.7 if masked else None
    loss, cache = L.cross_entropy_forward(logits, targets, mask)
    loss_ref, cache_ref = L.cross_entropy_forward_naive(logits.astype(np.float64), targets, mask)
    assert_close("loss", loss, loss_ref, 1e-14)
    assert_close("probs", cache[0], cache_ref[0], RTOL[dtype], atol_scale=False)
    d = L.cross_entropy_backward(0.7, cache)
    d_ref = L.cross_entropy_backward_naive(0.7, cache)                # the same cache
    assert d.dtype == dtype and d.shape == logits.shape
    assert_close("dlogits", d, d_ref, RTOL[dtype])
    if dtype == np.float32:                            # NumPy's operations in its order
        np.testing.assert_array_equal(d, d_ref)


# ---------------------------------------------------------------- embedding, convolution, linear

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_embedding_backward_is_np_add_at(rng, dtype):
    idx = rng.integers(0, 7, (5, 13))                               # many repeats
    dout = rng.standard_normal((5, 13, 11)).astype(dtype)
    cache = (idx, (7, 11), np.dtype(dtype))
    got = L.embedding_backward(dout, cache)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, L.embedding_backward_naive(dout, cache))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("width", [1, 4, 9], ids=["w1", "w4", "w9"])
def test_causal_conv_matches_the_reference(rng, dtype, width):
    x = rng.standard_normal((3, 7, 13)).astype(dtype)               # width 9 > 7 tokens
    c = rng.standard_normal((width, 13)).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    out, cache = L.causal_conv_forward(x, c)
    out_ref, cache_ref = L.causal_conv_forward_naive(x, c)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(cache[0], cache_ref[0])
    dx, dc = L.causal_conv_backward(dout, cache)
    dx_ref, dc_ref = L.causal_conv_backward_naive(dout.astype(np.float64), _f64(cache))
    assert dx.dtype == dtype and dc.dtype == dtype
    assert_close("dx", dx, dx_ref, RTOL[dtype])
    assert_close("dc", dc, dc_ref, RTOL[dtype])
    # with history (the decode path): the same as the reference
    hist = rng.standard_normal((3, width - 1, 13)).astype(dtype)
    np.testing.assert_array_equal(L.causal_conv_forward(x, c, hist)[0],
                                  L.causal_conv_forward_naive(x, c, hist)[0])


@pytest.fixture
def split_everything(monkeypatch):
    """Every matrix product of linear_forward / linear_backward split in pieces."""
    monkeypatch.setattr(L, "MATMUL_SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(L, "MATMUL_PIECE_MIN", 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_the_reference_and_not_the_thread_count(rng, dtype, bias, split_everything):
    x = rng.standard_normal((3, 37, 13)).astype(dtype)
    W = rng.standard_normal((17, 13)).astype(dtype).T              # a transposed view (tied head)
    b = rng.standard_normal(17).astype(dtype) if bias else None
    dout = rng.standard_normal((3, 37, 17)).astype(dtype)
    runs = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            out, cache = L.linear_forward(x, W, b)
            runs.append((out,) + L.linear_backward(dout, cache))
    finally:
        numba.set_num_threads(threads)
    out_ref, cache_ref = L.linear_forward_naive(*(None if a is None else a.astype(np.float64)
                                                  for a in (x, W, b)))
    refs = (out_ref,) + L.linear_backward_naive(dout.astype(np.float64), cache_ref)
    for name, got, ref in zip(("out", "dx", "dW", "db"), runs[0], refs):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close(name, got, ref, RTOL[dtype])
        for other in runs[1:]:
            np.testing.assert_array_equal(got, other[("out", "dx", "dW", "db").index(name)],
                                          err_msg=f"{name}: one thread vs two")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_row_layers_in_pieces_are_the_whole_and_not_the_thread_count(rng, dtype, monkeypatch):
    """GELU, layer norm and the cross-entropy's softmax cut in pieces for the streams
    (STREAM_MIN_ELEMENTS 0: every call, odd sizes): the elementwise and row-wise
    results are the unsplit call's bits, layer norm's dg and db (a partial sum per
    piece, added in order) match the float64 reference, and nothing depends on the
    thread count."""
    x = (2.0 * rng.standard_normal((3, 37, 29)) + 1.0).astype(dtype)
    g, b = rng.standard_normal(29).astype(dtype), rng.standard_normal(29).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)

    def run():
        y, c = L.gelu_forward(x)
        z, cz = L.layernorm_forward(x, g, b)
        lse, probs = L.log_softmax_rows(x.reshape(-1, 29))
        return (y, L.gelu_backward(dy, c), z, cz[0], cz[1]) + L.layernorm_backward(dy, cz) + (lse, probs)

    names = ("gelu y", "gelu dx", "ln y", "ln xhat", "ln rstd", "ln dx", "ln dg", "ln db", "lse", "probs")
    whole = run()
    monkeypatch.setattr(L, "STREAM_MIN_ELEMENTS", 0)
    runs = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            runs.append(run())
    finally:
        numba.set_num_threads(threads)
    for i, name in enumerate(names):
        if name not in ("ln dg", "ln db"):
            np.testing.assert_array_equal(runs[0][i], whole[i], err_msg=f"{name}: pieces vs whole")
        for other in runs[1:]:
            np.testing.assert_array_equal(runs[0][i], other[i], err_msg=f"{name}: one thread vs two")
    # the reference's sums in float64, from the same cache (xhat, rstd, g)
    _, dg_ref, db_ref = L.layernorm_backward_naive(dy.astype(np.float64),
                                                   _f64((runs[0][3], runs[0][4], g)))
    assert_close("ln dg", runs[0][6], dg_ref, RTOL[dtype])
    assert_close("ln db", runs[0][7], db_ref, RTOL[dtype])


# ---------------------------------------------------------------- the optimiser

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "no-decay"])
def test_adamw_step_is_the_numpy_update_bit_for_bit(rng, dtype, decay):
    shapes = {"w": (5, 7), "b": (11,)}
    params = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    ref = {n: p.copy() for n, p in params.items()}
    m_ref = {n: np.zeros_like(p) for n, p in params.items()}
    v_ref = {n: np.zeros_like(p) for n, p in params.items()}
    opt = AdamW(params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                decay={"w": decay, "b": False})
    for t, lr in enumerate([1e-2, 3e-2, 2e-2], start=1):
        grads = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
        opt.step(params, grads, lr)
        for n in params:
            adamw_update_naive(ref[n], grads[n], m_ref[n], v_ref[n], lr, t, 0.9, 0.99, 1e-8,
                               0.1, opt.decay[n])
    for n in params:
        np.testing.assert_array_equal(params[n], ref[n], err_msg=n)
        np.testing.assert_array_equal(opt.m[n], m_ref[n], err_msg=f"m/{n}")
        np.testing.assert_array_equal(opt.v[n], v_ref[n], err_msg=f"v/{n}")


def test_adamw_updates_a_strided_parameter_in_place(rng):
    base = rng.standard_normal((6, 4))
    params = {"w": base[:, ::2]}                                   # a view, not contiguous
    ref = params["w"].copy()
    opt = AdamW(params)
    g = rng.standard_normal((6, 2))
    opt.step(params, {"w": g}, 1e-2)
    adamw_update_naive(ref, g, np.zeros_like(ref), np.zeros_like(ref), 1e-2, 1, 0.9, 0.99,
                       1e-8, 0.1, True)
    np.testing.assert_array_equal(base[:, ::2], ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_global_norm_matches_the_reference(rng, dtype):
    grads = {"a": rng.standard_normal((13, 7)).astype(dtype),
             "b": (1e3 * rng.standard_normal(29)).astype(dtype),
             "c": rng.standard_normal((3, 5)).astype(dtype)[:, ::2]}
    assert_close("norm", global_norm(grads), global_norm_naive(grads), 1e-13)


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compares the compiled loops with the "
                    "interpreted ones; with NUMBA_DISABLE_JIT=1 every test runs them interpreted")
def test_kernels_run_without_numba():
    # the loops are plain Python: the same results through the interpreter (what
    # NUMBA_DISABLE_JIT=1 runs), here on one small case per kernel
    rng = np.random.default_rng(0)
    x = rng.standard_normal(9)
    u_jit, u_py = np.empty(9), np.empty(9)
    K._gelu_inner(x, u_jit, L.GELU_C, L.GELU_A)
    K._gelu_inner.py_func(x, u_py, L.GELU_C, L.GELU_A)
    np.testing.assert_array_equal(u_jit, u_py)
    flat = rng.standard_normal((3, 5))
    outs = []
    for fn in (K._layernorm_forward, K._layernorm_forward.py_func):
        y, xhat, rstd = np.empty((3, 5)), np.empty((3, 5)), np.empty(3)
        fn(flat, np.ones(5), np.zeros(5), L.LAYERNORM_EPS, y, xhat, rstd)
        outs.append(y)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-14)
