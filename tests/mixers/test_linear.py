"""Linear attention (gma_np.mixers.linear): the fast path against its naive reference.

Fast vs the dense N x N form at odd sizes, float64 (rtol 1e-12) and float32 (2e-6,
against the float64 reference on the same inputs), causal and bidirectional, with and
without a key mask (one sequence all padding); every gradient by finite differences;
exact causality; decoding in any chunking equals the causal forward; clear errors.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import gma_np
from gma_np.mixers.attention import projection_shapes
from gma_np.mixers.linear import (
    LinearAttentionState,
    linear_attention,
    linear_attention_backward,
    linear_attention_forward,
    linear_attention_recurrent,
)
from gma_np.mixers.linear import core
from gma_np.mixers.linear.naive import linear_attention_dense, linear_attention_loop
from tests.conftest import RTOL, assert_close

SIZES = [(2, 3, 37, 5, 3), (1, 2, 300, 4, 3), (3, 1, 1, 2, 1)]
SIZE_IDS = [f"B{B}-H{H}-N{N}-d{d}-e{e}" for B, H, N, d, e in SIZES]
DTYPES = [np.float64, np.float32]


def make_inputs(rng, B, H, N, d, e, dtype=np.float64, masked=False, away_from_zero=False):
    """q, k, v and a key mask (about 30% padding, and for B >= 2 the last sequence all
    padding). away_from_zero moves entries of q, k off |x| < 0.05: phi'' jumps at 0, where
    a finite difference of phi' would be wrong by ~h, not the stencil's h^4."""
    q, k = rng.standard_normal((2, B, H, N, d))
    v = rng.standard_normal((B, H, N, e))
    if away_from_zero:
        for x in (q, k):
            x[np.abs(x) < 0.05] += 0.1
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
def test_fast_matches_dense(size, causal, masked, dtype):
    q, k, v, mask = make_inputs(np.random.default_rng(1), *size, dtype=dtype, masked=masked)
    o = linear_attention(q, k, v, causal=causal, key_mask=mask)
    assert o.dtype == dtype and o.shape == v.shape
    assert_close("o", o, linear_attention_dense(q, k, v, causal=causal, key_mask=mask), RTOL[dtype])
    if masked and size[0] >= 2:
        assert not o[-1].any(), "an all-padding sequence reads an empty memory: o = 0 / eps = 0"


def test_the_chunked_causal_form_gives_the_same(monkeypatch):
    """Where d e is large the memory takes GMA's chunked form (causal_form): forced here at
    N = 300 (several groups of chunks), the outputs match the dense form and the gradients
    the token scan's."""
    q, k, v, mask = make_inputs(np.random.default_rng(19), 2, 2, 300, 4, 3, masked=True)
    do = np.random.default_rng(20).standard_normal(v.shape)
    o_scan, c_scan = linear_attention_forward(q, k, v, causal=True, key_mask=mask)
    monkeypatch.setattr("gma_np.memory.ops.causal_form", lambda F, e: "chunked")
    o, cache = linear_attention_forward(q, k, v, causal=True, key_mask=mask)
    assert not np.array_equal(o, o_scan), "the chunked form was not used (same rounding as the scan)"
    assert_close("o", o, linear_attention_dense(q, k, v, causal=True, key_mask=mask), 1e-12)
    g, g_scan = linear_attention_backward(do, cache), linear_attention_backward(do, c_scan)
    for name in ("q", "k", "v"):
        assert_close(f"d{name}", g[name], g_scan[name], 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_loop_matches_dense(masked):
    """The two naive forms agree: the loop over t with its state is the causal dense form."""
    q, k, v, mask = make_inputs(np.random.default_rng(2), 2, 2, 23, 3, 4, masked=masked)
    o, _ = linear_attention_loop(q, k, v, key_mask=mask)
    assert_close("o", o, linear_attention_dense(q, k, v, causal=True, key_mask=mask), 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_by_finite_differences(causal, masked):
    q, k, v, mask = make_inputs(np.random.default_rng(3), 2, 2, 6, 3, 2, masked=masked,
                                away_from_zero=True)
    if masked:
        mask[:, 0] = True                            # each sequence reads something

    def fun(q, k, v):
        return linear_attention(q, k, v, causal=causal, key_mask=mask)

    def grad(do, q, k, v):
        return linear_attention_backward(do, linear_attention_forward(q, k, v, causal=causal,
                                                                      key_mask=mask)[1])

    report = gma_np.gradcheck(fun, grad, dict(q=q, k=k, v=v), mode="full")
    assert report.ok, report
    assert {c.name for c in report.inputs} == {"q", "k", "v"}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_gradients_match_float64(causal):
    """float32 in, float32 gradients out, within 2e-6 of the float64 gradients of the same
    (float32-rounded) inputs: the features, memory and read-out are float64 inside."""
    q, k, v, mask = make_inputs(np.random.default_rng(4), 2, 3, 37, 5, 3, dtype=np.float32, masked=True)
    do = np.random.default_rng(5).standard_normal(v.shape).astype(np.float32)
    g32 = linear_attention_backward(do, linear_attention_forward(q, k, v, causal=causal, key_mask=mask)[1])
    c64 = linear_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), causal=causal, key_mask=mask)[1]
    g64 = linear_attention_backward(do.astype(np.float64), c64)
    padding = ~mask[:, None, :].repeat(3, axis=1)                # (B, H, N)
    for name in ("q", "k", "v"):
        assert g32[name].dtype == np.float32
        assert_close(f"d{name}", g32[name], g64[name], RTOL[np.float32])
    assert not g64["k"][padding].any(), "a padding key got a gradient"


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", [1, 18, 36])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_future_tokens_change_nothing_before_t(dtype, t, masked):
    rng = np.random.default_rng(6)
    B, H, N, d, e = 2, 2, 37, 4, 3
    q, k, v, mask = make_inputs(rng, B, H, N, d, e, dtype=dtype, masked=masked)
    changed = [a.copy() for a in (q, k, v)]
    for a in changed:
        a[:, :, t:] = (3 * rng.standard_normal(a[:, :, t:].shape)).astype(dtype)
    mask_b = None
    if masked:
        mask_b = mask.copy()
        mask_b[:, t:] = ~mask_b[:, t:]
    o_a, cache_a = linear_attention_forward(q, k, v, causal=True, key_mask=mask)
    o_b, cache_b = linear_attention_forward(*changed, causal=True, key_mask=mask_b)
    assert np.array_equal(o_a[:, :, :t], o_b[:, :, :t]), "an output before t changed"
    assert not np.array_equal(o_a[:, :, t:], o_b[:, :, t:]), "the change did not reach the future"
    do = np.zeros(o_a.shape, dtype=dtype)
    do[:, :, :t] = rng.standard_normal((B, H, t, e))
    g_a, g_b = linear_attention_backward(do, cache_a), linear_attention_backward(do, cache_b)
    for name in ("q", "k", "v"):
        assert np.array_equal(g_a[name][:, :, :t], g_b[name][:, :, :t]), f"d{name} before t changed"
        assert not g_a[name][:, :, t:].any(), f"d{name} at or after t is not exactly zero"


