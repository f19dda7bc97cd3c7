"""Softmax attention (gma_np.mixers.softmax): the blocked fast path against the dense reference.

Blocked vs dense at odd sizes and several blocks (N = 300 with blocks of 64: N not a
multiple of the block), float64 (rtol 1e-12) and float32 (2e-6, against the float64
reference on the same inputs), causal and bidirectional, with and without a key mask
(one sequence all padding), forward and backward; the fused row softmax against scipy;
every gradient by finite differences; the backward keeps no N x N array; exact
causality; decoding in any chunking equals the causal forward; clear errors.
"""

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

import gma_np
from gma_np.mixers.attention import projection_shapes
from gma_np.mixers.softmax import (
    SOFTMAX_BLOCK,
    SoftmaxAttentionCache,
    SoftmaxAttentionState,
    softmax_attention,
    softmax_attention_backward,
    softmax_attention_forward,
    softmax_attention_recurrent,
)
from gma_np.mixers.softmax import core
from gma_np.mixers.softmax.blocked import row_softmax
from gma_np.mixers.softmax.naive import (
    softmax_attention_naive_backward,
    softmax_attention_naive_forward,
)
from gma_np.mixers.softmax.recurrent import KV_INITIAL_CAPACITY
from tests.conftest import RTOL, assert_close

# (B, H, N, d, e, block): blocks of 7 and 64 put several blocks (and a partial last one)
# through the block loops; N = 1 is the smallest sequence.
SIZES = [(2, 3, 37, 5, 3, 7), (2, 3, 37, 5, 3, SOFTMAX_BLOCK), (1, 2, 300, 4, 3, 64),
         (2, 2, 300, 3, 2, SOFTMAX_BLOCK), (3, 1, 1, 2, 1, SOFTMAX_BLOCK)]
SIZE_IDS = [f"B{B}-H{H}-N{N}-d{d}-e{e}-block{b}" for B, H, N, d, e, b in SIZES]
DTYPES = [np.float64, np.float32]


def make_inputs(rng, B, H, N, d, e, dtype=np.float64, masked=False):
    """q, k, v and a key mask (about 30% padding, and for B >= 2 the last sequence all padding)."""
    q, k = rng.standard_normal((2, B, H, N, d))
    v = rng.standard_normal((B, H, N, e))
    mask = None
    if masked:
        mask = rng.random((B, N)) > 0.3
        if B >= 2:
            mask[-1] = False
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_blocked_matches_dense(size, causal, masked, dtype):
    *shape, block = size
    rng = np.random.default_rng(1)
    q, k, v, mask = make_inputs(rng, *shape, dtype=dtype, masked=masked)
    do = rng.standard_normal(v.shape).astype(dtype)
    o, cache = softmax_attention_forward(q, k, v, causal=causal, key_mask=mask, block=block)
    assert o.dtype == dtype and o.shape == v.shape
    # the reference in float64 on the same (float32-representable) inputs
    ref, ref_cache = softmax_attention_naive_forward(q, k, v, causal=causal, key_mask=mask)
    assert_close("o", o, ref, RTOL[dtype])
    finite = np.isfinite(ref_cache["L"])
    assert np.array_equal(np.isfinite(cache.L), finite), "a row with no admissible key differs"
    assert_close("L", cache.L[finite], ref_cache["L"][finite], 1e-14)
    g = softmax_attention_backward(do, cache)
    ref_g = softmax_attention_naive_backward(do, ref_cache)
    for name in ("q", "k", "v"):
        assert g[name].dtype == dtype
        assert_close(f"d{name}", g[name], ref_g[name], RTOL[dtype])
    if masked and shape[0] >= 2:
        # the all-padding sequence: no query has an admissible key, o = 0, no gradient
        assert not o[-1].any() and np.isneginf(cache.L[-1]).all()
        assert not (g["q"][-1].any() or g["k"][-1].any() or g["v"][-1].any())


def test_a_causal_query_with_only_padding_before_it_outputs_zero():
    rng = np.random.default_rng(2)
    q, k, v, _ = make_inputs(rng, 1, 2, 9, 3, 2)
    mask = np.ones((1, 9), dtype=bool)
    mask[0, :3] = False                                   # queries 0, 1, 2 have no key yet
    o, cache = softmax_attention_forward(q, k, v, causal=True, key_mask=mask, block=4)
    assert not o[:, :, :3].any() and np.abs(o[:, :, 3:]).min() > 0
    g = softmax_attention_backward(np.ones_like(o), cache)
    assert not g["q"][:, :, :3].any() and not g["k"][:, :, :3].any() and not g["v"][:, :, :3].any()


