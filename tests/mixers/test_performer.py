"""FAVOR+ random-feature attention (gma_np.mixers.performer): the fast path against its naive
reference, the projections, and the stabiliser's exact causality.

Fast vs the dense N x N form with the paper's unstabilised features at odd sizes, float64
(rtol 1e-12) and float32 (2e-6, against the float64 reference on the same inputs), causal
and bidirectional, with and without a key mask (one sequence all padding); every gradient
by finite differences; exact causality, including the prefix of a sequence to which tokens
are appended (the defect of a key maximum over the whole sequence); decoding in any
chunking equals the causal forward; the projections; clear errors.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import gma_np
from gma_np.mixers.attention import projection_shapes
from gma_np.memory.ops import memory_forward
from gma_np.mixers.linear import LinearAttentionState
from gma_np.mixers.performer import (
    PerformerState,
    draw_projections,
    performer_attention,
    performer_attention_backward,
    performer_attention_forward,
    performer_attention_recurrent,
)
from gma_np.mixers.performer import core
from gma_np.mixers.performer.features import feature_shift, positive_features
from gma_np.mixers.performer.naive import (
    performer_attention_dense,
    performer_attention_loop,
    positive_random_features,
)
from tests.conftest import RTOL, assert_close

# (B, H, N, d, e, m): m below, above and not a multiple of d (a partial last block)
SIZES = [(2, 3, 37, 5, 3, 7), (1, 2, 300, 4, 3, 9), (3, 1, 1, 2, 1, 3)]
SIZE_IDS = [f"B{B}-H{H}-N{N}-d{d}-e{e}-m{m}" for B, H, N, d, e, m in SIZES]
DTYPES = [np.float64, np.float32]


def make_inputs(rng, B, H, N, d, e, m, dtype=np.float64, masked=False):
    """q, k, v, projections and a key mask (about 30% padding, and for B >= 2 the last
    sequence all padding)."""
    q, k = rng.standard_normal((2, B, H, N, d))
    v = rng.standard_normal((B, H, N, e))
    W = draw_projections(H, m, d, rng)
    mask = None
    if masked:
        mask = rng.random((B, N)) > 0.3
        if B >= 2:
            mask[-1] = False
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), W, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_fast_matches_dense(size, causal, masked, dtype):
    """The stabilised fast path equals the unstabilised definition: the stabiliser and
    eps * exp(-c) cancel exactly, to rounding."""
    q, k, v, W, mask = make_inputs(np.random.default_rng(1), *size, dtype=dtype, masked=masked)
    o = performer_attention(q, k, v, W, causal=causal, key_mask=mask)
    assert o.dtype == dtype and o.shape == v.shape
    ref = performer_attention_dense(q, k, v, W, causal=causal, key_mask=mask)
    assert_close("o", o, ref, RTOL[dtype])
    if masked and size[0] >= 2:
        assert not o[-1].any(), "an all-padding sequence reads an empty memory: o = 0 / eps = 0"


def test_eps_is_the_eps_of_the_unstabilised_definition():
    """A large eps shows where it enters: the fast path with eps equals the dense form with
    eps, not with eps * exp(c) or eps * exp(-c)."""
    q, k, v, W, _ = make_inputs(np.random.default_rng(2), 1, 2, 9, 3, 2, 5)
    A = positive_random_features(q[0, 0], W[0]) @ positive_random_features(k[0, 0], W[0]).T
    eps = float(np.median(A.sum(axis=1)))           # as large as a typical denominator
    o = performer_attention(q, k, v, W, eps=eps)
    assert_close("o", o, performer_attention_dense(q, k, v, W, eps=eps), 1e-12)
    assert not np.allclose(o, performer_attention(q, k, v, W, eps=1e-6), rtol=1e-3)


def test_the_chunked_causal_form_gives_the_same(monkeypatch):
    """Where m e is large the memory takes GMA's chunked form (causal_form): forced here at
    N = 300 (several groups of chunks), the outputs match the dense form and the gradients
    the token scan's."""
    q, k, v, W, mask = make_inputs(np.random.default_rng(19), 2, 2, 300, 4, 3, 9, masked=True)
    do = np.random.default_rng(20).standard_normal(v.shape)
    o_scan, c_scan = performer_attention_forward(q, k, v, W, causal=True, key_mask=mask)
    monkeypatch.setattr("gma_np.memory.ops.causal_form", lambda F, e: "chunked")
    o, cache = performer_attention_forward(q, k, v, W, causal=True, key_mask=mask)
    assert not np.array_equal(o, o_scan), "the chunked form was not used (same rounding as the scan)"
    assert_close("o", o, performer_attention_dense(q, k, v, W, causal=True, key_mask=mask), 1e-12)
    g, g_scan = performer_attention_backward(do, cache), performer_attention_backward(do, c_scan)
    for name in ("q", "k", "v"):
        assert_close(f"d{name}", g[name], g_scan[name], 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_loop_matches_dense(masked):
    q, k, v, W, mask = make_inputs(np.random.default_rng(3), 2, 2, 23, 3, 4, 5, masked=masked)
    o = performer_attention_loop(q, k, v, W, key_mask=mask)
    assert_close("o", o, performer_attention_dense(q, k, v, W, causal=True, key_mask=mask), 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_by_finite_differences(causal, masked):
    q, k, v, W, mask = make_inputs(np.random.default_rng(4), 2, 2, 6, 3, 2, 5, masked=masked)
    if masked:
        mask[:, 0] = True                            # each sequence reads something

    def fun(q, k, v):
        return performer_attention(q, k, v, W, causal=causal, key_mask=mask)

    def grad(do, q, k, v):
        return performer_attention_backward(
            do, performer_attention_forward(q, k, v, W, causal=causal, key_mask=mask)[1])

    report = gma_np.gradcheck(fun, grad, dict(q=q, k=k, v=v), mode="full")
    assert report.ok, report
    assert {c.name for c in report.inputs} == {"q", "k", "v"}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_gradients_match_float64(causal):
    """float32 in, float32 gradients out, within 2e-6 of the float64 gradients of the same
    (float32-rounded) inputs: features, memory and read-out are float64 inside."""
    q, k, v, W, mask = make_inputs(np.random.default_rng(5), 2, 3, 37, 5, 3, 7,
                                   dtype=np.float32, masked=True)
    do = np.random.default_rng(6).standard_normal(v.shape).astype(np.float32)
    g32 = performer_attention_backward(do, performer_attention_forward(q, k, v, W, causal=causal,
                                                                       key_mask=mask)[1])
    c64 = performer_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), W,
                                      causal=causal, key_mask=mask)[1]
    g64 = performer_attention_backward(do.astype(np.float64), c64)
    for name in ("q", "k", "v"):
        assert g32[name].dtype == np.float32
        assert_close(f"d{name}", g32[name], g64[name], RTOL[np.float32])
    padding = ~mask[:, None, :].repeat(3, axis=1)                # (B, H, N)
    assert not g64["k"][padding].any() and not g64["v"][padding].any(), "a padding key got a gradient"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", [1, 18, 36])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_future_tokens_change_nothing_before_t(dtype, t, masked):
    rng = np.random.default_rng(7)
    B, H, N, d, e, m = 2, 2, 37, 4, 3, 6
    q, k, v, W, mask = make_inputs(rng, B, H, N, d, e, m, dtype=dtype, masked=masked)
    changed = [a.copy() for a in (q, k, v)]
    for a in changed:
        a[:, :, t:] = (2 * rng.standard_normal(a[:, :, t:].shape)).astype(dtype)
    mask_b = None
    if masked:
        mask_b = mask.copy()
        mask_b[:, t:] = ~mask_b[:, t:]
    o_a, cache_a = performer_attention_forward(q, k, v, W, causal=True, key_mask=mask)
    o_b, cache_b = performer_attention_forward(*changed, W, causal=True, key_mask=mask_b)
    assert np.array_equal(o_a[:, :, :t], o_b[:, :, :t]), "an output before t changed"
    assert not np.array_equal(o_a[:, :, t:], o_b[:, :, t:]), "the change did not reach the future"
    do = np.zeros(o_a.shape, dtype=dtype)
    do[:, :, :t] = rng.standard_normal((B, H, t, e))
    g_a, g_b = performer_attention_backward(do, cache_a), performer_attention_backward(do, cache_b)
    for name in ("q", "k", "v"):
        assert np.array_equal(g_a[name][:, :, :t], g_b[name][:, :, :t]), f"d{name} before t changed"
        assert not g_a[name][:, :, t:].any(), f"d{name} at or after t is not exactly zero"