def test_prefix_unchanged_when_tokens_are_appended():
    q, k, v, _ = make_inputs(np.random.default_rng(7), 2, 2, 300, 4, 3)
    for n in (1, 37, 256):
        alone = linear_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=True)
        assert np.array_equal(linear_attention(q, k, v, causal=True)[:, :, :n], alone), n


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_decoding_in_any_chunks_equals_the_causal_forward(dtype, masked):
    B, H, N, d, e = 2, 3, 37, 5, 3
    q, k, v, mask = make_inputs(np.random.default_rng(8), B, H, N, d, e, dtype=dtype, masked=masked)
    ref = linear_attention(q, k, v, causal=True, key_mask=mask)
    for chunks in ([1] * N, [5, 1, 13, 2, 1, 15]):
        state, outs, s = None, [], 0
        for n in chunks:
            sl = slice(s, s + n)
            o, state = linear_attention_recurrent(q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
                                                  key_mask=None if mask is None else mask[:, sl])
            assert o.dtype == dtype
            outs.append(o)
            s += n
        assert_close(f"o ({len(chunks)} chunks)", np.concatenate(outs, axis=2), ref, RTOL[dtype])
    # the naive loop's state is the same memory
    _, (S, z) = linear_attention_loop(q, k, v, key_mask=mask)
    assert_close("S", state.S, S, 1e-12)
    assert_close("z", state.z, z, 1e-12)