def test_row_softmax_matches_scipy():
    """The fused row softmax: L against scipy.special.logsumexp, p against scipy.special.softmax,
    on rows with -inf entries, a row of one admissible entry, an empty row, and rows of large
    scores (the shift by the row maximum keeps exp from overflowing)."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 3, 11, 29)) * 4
    s[0, 0, :, ::3] = -np.inf
    s[0, 1, 2, 1:] = -np.inf                              # one admissible entry
    s[1, 2] += 900.0                                      # exp(900) overflows without the shift
    s[1, 1, 4] = -np.inf                                  # an empty row
    empty = np.isneginf(s).all(axis=-1)
    p = s.copy()
    L = row_softmax(p)
    with np.errstate(invalid="ignore"):                   # scipy's softmax of the empty row: nan
        ref_L, ref_p = logsumexp(s, axis=-1), softmax(s, axis=-1)
    assert_close("L", L[~empty], ref_L[~empty], 1e-15, atol_scale=False)
    assert_close("p", p[~empty], ref_p[~empty], 1e-15)
    assert np.isneginf(L[empty]).all() and not p[empty].any()


def test_large_scores_stay_finite():
    """Scores of several hundred: the stable softmax matches the reference (scipy's logsumexp)."""
    rng = np.random.default_rng(4)
    q, k, v, mask = make_inputs(rng, 2, 2, 37, 4, 3, masked=True)
    q *= 30.0
    for causal in (False, True):
        o = softmax_attention(q, k, v, causal=causal, key_mask=mask)
        assert np.isfinite(o).all()
        ref = softmax_attention_naive_forward(q, k, v, causal=causal, key_mask=mask)[0]
        assert_close("o", o, ref, 1e-12)


def test_scale():
    """scale=None is 1/sqrt(d); another scale is the reference's with that scale."""
    q, k, v, _ = make_inputs(np.random.default_rng(5), 2, 2, 37, 5, 3)
    assert np.array_equal(softmax_attention(q, k, v), softmax_attention(q, k, v, scale=1 / np.sqrt(5)))
    o = softmax_attention(q, k, v, causal=True, scale=1.7)
    assert_close("o", o, softmax_attention_naive_forward(q, k, v, causal=True, scale=1.7)[0], 1e-12)
    assert not np.allclose(o, softmax_attention(q, k, v, causal=True))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_by_finite_differences(causal, masked):
    """Every element of dq, dk, dv (full mode), in float64, through several blocks of 4."""
    rng = np.random.default_rng(6)
    q, k, v, mask = make_inputs(rng, 2, 2, 7, 3, 2, masked=masked)
    if masked:
        mask[:] = [[False, True, True, False, True, True, True],   # query 0 has no key (causal)
                   [True, True, False, True, True, False, True]]
    opts = dict(causal=causal, key_mask=mask, block=4)

    def fun(q, k, v):
        return softmax_attention_forward(q, k, v, **opts)[0]

    def grad(do, q, k, v):
        return softmax_attention_backward(do, softmax_attention_forward(q, k, v, **opts)[1])

    report = gma_np.gradcheck(fun, grad, dict(q=q, k=k, v=v), mode="full")
    assert report.ok, report
    assert {c.name for c in report.inputs} == {"q", "k", "v"}


def test_dense_backward_by_finite_differences():
    """The reference's own backward is right too (it is what the blocked one is compared to)."""
    q, k, v, mask = make_inputs(np.random.default_rng(7), 1, 2, 6, 3, 2, masked=True)

    def fun(q, k, v):
        return softmax_attention_naive_forward(q, k, v, causal=True, key_mask=mask)[0]

    def grad(do, q, k, v):
        return softmax_attention_naive_backward(
            do, softmax_attention_naive_forward(q, k, v, causal=True, key_mask=mask)[1])

    report = gma_np.gradcheck(fun, grad, dict(q=q, k=k, v=v), mode="full")
    assert report.ok, report


def _peak_bytes(call):
    """Peak of the memory NumPy allocates during call() (tracemalloc), after a warm call."""
    call()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_backward_keeps_no_n_by_n_array(causal):
    """The cache holds no array with two axes of size N, and forward and backward hold one
    block of scores at a time: their peak memory is below 1.75 blocks of (nb, N) float64
    scores (measured 1.4-1.5: the block, one tile, the float64 accumulators and the outputs;
    two blocks alive at once would be above 2), a tenth of one dense (N, N) P."""
    B, H, N, d, e, block = 1, 1, 600, 4, 3, 64
    q, k, v, mask = make_inputs(np.random.default_rng(8), B, H, N, d, e, masked=True)
    o, cache = softmax_attention_forward(q, k, v, causal=causal, key_mask=mask, block=block)
    for name, value in vars(cache).items():
        if isinstance(value, np.ndarray):
            assert list(value.shape).count(N) <= 1, f"cache.{name} has shape {value.shape}"
    do = np.ones_like(o)
    one_block = B * H * block * N * 8
    peaks = {"forward": _peak_bytes(lambda: softmax_attention_forward(q, k, v, causal=causal,
                                                                      key_mask=mask, block=block)),
             "backward": _peak_bytes(lambda: softmax_attention_backward(do, cache))}
    for name, peak in peaks.items():
        assert peak < 1.75 * one_block, (f"{name} peak {peak} bytes, one block of scores is "
                                         f"{one_block}, a dense P {B * H * N * N * 8}")


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", [1, 18, 36])
@pytest.mark.parametrize("block", [7, SOFTMAX_BLOCK], ids=["block7", "blockdefault"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_future_tokens_change_nothing_before_t(dtype, block, t, masked):
    """Changing q, k, v (and the mask) at positions >= t changes nothing before t, bit for
    bit: neither the outputs nor any gradient of a loss on the outputs before t."""
    rng = np.random.default_rng(9)
    B, H, N, e = 2, 2, 37, 3
    q, k, v, mask = make_inputs(rng, B, H, N, 4, e, dtype=dtype, masked=masked)
    if masked:
        mask[-1] = rng.random(N) > 0.3                    # causally, an all-padding row says little
    changed = [a.copy() for a in (q, k, v)]
    for a in changed:
        a[:, :, t:] = (rng.standard_normal(a[:, :, t:].shape) * 3).astype(dtype)
    changed_mask = None
    if masked:
        changed_mask = mask.copy()
        changed_mask[:, t:] = ~changed_mask[:, t:]
    o_a, cache_a = softmax_attention_forward(q, k, v, causal=True, key_mask=mask, block=block)
    o_b, cache_b = softmax_attention_forward(*changed, causal=True, key_mask=changed_mask, block=block)
    assert np.array_equal(o_a[:, :, :t], o_b[:, :, :t]), "an output before t changed"
    assert not np.array_equal(o_a[:, :, t:], o_b[:, :, t:]), "the change did not reach the future"
    do = np.zeros(o_a.shape, dtype=dtype)
    do[:, :, :t] = rng.standard_normal((B, H, t, e))
    g_a = softmax_attention_backward(do, cache_a)
    g_b = softmax_attention_backward(do, cache_b)
    for name in ("q", "k", "v"):
        assert np.array_equal(g_a[name][:, :, :t], g_b[name][:, :, :t]), f"d{name} before t changed"
        assert not np.any(g_a[name][:, :, t:]), f"d{name} at or after t is not exactly zero"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_decoding_in_any_chunks_equals_the_causal_forward(dtype, masked):
    """Token by token past the first capacities (64, 128: the buffers double twice), and in
    uneven chunks, decoding gives the causal forward of the whole sequence."""
    rng = np.random.default_rng(10)
    B, H, N, d, e = 2, 2, 150, 3, 2
    q, k, v, mask = make_inputs(rng, B, H, N, d, e, dtype=dtype, masked=masked)
    if masked:
        mask[-1, :5] = False                              # a sequence starting with padding
        mask[-1, 5:] = True
    full = softmax_attention(q, k, v, causal=True, key_mask=mask)
    chunk_mask = (lambda a, b: None) if mask is None else (lambda a, b: mask[:, a:b])
    for bounds in ([(t, t + 1) for t in range(N)], [(0, 1), (1, 40), (40, 41), (41, 150)]):
        state, outs = None, []
        for a, b in bounds:
            o, state = softmax_attention_recurrent(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state,
                                                   key_mask=chunk_mask(a, b))
            assert o.dtype == dtype and state.length == b
            outs.append(o)
        assert_close(f"decoded in {len(bounds)} chunks", np.concatenate(outs, axis=2), full, RTOL[dtype])
        assert np.array_equal(state.keys, k) and np.array_equal(state.values, v)
    assert state._buffers.capacity == 256 and KV_INITIAL_CAPACITY == 64


def test_states_are_values():
    """Continuing a state does not change it, and two branches from one prefix are both right."""
    rng = np.random.default_rng(11)
    q, k, v, _ = make_inputs(rng, 1, 2, 20, 3, 2)
    q2, k2, v2, _ = make_inputs(rng, 1, 2, 20, 3, 2)
    _, prefix = softmax_attention_recurrent(q[:, :, :12], k[:, :, :12], v[:, :, :12])
    saved = (prefix.keys.copy(), prefix.values.copy(), prefix.length)
    o_a, state_a = softmax_attention_recurrent(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], prefix)
    o_b, state_b = softmax_attention_recurrent(q2[:, :, 12:], k2[:, :, 12:], v2[:, :, 12:], prefix)
    assert np.array_equal(prefix.keys, saved[0]) and np.array_equal(prefix.values, saved[1])
    assert prefix.length == saved[2] == 12 and state_a.length == state_b.length == 20
    for o, (qq, kk, vv) in ((o_a, (q, k, v)), (o_b, (q2, k2, v2))):
        whole = [np.concatenate([x[:, :, :12], y[:, :, 12:]], axis=2) for x, y in zip((q, k, v), (qq, kk, vv))]
        assert_close("branch", o, softmax_attention(*whole, causal=True)[:, :, 12:], 1e-12)
    assert np.array_equal(state_a.keys[:, :, 12:], k[:, :, 12:]), "the second branch overwrote the first"
    with pytest.raises(ValueError):
        state_a.keys[0, 0, 0, 0] = 1.0                    # read-only views


def test_core_adapter():
    cfg = SimpleNamespace(n_heads=2, head_dim=3, value_dim=2, d_model=4, n_layers=1)
    q, k, v, mask = make_inputs(np.random.default_rng(12), 2, 2, 9, 3, 2, masked=True)
    rng = np.random.default_rng(0)
    # no parameters of the core's own, no buffers: the mixer's are the shell's projections
    assert core.MIXER.parameter_shapes(cfg) == projection_shapes(cfg)
    assert core.MIXER.buffer_shapes(cfg) == {} and core.MIXER.init_buffers(cfg, rng) == {}
    assert core.CAUSAL_ONLY is False
    assert core.MIXER.name == "softmax"
    o, cache = core.forward(q, k, v, {}, cfg, causal=True, key_mask=mask)
    assert np.array_equal(o, softmax_attention(q, k, v, causal=True, key_mask=mask))
    assert_close("reference", core.reference(q, k, v, {}, cfg, causal=True, key_mask=mask), o, 1e-12)
    do = rng.standard_normal(o.shape)
    dq, dk, dv, dp = core.backward(do, cache)
    g = softmax_attention_backward(do, cache)
    assert dp == {} and all(np.array_equal(a, g[n]) for a, n in ((dq, "q"), (dk, "k"), (dv, "v")))
    state = core.decode_init(2, {}, cfg)
    assert isinstance(state, SoftmaxAttentionState) and state.length == 0
    o1, state = core.decode(q[:, :, :4], k[:, :, :4], v[:, :, :4], {}, cfg, state)
    o2, state = core.decode(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], {}, cfg, state)
    assert_close("decode", np.concatenate([o1, o2], axis=2), softmax_attention(q, k, v, causal=True), 1e-12)


def test_bad_input_gets_a_clear_error():
    q, k, v, mask = make_inputs(np.random.default_rng(13), 2, 2, 9, 3, 2, masked=True)
    cases = [
        (TypeError, "q: expected dtype float32 or float64", lambda: softmax_attention(q.astype(int), k, v)),
        (TypeError, "one dtype", lambda: softmax_attention(q, k.astype(np.float32), v)),
        (ValueError, "k: expected shape", lambda: softmax_attention(q, k[:, :, :5], v)),
        (ValueError, "v: expected shape", lambda: softmax_attention(q, k, v[:1])),
        (ValueError, "q: expected finite values", lambda: softmax_attention(np.where(q > 1, np.nan, q), k, v)),
        (ValueError, "key_mask: expected shape", lambda: softmax_attention(q, k, v, key_mask=mask[:, :4])),
        (TypeError, "causal: expected a bool", lambda: softmax_attention(q, k, v, causal="yes")),
        (ValueError, "scale: expected a finite float > 0", lambda: softmax_attention(q, k, v, scale=-1.0)),
        (TypeError, "scale: expected a float", lambda: softmax_attention(q, k, v, scale="1")),
        (ValueError, "block: expected an integer >= 1", lambda: softmax_attention_forward(q, k, v, block=0)),
        (TypeError, "cache: expected a SoftmaxAttentionCache", lambda: softmax_attention_backward(v, {"q": q})),
        (ValueError, "do: expected shape",
         lambda: softmax_attention_backward(v[:, :, :4], softmax_attention_forward(q, k, v)[1])),
        (TypeError, "state: expected a SoftmaxAttentionState",
         lambda: softmax_attention_recurrent(q, k, v, state=object())),
        (ValueError, "state: holds (B, H, d, e) = (2, 2, 4, 2)",
         lambda: softmax_attention_recurrent(q, k, v, state=SoftmaxAttentionState(2, 2, 4, 2))),
        (TypeError, "expected dtype float64 (the dtype of the cached keys",
         lambda: softmax_attention_recurrent(*(a.astype(np.float32) for a in (q, k, v)),
                                             state=softmax_attention_recurrent(q, k, v)[1])),
        (ValueError, "d: expected an integer >= 1", lambda: SoftmaxAttentionState(2, 2, 0, 2)),
    ]
    for error, message, call in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), f"{message!r} not in {str(info.value)!r}"
    assert isinstance(softmax_attention_forward(q, k, v)[1], SoftmaxAttentionCache)
