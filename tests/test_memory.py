"""The shared feature memory (gma_np.memory) against its dense N x N form.

Every form (bidirectional GEMMs, causal scan, causal chunked, recurrent, one-token step)
is checked against A = (rq rk^T) o L, O = (A V) / (A 1 + eps) (row) or the slot read-out,
at odd sizes, including N = 300, where the bidirectional path runs several token blocks
and the chunked path several groups of chunks. Tolerances: float64 1e-12, float32 2e-6,
relative to the largest entry of the float64 reference.
"""

import numpy as np
import pytest

import gma_np
from gma_np.memory.ops import (
    MemoryState,
    check_output_finite,
    check_state,
    empty_state,
    memory_backward,
    memory_forward,
    memory_recurrent,
    memory_step,
)
from tests.conftest import RTOL, assert_close

EPS = 1e-6


# --- the dense form: the definition as N x N matrices ------------------------------------

def dense_forward(rq, rk, v, causal, slot, eps):
    """O (P, N, e) in float64, sequence by sequence through the N x N affinity."""
    rq, rk, v = (np.asarray(a, dtype=np.float64) for a in (rq, rk, v))
    N = rq.shape[1]
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    out = np.empty(v.shape)
    for p in range(rq.shape[0]):
        if slot:
            U = rq[p] / (L @ rk[p] + eps)                  # rq_i[f] / (z_i[f] + eps)
            out[p] = ((U @ rk[p].T) * L) @ v[p]
        else:
            A = (rq[p] @ rk[p].T) * L                      # (N, N)
            out[p] = (A @ v[p]) / (A.sum(1, keepdims=True) + eps)
    return out


def dense_backward_row(rq, rk, v, do, causal, eps):
    """(drq, drk, dv) of sum(O * do) for the row read-out, by the dense form:
    den = A 1 + eps, dA = (dO V^T - (dO . O) 1^T) / den o L, dV = A^T (dO / den)."""
    N = rq.shape[1]
    L = np.tril(np.ones((N, N))) if causal else np.ones((N, N))
    drq, drk, dv = np.empty(rq.shape), np.empty(rk.shape), np.empty(v.shape)
    for p in range(rq.shape[0]):
        A = (rq[p] @ rk[p].T) * L
        den = A.sum(1, keepdims=True) + eps
        O = (A @ v[p]) / den
        dA = ((do[p] @ v[p].T - (do[p] * O).sum(1, keepdims=True)) / den) * L
        drq[p], drk[p], dv[p] = dA @ rk[p], dA.T @ rq[p], A.T @ (do[p] / den)
    return drq, drk, dv


def problem(rng, P, N, F, e, dtype=np.float64, padded=True):
    """Positive features (as every feature map gives), keys of some tokens zeroed (padding),
    and for P >= 3 one sequence with all keys zero (an empty memory)."""
    rq = rng.uniform(0.2, 1.2, (P, N, F))
    rk = rng.uniform(0.2, 1.2, (P, N, F))
    v = rng.standard_normal((P, N, e))
    if padded:
        rk[:, rng.random(N) < 0.3] = 0.0
        if P >= 3:
            rk[2] = 0.0
    return tuple(a.astype(dtype) for a in (rq, rk, v))