def cfg_of(H, d, e):
    return SimpleNamespace(n_heads=H, head_dim=d, value_dim=e, d_model=8, n_layers=1)


def test_core_adapter():
    """The core the shared shell calls: no parameters or buffers, forward/backward/decode
    are the functional API's, and it is wrapped as the Mixer "linear"."""
    B, H, N, d, e = 2, 3, 11, 4, 3
    cfg = cfg_of(H, d, e)
    rng = np.random.default_rng(9)
    q, k, v, mask = make_inputs(rng, B, H, N, d, e, masked=True)
    # no parameters of the core's own, no buffers: the mixer's are the shell's projections
    assert core.MIXER.parameter_shapes(cfg) == projection_shapes(cfg)
    assert core.MIXER.buffer_shapes(cfg) == {} and core.MIXER.init_buffers(cfg, rng) == {}
    assert core.CAUSAL_ONLY is False
    o, cache = core.forward(q, k, v, {}, cfg, causal=True, key_mask=mask)
    assert np.array_equal(o, linear_attention(q, k, v, causal=True, key_mask=mask))
    assert np.array_equal(core.reference(q, k, v, {}, cfg, causal=True, key_mask=mask), linear_attention_dense(q, k, v, causal=True, key_mask=mask))
    do = rng.standard_normal(o.shape)
    dq, dk, dv, dp = core.backward(do, cache)
    g = linear_attention_backward(do, cache)
    assert dp == {} and all(np.array_equal(a, g[n]) for a, n in ((dq, "q"), (dk, "k"), (dv, "v")))
    state = core.decode_init(B, {}, cfg)
    assert isinstance(state, LinearAttentionState) and state.S.shape == (B, H, d, e)
    o1, state = core.decode(q[:, :, :4], k[:, :, :4], v[:, :, :4], {}, cfg, state)
    o2, state = core.decode(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], {}, cfg, state)
    assert_close("decode", np.concatenate([o1, o2], axis=2), linear_attention(q, k, v, causal=True), 1e-12)
    assert core.MIXER.name == "linear" and core.MIXER.redraw is None


def test_bad_input_gets_a_clear_error():
    q, k, v, _ = make_inputs(np.random.default_rng(10), 1, 2, 5, 3, 2)
    with pytest.raises(TypeError, match="q: expected dtype float32 or float64, got int64"):
        linear_attention(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        linear_attention(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 2, 5, 3\)"):
        linear_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"key_mask: expected shape \(B, N\) = \(1, 5\)"):
        linear_attention(q, k, v, key_mask=np.ones((1, 4), bool))
    with pytest.raises(TypeError, match="causal: expected a bool"):
        linear_attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="eps: expected a finite float >= 0"):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="q: expected finite values"):
        linear_attention(np.where(q > 0, np.nan, q), k, v)
    o, cache = linear_attention_forward(q, k, v)
    with pytest.raises(TypeError, match="cache: expected the LinearAttentionCache"):
        linear_attention_backward(o, object())
    with pytest.raises(ValueError, match=r"do: expected shape \(1, 2, 5, 2\)"):
        linear_attention_backward(o[..., :1], cache)
    with pytest.raises(TypeError, match="state: expected a LinearAttentionState"):
        linear_attention_recurrent(q, k, v, state=(np.zeros((1, 2, 3, 2)), np.zeros((1, 2, 3))))
    _, state = linear_attention_recurrent(q, k, v)
    with pytest.raises(ValueError, match=r"state.S: expected shape \(1, 2, 3, 3\)"):
        linear_attention_recurrent(q, k, np.concatenate([v, v[..., :1]], -1), state)
    mask = np.zeros((1, 5), bool)
    with pytest.raises(FloatingPointError, match="linear attention: the output is not finite"):
        linear_attention(q, k, v, key_mask=mask, eps=0.0)
