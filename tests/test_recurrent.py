"""The recurrent API: token-by-token steps and chunked continuation equal the causal output."""

import numpy as np
import pytest

import gma_np
from gma_np._numerics import DEFAULT_EPS
from gma_np.memory.reference import causal_mix_loop
from gma_np.mixers.gma.reference.routing import responsibilities_naive
from tests.conftest import RTOL, assert_close, make_problem


def _slice(inputs, lo, hi):
    return {n: (a[:, :, lo:hi] if n in ("q", "k", "v") else a) for n, a in inputs.items()}


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_steps_equal_causal_output(norm, dtype):
    rng = np.random.default_rng(11)
    B, H, N = 2, 3, 23
    inputs, mask = make_problem(rng, B=B, H=H, N=N, d=4, e=3, K=5, per_head=True, masked=True)
    for n in ("q", "k", "v"):
        inputs[n] = inputs[n].astype(dtype)
    full = gma_np.gma(**inputs, causal=True, norm=norm, key_mask=mask)
    state = None
    params = {n: inputs[n] for n in ("means", "log_var", "logits")}
    for t in range(N):
        o_t, state = gma_np.gma_step(inputs["q"][:, :, t], inputs["k"][:, :, t], inputs["v"][:, :, t],
                                     **params, state=state, norm=norm,
                                     temperature=inputs["temperature"], key_mask_t=mask[:, t])
        assert o_t.shape == (B, H, 3) and o_t.dtype == dtype
        assert_close(f"o[{t}]", o_t, full[:, :, t], RTOL[dtype])


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("split", [1, 17, 36])
def test_continuing_from_a_prefix_equals_the_whole(norm, split):
    rng = np.random.default_rng(12)
    inputs, mask = make_problem(rng, B=2, H=2, N=37, d=3, e=4, K=5, masked=True)
    full = gma_np.gma(**inputs, causal=True, norm=norm, key_mask=mask)
    o1, state = gma_np.gma_recurrent(**_slice(inputs, 0, split), norm=norm, key_mask=mask[:, :split])
    saved = state.copy()
    o2, final = gma_np.gma_recurrent(**_slice(inputs, split, 37), state=state, norm=norm,
                                     key_mask=mask[:, split:])
    assert np.array_equal(state.S, saved.S) and np.array_equal(state.z, saved.z), "state was modified"
    assert_close("prefix", o1, full[:, :, :split], 1e-12)
    assert_close("continuation", o2, full[:, :, split:], 1e-12)
    # the final state is the memory of the whole sequence: S = sum_j R~_K[j]^T V[j]
    rk = responsibilities_naive(inputs["k"], inputs["means"], inputs["log_var"], inputs["logits"],
                                inputs["temperature"]) * mask[:, None, :, None]
    assert_close("S", final.S, np.einsum("bhnk,bhne->bhke", rk, inputs["v"]), 1e-12)
    assert_close("z", final.z, rk.sum(2), 1e-12)


def test_loop_reference_with_initial_state():
    """The loop-over-t reference continues from a state the same way."""
    rng = np.random.default_rng(13)
    N, K, e = 19, 4, 3
    rq, rk = rng.dirichlet(np.ones(K), size=N), rng.dirichlet(np.ones(K), size=N)
    v = rng.standard_normal((N, e))
    for slot in (False, True):
        o, S, z = causal_mix_loop(rq, rk, v, slot, DEFAULT_EPS)
        o1, S1, z1 = causal_mix_loop(rq[:8], rk[:8], v[:8], slot, DEFAULT_EPS)
        o2, S2, z2 = causal_mix_loop(rq[8:], rk[8:], v[8:], slot, DEFAULT_EPS, S1, z1)
        assert_close("o", np.concatenate([o1, o2]), o, 1e-13)
        assert_close("S", S2, S, 1e-13)