def _whole_sequence_maximum(q, k, v, W, eps):
    """The known defect, for contrast: queries stabilised by their own maximum, keys by the
    maximum over every key of the sequence (and eps added after), as a popular
    implementation does. Causal outputs of a prefix then depend on later keys."""
    B, H, N, d = q.shape
    c = feature_shift(W)
    rq = positive_features(q, W, 0.5 * c).reshape(B * H, N, -1)
    rk = positive_features(k, W, 0.5 * c).reshape(B * H, N, -1)
    rq = rq / rq.max(axis=2, keepdims=True)
    rk = rk / rk.max(axis=(1, 2), keepdims=True)
    return memory_forward(rq, rk, v.reshape(B * H, N, -1), causal=True, eps=eps)


@pytest.mark.parametrize("prefix", [1, 20, 299])
def test_prefix_outputs_unchanged_when_tokens_are_appended(prefix):
    """Bit for bit, the outputs of a prefix are those of the prefix alone. The appended key
    is the one with the largest possible feature (k' = the longest projection row), so a
    stabiliser that looked at it would move every earlier output: the contrast shows it."""
    B, H, N, d, e, m = 2, 2, 300, 4, 3, 6
    q, k, v, W, _ = make_inputs(np.random.default_rng(8), B, H, N, d, e, m)
    h, r = np.unravel_index(np.argmax((W * W).sum(axis=2)), W.shape[:2])
    k[:, h, prefix:] = W[h, r] * d ** 0.25          # phi^_r(k) = 1 / sqrt(m), the bound
    alone = performer_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], W, causal=True)
    full = performer_attention(q, k, v, W, causal=True)
    assert np.array_equal(full[:, :, :prefix], alone)
    # the contrast: the defective stabiliser changes the prefix when the key is appended
    sl = (slice(None), slice(None), slice(0, prefix))
    bad_alone = _whole_sequence_maximum(q[sl], k[sl], v[sl], W, 1e-6)
    bad_full = _whole_sequence_maximum(q, k, v, W, 1e-6)
    assert not np.array_equal(bad_full.reshape(B, H, N, e)[:, :, :prefix],
                              bad_alone.reshape(B, H, prefix, e))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_decoding_in_any_chunks_equals_the_causal_forward(dtype, masked):
    B, H, N, d, e, m = 2, 3, 37, 5, 3, 7
    q, k, v, W, mask = make_inputs(np.random.default_rng(9), B, H, N, d, e, m, dtype=dtype, masked=masked)
    ref = performer_attention(q, k, v, W, causal=True, key_mask=mask)
    for chunks in ([1] * N, [5, 1, 13, 2, 1, 15]):
        state, outs, s = None, [], 0
        for n in chunks:
            sl = slice(s, s + n)
            o, state = performer_attention_recurrent(q[:, :, sl], k[:, :, sl], v[:, :, sl], W, state,
                                                     key_mask=None if mask is None else mask[:, sl])
            assert o.dtype == dtype and isinstance(state, PerformerState)
            outs.append(o)
            s += n
        assert_close(f"o ({len(chunks)} chunks)", np.concatenate(outs, axis=2), ref, RTOL[dtype])


