"""The selective scan and the Mamba block (gma_np.mixers.mamba) against their naive forms.

- the Numba scan against the loop over t (naive.py) at odd sizes, forward and every
  gradient, float64 to 1e-12 and float32 to 2e-6 (relative to max), one and several
  checkpoint chunks, with and without an initial state;
- stored states and recomputed ones give the same gradients bit for bit, at any thread count;
- every gradient of the scan and of the block by gma_np.gradcheck, full mode, float64;
- exp(delta A) underflowing to 0 leaves the gradients exact (why the backward recomputes);
- exact causality, decoding in chunks equals the forward, padding writes nothing;
- the initialisation, the decay rule, and bad input named.
The mixer contract test (tests/test_mixer_contract.py) proves the rest at the layer level.
"""

import math

import numba
import numpy as np
import pytest

import gma_np
from gma_np.mixers.mamba import (
    SCAN_CHUNK,
    selective_scan,
    selective_scan_backward,
    selective_scan_forward,
    selective_scan_recurrent,
)
from gma_np.mixers.mamba.core import DT_MAX, DT_MIN, MIXER, dims
from gma_np.mixers.mamba.naive import selective_scan_backward_naive, selective_scan_naive
from gma_np.nn.model import ModelConfig
from tests.conftest import RTOL, assert_close

SCAN_INPUTS = ("x", "delta", "A", "B", "C", "D")


def scan_problem(batch=2, N=37, M=5, S=3, seed=0, h0=True, delta_scale=1.0):
    """Random scan inputs, float64: delta > 0 and A < 0 as the block makes them."""
    rng = np.random.default_rng(seed)
    p = {"x": rng.standard_normal((batch, N, M)),
         "delta": delta_scale * np.log1p(np.exp(rng.standard_normal((batch, N, M)))),
         "A": -np.exp(rng.standard_normal((M, S))),
         "B": rng.standard_normal((batch, N, S)),
         "C": rng.standard_normal((batch, N, S)),
         "D": rng.standard_normal(M)}
    if h0:
        p["h0"] = rng.standard_normal((batch, M, S))
    return p


def _cast(p, dtype):
    return {n: v.astype(dtype) for n, v in p.items()}


def _cfg(**kw):
    """Odd sizes: D 5, E 2 (M 10), S 3, W 3, R 1. The mixer reads only these fields."""
    return ModelConfig(**{**dict(d_model=5, n_layers=1, ssm_expand=2, ssm_state=3, ssm_conv=3,
                                 dtype="float64"), **kw})


def _params(cfg, seed=0, scale=0.5):
    """Block parameters away from their initial point, float64."""
    rng = np.random.default_rng(seed)
    p = MIXER.init_parameters(cfg, rng)
    return {n: v + scale * rng.standard_normal(v.shape) for n, v in p.items()}


# ---------------------------------------------------------------- the scan