def test_state_is_checked():
    rng = np.random.default_rng(14)
    inputs, _ = make_problem(rng, B=1, H=2, N=4, d=3, e=2, K=3)
    with pytest.raises(ValueError, match=r"state\.S.*\(B, H, K, e\)"):
        gma_np.gma_recurrent(**inputs, state=gma_np.init_state(1, 2, 3, 5))
    with pytest.raises(TypeError, match="state"):
        gma_np.gma_recurrent(**inputs, state=(np.zeros((1, 2, 3, 2)), np.zeros((1, 2, 3))))
    bad = gma_np.init_state(1, 2, 3, 2)
    bad.z[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"state\.z.*finite"):
        gma_np.gma_recurrent(**inputs, state=bad)


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_zero_eps_on_empty_memory_is_an_error_in_every_form(norm):
    """eps = 0 and nothing written: gma, gma_recurrent and gma_step all raise the same error."""
    rng = np.random.default_rng(15)
    inputs, _ = make_problem(rng, B=1, H=1, N=5, d=2, e=2, K=2)
    empty = np.zeros((1, 5), dtype=bool)
    with pytest.raises(FloatingPointError, match="eps"):
        gma_np.gma(**inputs, causal=True, norm=norm, eps=0.0, key_mask=empty)
    with pytest.raises(FloatingPointError, match="eps"):
        gma_np.gma_recurrent(**inputs, norm=norm, eps=0.0, key_mask=empty)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    with pytest.raises(FloatingPointError, match="eps"):
        gma_np.gma_step(inputs["q"][:, :, 0], inputs["k"][:, :, 0], inputs["v"][:, :, 0], **params,
                        norm=norm, eps=0.0, key_mask_t=np.zeros(1, dtype=bool))
    with pytest.raises(TypeError, match="key_mask_t"):
        gma_np.gma_step(inputs["q"][:, :, 0], inputs["k"][:, :, 0], inputs["v"][:, :, 0], **params,
                        key_mask_t=[True])


# ---------------------------------------------------------------- the fused one-token kernel

from gma_np.mixers.gma import recurrent as recurrent_module          # noqa: E402
from gma_np.mixers.gma.reference.dense import gma_dense              # noqa: E402


@pytest.fixture
def fused_only(monkeypatch):
    """Every one-token call must go through the fused kernel: the chunk path raises."""
    def no_chunk(*args):
        raise AssertionError("the one-token call fell back to the chunk path")
    monkeypatch.setattr(recurrent_module, "_chunk", no_chunk)


def _token(inputs, t):
    return tuple(np.ascontiguousarray(inputs[n][:, :, t]) for n in ("q", "k", "v"))


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_fused_step_equals_the_chunk_path_and_the_dense_form(dtype, norm, covariance):
    """Odd sizes (d = 7 is not a multiple of anything the kernel unrolls), masked keys, a
    per-head temperature: token by token through the fused kernel equals the whole
    sequence through the chunk path (gma_recurrent at N = 23) and the dense causal form."""
    rng = np.random.default_rng(21)
    B, H, N, d, e, K = 2, 3, 23, 7, 3, 5
    inputs, mask = make_problem(rng, B=B, H=H, N=N, d=d, e=e, K=K, covariance=covariance,
                                per_head=True, masked=True)
    for n in ("q", "k", "v"):
        inputs[n] = inputs[n].astype(dtype)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    chunk, chunk_state = gma_np.gma_recurrent(**inputs, norm=norm, key_mask=mask)
    dense = gma_dense(**inputs, causal=True, norm=norm, key_mask=mask)
    state = None
    steps = []
    for t in range(N):
        o_t, new_state = recurrent_module._fused_step(*_token(inputs, t), params["means"],
                                                      params["log_var"], params["logits"], state,
                                                      norm, params["temperature"], DEFAULT_EPS,
                                                      mask[:, t])
        if state is not None:
            assert new_state.S is not state.S and new_state.z is not state.z
        state = new_state
        assert o_t.dtype == dtype and o_t.shape == (B, H, e)
        steps.append(o_t)
    steps = np.stack(steps, axis=2)
    assert_close("fused steps against the chunk path", steps, chunk, RTOL[dtype])
    assert_close("fused steps against the dense form", steps, dense, RTOL[dtype])
    # the chunk path rounds float32 responsibilities to float32, the fused kernel does not
    assert_close("S", state.S, chunk_state.S, RTOL[dtype])
    assert_close("z", state.z, chunk_state.z, RTOL[dtype])


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_public_one_token_calls_take_the_fused_kernel(fused_only, norm):
    """gma_step, and gma_recurrent at N = 1, with a scalar temperature, no mask and a
    (B, 1) mask: no fallback, and the outputs of the dense causal form; the state passed
    is not modified."""
    rng = np.random.default_rng(22)
    B, H, N = 1, 2, 9
    inputs, mask = make_problem(rng, B=B, H=H, N=N, d=5, e=4, K=3, masked=True)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    dense = gma_dense(**inputs, causal=True, norm=norm, key_mask=mask)
    dense_unmasked = gma_dense(**inputs, causal=True, norm=norm)
    s_step, s_rec, s_free = None, None, None
    for t in range(N):
        q, k, v = _token(inputs, t)
        o1, s_step = gma_np.gma_step(q, k, v, **params, state=s_step, norm=norm,
                                     key_mask_t=mask[:, t])
        before = None if s_rec is None else s_rec.copy()
        o2, s_next = gma_np.gma_recurrent(q[:, :, None], k[:, :, None], v[:, :, None], **params,
                                          state=s_rec, norm=norm, key_mask=mask[:, t:t + 1])
        if before is not None:
            assert np.array_equal(s_rec.S, before.S) and np.array_equal(s_rec.z, before.z)
        s_rec = s_next
        o3, s_free = gma_np.gma_step(q, k, v, **params, state=s_free, norm=norm)
        assert_close(f"gma_step o[{t}]", o1, dense[:, :, t], 1e-12)
        assert_close(f"gma_recurrent o[{t}]", o2[:, :, 0], dense[:, :, t], 1e-12)
        assert_close(f"unmasked o[{t}]", o3, dense_unmasked[:, :, t], 1e-12)


