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