@pytest.mark.parametrize("h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("chunk", [8, SCAN_CHUNK], ids=["chunk8", "chunk-default"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_scan_matches_naive(dtype, chunk, h0):
    """y, the last state and every gradient against the loop over t (N=37, M=5, S=3): chunk 8
    runs five chunks, the last one partial; float32 inputs against float64 on the same values."""
    p = _cast(scan_problem(h0=h0), dtype)
    ref = {n: v.astype(np.float64) for n, v in p.items()}
    y, cache = selective_scan_forward(**p, chunk=chunk)
    assert y.dtype == dtype
    y_ref, h_ref = selective_scan_naive(**ref)
    assert_close("y", y, y_ref, RTOL[dtype])
    assert_close("h_last", cache.h_last, h_ref, RTOL[dtype])
    dy = np.random.default_rng(9).standard_normal(y.shape).astype(dtype)
    g = selective_scan_backward(dy, cache)
    g_ref = selective_scan_backward_naive(dy.astype(np.float64), **ref)
    assert set(g) == set(p), f"gradients of {sorted(g)}, expected {sorted(p)}"
    for name in p:
        assert g[name].dtype == p[name].dtype, f"d{name}: dtype {g[name].dtype}"
        assert_close(f"d{name}", g[name], g_ref[name], RTOL[dtype])


def test_scan_shortcuts_equal_the_forward():
    """selective_scan and selective_scan_recurrent give selective_scan_forward's y, bit for bit."""
    p = scan_problem()
    y, cache = selective_scan_forward(**p)
    assert np.array_equal(selective_scan(**p), y)
    h0 = p.pop("h0")
    y2, h = selective_scan_recurrent(**p, state=h0)
    assert np.array_equal(y2, y) and np.array_equal(h, cache.h_last)


def test_stored_states_give_the_same_gradients_bit_for_bit():
    """store_states=True reads the states the forward kept; the default re-runs each chunk from
    its checkpoint. Both are the same arithmetic, so the gradients agree exactly."""
    p = scan_problem(N=41)
    dy = np.random.default_rng(3).standard_normal(p["x"].shape)
    _, kept = selective_scan_forward(**p, store_states=True)
    assert kept.states.shape == (2, 41, 5, 3) and kept.checkpoints.size == 0
    g_kept = selective_scan_backward(dy, kept)
    for chunk in (1, 6, 41, 100):
        _, c = selective_scan_forward(**p, chunk=chunk)
        assert c.states.size == 0 and c.checkpoints.shape == (2, 5, -(-41 // chunk), 3)
        g = selective_scan_backward(dy, c)
        for name in g:
            assert np.array_equal(g[name], g_kept[name]), f"d{name} differs at chunk {chunk}"


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_scan_is_the_same_at_any_thread_count():
    """Above the small-work threshold the kernels run on Numba's threads; the channel groups of
    the backward are fixed, so the result does not depend on how many threads run them."""
    p = _cast(scan_problem(batch=2, N=512, M=67, S=16, h0=False), np.float32)
    dy = np.random.default_rng(4).standard_normal(p["x"].shape).astype(np.float32)
    out = {}
    before = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            y, c = selective_scan_forward(**p, chunk=100)
            out[n] = {"y": y, **selective_scan_backward(dy, c)}
    finally:
        numba.set_num_threads(before)
    for name in out[1]:
        assert np.array_equal(out[1][name], out[2][name]), f"{name} differs between 1 and 2 threads"


def test_scan_gradcheck_full():
    """Every gradient of the scan (x, delta, A, B, C, D, h0) by central differences, every
    element, float64, with checkpoint chunks of 3 tokens (three chunks over N = 7)."""
    p = scan_problem(batch=2, N=7, M=3, S=2, seed=5)

    def fun(**a):
        return selective_scan_forward(**a, chunk=3)[0]

    def grad(dy, **a):
        return selective_scan_backward(dy, selective_scan_forward(**a, chunk=3)[1])
    report = gma_np.gradcheck(fun, grad, p, mode="full")
    assert report.ok, str(report)
    assert {c.name for c in report.inputs} == set(p)


def test_naive_backward_gradcheck_full():
    """The naive reverse scan the fast path is compared with is itself right."""
    p = scan_problem(batch=1, N=6, M=2, S=3, seed=6)

    def fun(**a):
        return selective_scan_naive(**a)[0]

    def grad(dy, **a):
        return selective_scan_backward_naive(dy, **a)
    report = gma_np.gradcheck(fun, grad, p, mode="full")
    assert report.ok, str(report)


def test_gradients_exact_where_exp_delta_A_underflows():
    """With delta A < -745, exp(delta A) is 0 in float64: a backward that recovered h_{t-1} from
    h_t by dividing by it would get inf or NaN. The recomputing backward stays exact."""
    p = scan_problem(N=29, delta_scale=1.0)
    p["delta"][:, 10:13] = 400.0                     # with |A| >= 1.87 somewhere: a = 0 exactly
    assert (np.exp(p["delta"][..., None] * p["A"]) == 0.0).any(), "the test must underflow"
    y, cache = selective_scan_forward(**p, chunk=4)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    g = selective_scan_backward(dy, cache)
    g_ref = selective_scan_backward_naive(dy, **p)
    for name in g:
        assert np.isfinite(g[name]).all(), f"d{name} is not finite"
        assert_close(f"d{name}", g[name], g_ref[name], RTOL[np.float64])


def test_float32_inputs_keep_a_float64_state_over_long_sequences():
    """N = 4096 tokens of slow decay (long memory): float32 inputs stay within 2e-6 of the
    float64 scan of the same values, because the state and the sums are float64."""
    p = scan_problem(batch=1, N=4096, M=2, S=2, seed=8, h0=False, delta_scale=0.01)
    p32 = _cast(p, np.float32)
    y = selective_scan(**p32)
    y_ref, _ = selective_scan_naive(**{n: v.astype(np.float64) for n, v in p32.items()})
    assert_close("y", y, y_ref, RTOL[np.float32])


def test_scan_exact_causality():
    """Changing x, delta, B, C at and after t leaves y before t the same bit for bit."""
    p = scan_problem(N=23, h0=False)
    y = selective_scan_forward(**p, chunk=5)[0]
    rng = np.random.default_rng(1)
    for t in (0, 7, 22):
        q = {n: v.copy() for n, v in p.items()}
        for name in ("x", "delta", "B", "C"):
            q[name][:, t:] = np.abs(rng.standard_normal(q[name][:, t:].shape))
        y2 = selective_scan_forward(**q, chunk=5)[0]
        assert np.array_equal(y2[:, :t], y[:, :t]), f"outputs before {t} changed"
        assert not np.array_equal(y2[:, t:], y[:, t:]), f"the change at {t} did nothing"


@pytest.mark.parametrize("chunks", [(1,) * 11, (5, 1, 4, 1)], ids=["tokens", "uneven"])
def test_scan_recurrent_chunks_equal_the_forward(chunks):
    p = scan_problem(N=sum(chunks), h0=False)
    y, cache = selective_scan_forward(**p)
    state, outs, t = None, [], 0
    for n in chunks:
        part = {k: (v[:, t:t + n] if k in ("x", "delta", "B", "C") else v) for k, v in p.items()}
        out, state = selective_scan_recurrent(**part, state=state)
        outs.append(out)
        t += n
    assert_close("decode", np.concatenate(outs, axis=1), y, RTOL[np.float64])
    assert_close("state", state, cache.h_last, RTOL[np.float64])


def test_scan_bad_input_names_the_argument():
    p = scan_problem(h0=True)

    def call(**changes):
        return selective_scan_forward(**{**p, **changes})
    with pytest.raises(TypeError, match="^x: expected dtype float32 or float64"):
        call(x=p["x"].astype(np.int64))
    with pytest.raises(ValueError, match="^x: expected 3 dimensions"):
        call(x=p["x"][0])
    with pytest.raises(ValueError, match=r"^delta: expected shape \(2, 37, 5\)"):
        call(delta=p["delta"][:, :5])
    with pytest.raises(TypeError, match=r"^delta: expected the dtype of x \(float64\), got float32"):
        call(delta=p["delta"].astype(np.float32))
    with pytest.raises(ValueError, match=r"^A: expected shape \(M, S\) with M = 5"):
        call(A=p["A"][:4])
    with pytest.raises(ValueError, match=r"^B: expected shape \(2, 37, 3\)"):
        call(B=p["B"][:, :, :2])
    bad = p["C"].copy()
    bad[1, 3, 0] = np.inf
    with pytest.raises(ValueError, match="^C: expected finite values"):
        call(C=bad)
    with pytest.raises(ValueError, match=r"^D: expected shape \(5,\)"):
        call(D=np.ones(4))
    with pytest.raises(ValueError, match=r"^h0: expected shape \(2, 5, 3\)"):
        call(h0=p["h0"][:1])
    with pytest.raises(ValueError, match="^chunk: expected a positive integer"):
        selective_scan_forward(**p, chunk=0)
    _, cache = call()
    with pytest.raises(ValueError, match=r"^dy: expected shape \(2, 37, 5\)"):
        selective_scan_backward(np.ones((2, 36, 5)), cache)
    with pytest.raises(ValueError, match=r"^state: expected 3 dimensions"):
        selective_scan_recurrent(**{k: v for k, v in p.items() if k != "h0"}, state=np.zeros((2, 5)))


# ---------------------------------------------------------------- the block

def _block_x(cfg, B=2, N=37, seed=1):
    return np.random.default_rng(seed).standard_normal((B, N, cfg.d_model))


def _mask(B, N):
    m = np.ones((B, N), dtype=bool)
    m[0, [0, 3, N - 2]] = False
    m[1, :N // 2] = False                            # left padding
    return m


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_block_matches_naive(dtype, masked):
    """The block's fast forward against the naive block (N = 37), float32 against float64."""
    cfg = _cfg()
    p = _params(cfg)
    x = _block_x(cfg)
    mask = _mask(*x.shape[:2]) if masked else None
    y, _ = MIXER.forward(x.astype(dtype), _cast(p, dtype), cfg, causal=True, key_mask=mask)
    assert y.dtype == dtype
    assert_close("y", y, MIXER.reference(x, p, cfg, causal=True, key_mask=mask), RTOL[dtype])


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_block_gradcheck_full(masked):
    """Every gradient of the block (x and all eleven parameters), every element, float64, with
    interior and left padding; S = 3 and W = 3 keep the element count small."""
    cfg = _cfg()
    p = _params(cfg, seed=2)
    x = _block_x(cfg, N=6)
    mask = _mask(2, 6) if masked else None

    def fun(x, **q):
        return MIXER.forward(x, q, cfg, causal=True, key_mask=mask)[0]

    def grad(dy, x, **q):
        dx, g = MIXER.backward(dy, MIXER.forward(x, q, cfg, causal=True, key_mask=mask)[1])
        return {"x": dx, **g}
    report = gma_np.gradcheck(fun, grad, {"x": x, **p}, mode="full")
    assert report.ok, str(report)
    assert {c.name for c in report.inputs} == {"x", *p}


def test_padding_writes_nothing():
    """A padding token changes no real token's output (bit for bit), and padding in front of a
    sequence gives the outputs of the sequence without it."""
    cfg = _cfg()
    p = _params(cfg, seed=3)
    x = _block_x(cfg, N=21)
    mask = _mask(2, 21)
    y, _ = MIXER.forward(x, p, cfg, causal=True, key_mask=mask)
    x2 = x.copy()
    x2[~mask] = 5.0 * np.random.default_rng(0).standard_normal(x2[~mask].shape)
    y2, _ = MIXER.forward(x2, p, cfg, causal=True, key_mask=mask)
    assert np.array_equal(y2[mask], y[mask]), "a padding token changed a real token's output"
    assert not np.array_equal(y2[~mask], y[~mask]), "the test must change the padding tokens"
    start = 21 // 2                                   # sequence 1 is padded in front
    alone, _ = MIXER.forward(x[1:, start:], p, cfg, causal=True)
    assert_close("left-padded", y[1:, start:], alone, RTOL[np.float64])


def test_block_exact_causality():
    cfg = _cfg(ssm_conv=4)
    p = _params(cfg, seed=4)
    x = _block_x(cfg, N=19)
    y, _ = MIXER.forward(x, p, cfg, causal=True)
    rng = np.random.default_rng(5)
    for t in (0, 9, 18):
        x2 = x.copy()
        x2[:, t:] = 3.0 * rng.standard_normal(x2[:, t:].shape)
        y2, _ = MIXER.forward(x2, p, cfg, causal=True)
        assert np.array_equal(y2[:, :t], y[:, :t]), f"outputs before {t} changed"
        assert not np.array_equal(y2[:, t:], y[:, t:]), f"the change at {t} did nothing"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunks", [(1,) * 13, (6, 1, 2, 4)], ids=["tokens", "uneven"])
def test_block_decode_equals_forward(chunks, dtype):
    """Decoding in chunks (the scan's state and the convolution's history) equals the forward."""
    cfg = _cfg(ssm_conv=4)
    p = _cast(_params(cfg, seed=6), dtype)
    x = _block_x(cfg, N=sum(chunks)).astype(dtype)
    y, _ = MIXER.forward(x, p, cfg, causal=True)
    state, outs, t = MIXER.decode_init(2, p, cfg), [], 0
    for n in chunks:
        out, state = MIXER.decode(x[:, t:t + n], p, cfg, state)
        assert out.dtype == dtype
        outs.append(out)
        t += n
    assert state.h.shape == (2, 10, 3) and state.h.dtype == np.float64
    assert state.conv.shape == (2, 3, 10)
    assert_close("decode", np.concatenate(outs, axis=1), y, RTOL[dtype])


def test_block_bad_input_names_the_argument():
    cfg = _cfg()
    p = _params(cfg)
    x = _block_x(cfg, N=7)
    with pytest.raises(ValueError, match="^x: expected shape"):
        MIXER.forward(x[:, :, :4], p, cfg, causal=True)
    with pytest.raises(TypeError, match="^x: expected dtype float32 or float64"):
        MIXER.forward(x.astype(np.int32), p, cfg, causal=True)
    with pytest.raises(ValueError, match="^key_mask: expected shape"):
        MIXER.forward(x, p, cfg, causal=True, key_mask=np.ones((2, 6), dtype=bool))
    with pytest.raises(ValueError, match="^causal: the mamba mixer is causal only"):
        MIXER.forward(x, p, cfg, causal=False)
    with pytest.raises(ValueError, match="^causal: the mamba mixer is causal only"):
        MIXER.reference(x, p, cfg, causal=False)


def test_initialisation():
    """A_log = log(1..S) in every channel, the step sizes log-uniform in [1e-3, 0.1] through the
    inverse softplus, D_skip = 1, the residual scaling of W_out, dt rank ceil(D / 16)."""
    cfg = ModelConfig(d_model=128, n_layers=3, ssm_expand=2, ssm_state=16, ssm_conv=4)
    D, M, S, R, W = dims(cfg)
    assert (M, S, R, W) == (256, 16, 8, 4)
    assert dims(ModelConfig(d_model=17))[3] == 2
    p = MIXER.init_parameters(cfg, np.random.default_rng(0))
    assert {n: v.shape for n, v in p.items()} == MIXER.parameter_shapes(cfg)
    assert list(p) == list(MIXER.parameter_shapes(cfg))
    assert np.array_equal(p["A_log"], np.tile(np.log(np.arange(1.0, 17.0)), (M, 1)))
    assert np.array_equal(p["D_skip"], np.ones(M))
    dt = np.log1p(np.exp(p["b_dt"]))                  # softplus(b_dt): the initial step sizes
    assert (dt >= DT_MIN * (1 - 1e-12)).all() and (dt <= DT_MAX * (1 + 1e-12)).all()
    # log-uniform: the logs of 256 draws fill [log 1e-3, log 0.1] about evenly
    quartiles = np.quantile(np.log(dt), [0.25, 0.5, 0.75])
    span = math.log(DT_MAX) - math.log(DT_MIN)
    expected = math.log(DT_MIN) + span * np.array([0.25, 0.5, 0.75])
    assert np.abs(quartiles - expected).max() < 0.1 * span, (quartiles, expected)
    assert abs(p["W_out"].std() / (0.02 / math.sqrt(2 * 3)) - 1) < 0.05
    assert abs(p["W_in"].std() / 0.02 - 1) < 0.05
    assert np.abs(p["conv_w"]).max() <= 1 / math.sqrt(W) and np.abs(p["W_dt_up"]).max() <= 1 / math.sqrt(R)


def test_decay_rule():
    """A_log and D_skip are not decayed; every matrix that multiplies activations is."""
    cfg = _cfg()
    shapes = MIXER.parameter_shapes(cfg)
    decayed = {n for n, s in shapes.items() if MIXER.decays(n, s)}
    assert decayed == {"W_in", "conv_w", "W_dt_down", "W_dt_up", "W_B", "W_C", "W_out"}
    assert MIXER.causal_only and MIXER.init_from_data is None and MIXER.buffer_shapes(cfg) == {}