def test_a_token_sliced_from_a_sequence_takes_the_fused_kernel(fused_only):
    """gma_step(q[:, :, t], ...) with the strided slices of a (B, H, N, d) sequence: the
    fused kernel (no fallback) and the same bits as with contiguous copies."""
    rng = np.random.default_rng(23)
    inputs, _ = make_problem(rng, B=2, H=3, N=5, d=7, e=4, K=5, per_head=True)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    s_slice = s_copy = None
    for t in range(5):
        sliced = tuple(inputs[n][:, :, t] for n in ("q", "k", "v"))
        assert not sliced[0].flags.c_contiguous
        o1, s_slice = gma_np.gma_step(*sliced, **params, state=s_slice)
        o2, s_copy = gma_np.gma_step(*_token(inputs, t), **params, state=s_copy)
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(s_slice.S, s_copy.S)


def _decode(inputs, N):
    """gma_step token by token over the first N tokens: o (B, H, N, e)."""
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    state, out = None, []
    for t in range(N):
        o_t, state = gma_np.gma_step(*_token(inputs, t), **params, state=state)
        out.append(o_t)
    return np.stack(out, axis=2)


@pytest.mark.parametrize("changed", ["means", "log_var", "logits"])
def test_two_mixtures_in_turn_and_a_change_in_place(rng, changed):
    """Two layers' mixtures in turn (as a model decodes) each get their own prepared
    arrays; a change in place of means, log_var or logits is seen at the next call."""
    N = 6
    layers = [make_problem(rng, B=1, H=2, N=N, d=3, e=2, K=4)[0] for _ in range(2)]
    states = [None, None]
    for t in range(N):
        for i, inputs in enumerate(layers):
            params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
            o_t, states[i] = gma_np.gma_step(*_token(inputs, t), **params, state=states[i])
            assert_close(f"layer {i} o[{t}]", o_t, gma_dense(**inputs, causal=True)[:, :, t], 1e-12)
    inputs = layers[0]
    before = _decode(inputs, N)
    inputs[changed][..., 0] += 0.5             # in place: the same object, new values
    after = _decode(inputs, N)
    assert not np.allclose(after, before)
    assert_close(f"after the change of {changed}", after, gma_dense(**inputs, causal=True), 1e-12)


@pytest.mark.parametrize("what", ["q_t", "k_t", "v_t", "state"])
def test_non_finite_values_get_the_checked_paths_error(what):
    """The fused kernel reports a NaN instead of raising; the checked path names it."""
    rng = np.random.default_rng(23)
    inputs, _ = make_problem(rng, B=1, H=2, N=2, d=3, e=2, K=3)
    params = {n: inputs[n] for n in ("means", "log_var", "logits", "temperature")}
    q, k, v = _token(inputs, 0)
    _, state = gma_np.gma_step(q, k, v, **params)
    args = {"q_t": q, "k_t": k, "v_t": v, "state": state}
    bad = args[what].S.copy() if what == "state" else args[what].copy()
    bad.flat[1] = np.nan
    args[what] = gma_np.GMAState(bad, state.z) if what == "state" else bad
    name = "state.S" if what == "state" else what
    with pytest.raises(ValueError, match=rf"{name}: expected finite values"):
        gma_np.gma_step(args["q_t"], args["k_t"], args["v_t"], **params, state=args["state"])


def test_a_bad_temperature_gets_the_checked_paths_error(rng):
    inputs, _ = make_problem(rng, B=1, H=2, N=1, d=3, e=2, K=3)
    params = {n: inputs[n] for n in ("means", "log_var", "logits")}
    for tau in (0.0, -1.0, np.array([1.0, np.nan]), np.array([1.0, -2.0])):
        with pytest.raises(ValueError, match="temperature: expected finite values > 0"):
            gma_np.gma_step(*_token(inputs, 0), **params, temperature=tau)