# --- the projections and the feature map -------------------------------------------------

def test_projections_are_orthogonal_within_blocks_with_chi_norms():
    H, m, d = 8, 64, 16
    W = draw_projections(H, m, d, np.random.default_rng(10))
    assert W.shape == (H, m, d) and W.dtype == np.float64
    for h in range(H):
        for b in range(m // d):
            rows = W[h, b * d:(b + 1) * d]                          # (d, d)
            G = rows @ rows.T
            off = G - np.diag(np.diag(G))
            assert np.abs(off).max() <= 1e-12 * np.diag(G).max(), f"block {b} of head {h}"
    # across blocks the rows are independent, not orthogonal
    assert np.abs(W[0, 0] @ W[0, d]) > 1e-6
    # |w|^2 ~ chi^2(d): mean d, variance 2d; over H m = 512 rows the mean is within 6 sd
    sq = (W * W).sum(axis=2)
    assert abs(sq.mean() - d) < 6 * np.sqrt(2 * d / sq.size)
    assert sq.std() > 0.5 * np.sqrt(2 * d), "the norms are not spread like chi(d)"


def test_partial_last_block():
    W = draw_projections(2, 7, 3, 0)                               # blocks of 3, 3, 1 rows
    rows = W[1, 3:6]
    G = rows @ rows.T
    assert np.abs(G - np.diag(np.diag(G))).max() <= 1e-12 * np.diag(G).max()
    assert W.shape == (2, 7, 3)


def test_same_seed_same_projections_redraw_changes_them():
    cfg = SimpleNamespace(n_heads=2, head_dim=3, value_dim=2, n_features=5, d_model=8, n_layers=1)
    a = core.init_buffers(cfg, np.random.default_rng(11))
    b = core.init_buffers(cfg, np.random.default_rng(11))
    assert np.array_equal(a["projections"], b["projections"])
    assert np.array_equal(draw_projections(2, 5, 3, 11), draw_projections(2, 5, 3, np.random.default_rng(11)))
    assert not np.array_equal(a["projections"], core.init_buffers(cfg, np.random.default_rng(12))["projections"])
    before = a["projections"].copy()
    new = core.redraw(a, cfg, np.random.default_rng(13))
    assert np.array_equal(a["projections"], before), "redraw modified the buffers it was given"
    assert new["projections"].shape == before.shape and not np.array_equal(new["projections"], before)
    assert core.MIXER.redraw is core.redraw


def test_stabilised_features_are_bounded_and_per_token():
    """Every stabilised feature is <= 1/sqrt(m), reached at x' = the longest row; a token's
    features do not depend on the other tokens of the call, bit for bit."""
    rng = np.random.default_rng(14)
    H, m, d = 2, 6, 4
    W = draw_projections(H, m, d, rng)
    c = feature_shift(W)
    x = 3 * rng.standard_normal((2, H, 50, d))
    h, r = np.unravel_index(np.argmax((W * W).sum(axis=2)), W.shape[:2])
    x[0, h, 0] = W[h, r] * d ** 0.25
    phi = positive_features(x, W, 0.5 * c)
    assert phi.max() <= 1 / np.sqrt(m) and np.isclose(phi[0, h, 0, r], 1 / np.sqrt(m), rtol=1e-14)
    assert np.array_equal(positive_features(x[:, :, 17:18], W, 0.5 * c), phi[:, :, 17:18])
    # and they are the paper's features times exp(-c / 2)
    assert_close("phi", phi[1, 1], positive_random_features(x[1, 1], W[1]) * np.exp(-0.5 * c), 1e-12)


def test_features_estimate_the_softmax_kernel():
    """phi(q) . phi(k) estimates exp(q . k / sqrt(d)) (unbiased; with many features the
    estimate is close): guards the definition itself, which the fast and naive forms share.
    At m = 16384 the largest relative error of the 36 pairs was 2-6% over ten seeds; a
    feature map without the d^(1/4) scaling (estimating exp(q . k)) is off by 50-130%."""
    rng = np.random.default_rng(15)
    d, m = 4, 16384
    W = draw_projections(1, m, d, rng)[0]
    q, k = 0.5 * rng.standard_normal((2, 6, d))
    est = positive_random_features(q, W) @ positive_random_features(k, W).T
    assert_close("kernel", est, np.exp(q @ k.T / np.sqrt(d)), 0.15, atol_scale=False)


# --- range, errors, adapter -------------------------------------------------------------

def test_lost_features_raise_instead_of_a_silent_zero():
    q, k, v, W, _ = make_inputs(np.random.default_rng(16), 1, 1, 4, 2, 1, 2)
    far = k.copy()
    far[0, 0, 2] = 400.0                             # |k'|^2 / 2 ~ 1e5: every feature is 0
    with pytest.raises(FloatingPointError, match=r"every random feature of the key at \(b, h, n\) = \(0, 0, 2\)"):
        performer_attention(q, far, v, W, causal=True)
    # a padding key may be anything
    mask = np.array([[True, True, False, True]])
    assert np.isfinite(performer_attention(q, far, v, W, causal=True, key_mask=mask)).all()
    # keys and queries each fine, their products not: q' on row 1, k' on the orthogonal row 2
    L = 30.0
    W2 = np.array([[[L, 0.0], [0.0, L]]])            # c = 900: the cross features are exp(-900) = 0
    q2 = np.array([W2[0, 0] * 2 ** 0.25] * 2)[None, None]
    k2 = np.array([W2[0, 1] * 2 ** 0.25] * 2)[None, None]
    with pytest.raises(FloatingPointError, match=r"stabilised denominator .* query at \(b, h, n\) = \(0, 0, 0\)"):
        performer_attention(q2, k2, np.ones((1, 1, 2, 1)), W2, causal=True, eps=0.0)
    with pytest.raises(ValueError, match=r"projections: max \|w\|\^2 = 900.0 is too large"):
        performer_attention(q2, k2, np.ones((1, 1, 2, 1)), W2, causal=True)


def test_bad_input_gets_a_clear_error():
    q, k, v, W, _ = make_inputs(np.random.default_rng(17), 1, 2, 5, 3, 2, 4)
    with pytest.raises(ValueError, match=r"projections: expected shape \(H, m, d\) with H = 2, d = 3"):
        performer_attention(q, k, v, W[:, :, :2])
    with pytest.raises(TypeError, match="projections: expected dtype float32 or float64"):
        performer_attention(q, k, v, W.astype(np.int64))
    with pytest.raises(TypeError, match="projections: expected a NumPy array"):
        performer_attention(q, k, v, "W")
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        performer_attention(q, k, v.astype(np.float32), W)
    with pytest.raises(ValueError, match=r"key_mask: expected shape \(B, N\) = \(1, 5\)"):
        performer_attention(q, k, v, W, key_mask=np.ones((5,), bool))
    with pytest.raises(TypeError, match="causal: expected a bool"):
        performer_attention(q, k, v, W, causal=1)
    o, cache = performer_attention_forward(q, k, v, W)
    with pytest.raises(TypeError, match="cache: expected the PerformerCache"):
        performer_attention_backward(o, {"q": q})
    with pytest.raises(ValueError, match=r"do: expected shape \(1, 2, 5, 2\)"):
        performer_attention_backward(o[:, :1], cache)
    with pytest.raises(TypeError, match="state: expected a PerformerState"):
        performer_attention_recurrent(q, k, v, W, LinearAttentionState(np.zeros((1, 2, 4, 2)),
                                                                      np.zeros((1, 2, 4))))
    _, state = performer_attention_recurrent(q, k, v, W)
    with pytest.raises(ValueError, match=r"state.S: expected shape \(1, 2, 5, 2\).*m from projections"):
        performer_attention_recurrent(q, k, v, draw_projections(2, 5, 3, 0), state)
    with pytest.raises(ValueError, match="m: expected an integer >= 1, got 0"):
        draw_projections(2, 0, 3, 0)
    with pytest.raises(TypeError, match="rng: expected a numpy.random.Generator or an int seed"):
        draw_projections(2, 4, 3, "seed")
    with pytest.raises(KeyError, match="projections"):
        core.redraw({}, SimpleNamespace(n_heads=2, head_dim=3), np.random.default_rng(0))


def test_core_adapter():
    B, H, N, d, e, m = 2, 3, 11, 4, 3, 5
    cfg = SimpleNamespace(n_heads=H, head_dim=d, value_dim=e, n_features=m, feature_redraw=0,
                          d_model=8, n_layers=1)
    rng = np.random.default_rng(18)
    q, k, v, _, mask = make_inputs(rng, B, H, N, d, e, m, masked=True)
    assert core.MIXER.parameter_shapes(cfg) == projection_shapes(cfg)   # no trained core parameters
    assert core.BUFFER_SHAPES(cfg) == {"projections": (H, m, d)}
    assert core.BUFFER_SHAPES(SimpleNamespace(n_heads=H, head_dim=d))["projections"] == (H, 64, d)
    p = core.init_buffers(cfg, rng)
    assert p["projections"].shape == (H, m, d)
    o, cache = core.forward(q, k, v, p, cfg, causal=True, key_mask=mask)
    assert np.array_equal(o, performer_attention(q, k, v, p["projections"], causal=True, key_mask=mask))
    assert np.array_equal(core.reference(q, k, v, p, cfg, causal=True, key_mask=mask), performer_attention_dense(q, k, v, p["projections"], causal=True, key_mask=mask))
    do = rng.standard_normal(o.shape)
    dq, dk, dv, dp = core.backward(do, cache)
    g = performer_attention_backward(do, cache)
    assert dp == {} and all(np.array_equal(a, g[n]) for a, n in ((dq, "q"), (dk, "k"), (dv, "v")))
    state = core.decode_init(B, p, cfg)
    assert isinstance(state, PerformerState) and state.S.shape == (B, H, m, e)
    o1, state = core.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], p, cfg, state)
    o2, state = core.decode(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], p, cfg, state)
    assert_close("decode", np.concatenate([o1, o2], axis=2),
                 performer_attention(q, k, v, p["projections"], causal=True), 1e-12)
    assert core.CAUSAL_ONLY is False and core.MIXER.name == "performer"
    assert core.MIXER.buffer_shapes(cfg) == {"projections": (H, m, d)}