SIZES = [(3, 37, 5, 3), (2, 300, 4, 3), (1, 1, 2, 1)]
SIZE_IDS = [f"P{P}-N{N}-F{F}-e{e}" for P, N, F, e in SIZES]
# (causal, form): the bidirectional path and both causal forms, each forced
FORMS = [(False, None), (True, "scan"), (True, "chunked")]
FORM_IDS = ["bidirectional", "scan", "chunked"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("slot", [False, True], ids=["row", "slot"])
@pytest.mark.parametrize("causal,form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_forward_matches_dense(size, causal, form, slot, dtype):
    rq, rk, v = problem(np.random.default_rng(3), *size, dtype=dtype)
    o = memory_forward(rq, rk, v, causal=causal, slot=slot, eps=EPS, form=form)
    assert o.dtype == dtype and o.shape == v.shape
    assert_close("o", o, dense_forward(rq, rk, v, causal, slot, EPS), RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal,form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("size", SIZES[:2], ids=SIZE_IDS[:2])
def test_backward_matches_dense(size, causal, form, dtype):
    rng = np.random.default_rng(4)
    rq, rk, v = problem(rng, *size, dtype=dtype)
    do = rng.standard_normal(v.shape).astype(dtype)
    got = memory_backward(rq, rk, v, do, causal=causal, eps=EPS, form=form)
    ref = dense_backward_row(*(a.astype(np.float64) for a in (rq, rk, v, do)), causal, EPS)
    for name, g, r in zip(("drq", "drk", "dv"), got, ref):
        assert g.dtype == dtype
        assert_close(name, g, r, RTOL[dtype])


@pytest.mark.parametrize("slot", [False, True], ids=["row", "slot"])
@pytest.mark.parametrize("causal,form", FORMS, ids=FORM_IDS)
def test_backward_by_finite_differences(causal, form, slot):
    rq, rk, v = problem(np.random.default_rng(5), P=2, N=7, F=3, e=2, padded=False)
    rk[0, 2] = 0.0                                   # a padding key (its gradient still exists)

    def fun(rq, rk, v):
        return memory_forward(rq, rk, v, causal=causal, slot=slot, eps=EPS, form=form)

    def grad(do, rq, rk, v):
        return dict(zip(("rq", "rk", "v"), memory_backward(rq, rk, v, do, causal=causal,
                                                            slot=slot, eps=EPS, form=form)))

    report = gma_np.gradcheck(fun, grad, dict(rq=rq, rk=rk, v=v), mode="full")
    assert report.ok, report


@pytest.mark.parametrize("form", ["scan", "chunked"])
@pytest.mark.parametrize("prefix,total", [(1, 9), (37, 41), (250, 300), (256, 330)])
def test_causal_prefix_unchanged_when_tokens_are_appended(prefix, total, form):
    """Outputs of a prefix are bit for bit those of the prefix alone, whatever follows
    (the chunked form's last chunk and group change size as tokens are appended)."""
    rq, rk, v = problem(np.random.default_rng(6), P=3, N=total, F=4, e=3, padded=False)
    rk[:, prefix:] *= 1e3                            # future keys that would dominate if read
    full = memory_forward(rq, rk, v, causal=True, eps=EPS, form=form)
    alone = memory_forward(*(a[:, :prefix] for a in (rq, rk, v)), causal=True, eps=EPS, form=form)
    assert np.array_equal(full[:, :prefix], alone)
    assert not np.array_equal(full[:, prefix:], memory_forward(
        rq[:, prefix:], rk[:, prefix:], v[:, prefix:], causal=True, eps=EPS, form=form))


@pytest.mark.parametrize("slot", [False, True], ids=["row", "slot"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_recurrent_chunks_equal_the_causal_forward(dtype, slot):
    P, N, F, e = 3, 37, 5, 3
    rq, rk, v = problem(np.random.default_rng(7), P, N, F, e, dtype=dtype)
    ref = memory_forward(rq, rk, v, causal=True, slot=slot, eps=EPS)
    S0, z0 = np.zeros((P, F, e)), np.zeros((P, F))   # the empty memory
    S, z = S0, z0
    outs, start = [], 0
    for size in (1, 5, 1, 1, 13, 2, 14):             # uneven chunks, one-token chunks among them
        sl = slice(start, start + size)
        given = S.copy(), z.copy()
        o, S_new, z_new = memory_recurrent(rq[:, sl], rk[:, sl], v[:, sl], S, z, slot=slot, eps=EPS)
        assert o.dtype == dtype
        assert np.array_equal(S, given[0]) and np.array_equal(z, given[1]), "the given state changed"
        outs.append(o)
        S, z, start = S_new, z_new, start + size
    assert start == N
    assert_close("o", np.concatenate(outs, axis=1), ref, RTOL[dtype])
    # the state is the whole memory: S = rk^T v, z = rk^T 1
    assert_close("S", S, np.einsum("pnf,pne->pfe", rk.astype(np.float64), v.astype(np.float64)), 1e-12)
    assert_close("z", z, rk.astype(np.float64).sum(1), 1e-12)
    assert not S0.any() and not z0.any(), "the empty state was modified"


def test_step_is_one_token_of_the_recurrence():
    rq, rk, v = problem(np.random.default_rng(8), P=2, N=4, F=3, e=2)
    ref = memory_forward(rq, rk, v, causal=True, eps=EPS)
    S, z = np.zeros((2, 3, 2)), np.zeros((2, 3))
    for t in range(4):
        o, S, z = memory_step(rq[:, t], rk[:, t], v[:, t], S, z, eps=EPS)
        assert_close(f"o[{t}]", o, ref[:, t], 1e-12)


def test_empty_memory_gives_zero_or_a_clear_error():
    rq, rk, v = problem(np.random.default_rng(9), P=1, N=5, F=2, e=2, padded=False)
    rk[:] = 0.0
    for causal in (False, True):
        assert np.array_equal(memory_forward(rq, rk, v, causal=causal, eps=EPS), np.zeros_like(v))
        o = memory_forward(rq, rk, v, causal=causal, eps=0.0)
        with pytest.raises(FloatingPointError, match="linear: the output is not finite.*eps > 0"):
            check_output_finite("linear", o, 0.0)


def test_bad_input_gets_a_clear_error():
    rq, rk, v = problem(np.random.default_rng(10), P=2, N=5, F=3, e=2)
    with pytest.raises(TypeError, match="rk: expected dtype float64"):
        memory_forward(rq, rk.astype(np.float32), v, causal=False, eps=EPS)
    with pytest.raises(ValueError, match=r"rk: expected the shape of rq"):
        memory_forward(rq, rk[:, :4], v, causal=True, eps=EPS)
    with pytest.raises(ValueError, match=r"v: expected shape \(P, N, e\)"):
        memory_forward(rq, rk, v[:1], causal=True, eps=EPS)
    with pytest.raises(ValueError, match="do: expected the shape of v"):
        memory_backward(rq, rk, v, v[:, :, :1], causal=True, eps=EPS)
    with pytest.raises(ValueError, match="form: expected one of"):
        memory_forward(rq, rk, v, causal=True, eps=EPS, form="fast")
    with pytest.raises(ValueError, match=r"S: expected a float64 array of shape \(2, 3, 2\)"):
        memory_recurrent(rq, rk, v, np.zeros((2, 2, 3)), np.zeros((2, 3)), eps=EPS)
    with pytest.raises(ValueError, match="rq: expected an array with 3 dimensions"):
        memory_forward(rq[0], rk, v, causal=False, eps=EPS)


class _OtherState(MemoryState):
    pass


def test_state_checks_name_what_was_expected():
    state = empty_state(MemoryState, 2, 3, 4, 5)
    assert state.S.shape == (2, 3, 4, 5) and state.z.shape == (2, 3, 4) and not state.S.any()
    check_state(state, MemoryState, 2, 3, 4, 5, "F from q")
    with pytest.raises(TypeError, match="state: expected a _OtherState"):
        check_state(state, _OtherState, 2, 3, 4, 5, "F from q")
    with pytest.raises(ValueError, match=r"state.S: expected shape \(2, 3, 6, 5\).*F from q"):
        check_state(state, MemoryState, 2, 3, 6, 5, "F from q")
    bad = MemoryState(state.S.astype(np.float32), state.z)
    with pytest.raises(TypeError, match="state.S: expected dtype float64"):
        check_state(bad, MemoryState, 2, 3, 4, 5, "F from q")
    copy = state.copy()
    copy.S[0] = 1.0
    assert not state.S.any() and type(copy) is MemoryState
