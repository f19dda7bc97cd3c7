"""Tests at the sizes that reach every code path, and float32 at the sizes where slow errors show.

The other files test each fast path at odd, small sizes (N = 37): one group of chunks,
one or two routing blocks, one token block per stream. Code that only runs at larger N
(the carries between groups of chunks, N > CHUNK_GROUP_TOKENS; a stream's second
routing or mixing block; the routing's full-size blocks from N = 32 ROUTING_BLOCK; the
chunked form that the automatic choice gives linear attention and the Performer at
F e >= CHUNKED_MIN_KE) is compared here with its naive reference, masked and unmasked:

- the feature memory, every form, forward and backward, against the dense N x N form at
  N = 549 (three groups of chunks, eight token blocks);
- GMA end to end, every form, against the dense reference at N = 549 (six routing
  blocks of 92 tokens, eight mixing blocks: several per stream), chunked forced through the public API;
- the routing's GEMM path against its direct form at N = 4133 (34 blocks of 122 tokens, the last of 107);
- linear attention and the Performer at F = e = 256, where the chunked form is chosen.

float32: errors that grow with N (a float32 accumulator, a sum that cancels) pass a
tolerance at N = 300 and fail at N = 4096. The float32 memory against float64 on the
same values must stay within 4 units of float32 rounding per row at N = 4096 (a float64
accumulator leaves one rounding, of the result; a float32 state reaches 1.2e-6 there);
the temperature gradient far from the means with a small tau, in float32, within 1e-5
of float64 (the row shift it takes out is 1800 there; without it the error is 1e-2 and more).
"""

import numpy as np
import pytest

import gma_np
from gma_np._numerics import CAUSAL_CHUNK, CHUNK_GROUP_TOKENS, CHUNKED_MIN_KE, ROUTING_BLOCK
from gma_np.memory import ops as memory_ops
from gma_np.memory.chunked import causal_chunked_backward, causal_chunked_forward
from gma_np.memory.ops import causal_form, memory_backward, memory_forward
from gma_np.memory.reference import dense_mix_backward, dense_mix_forward
from gma_np.mixers.gma import mixing
from gma_np.mixers.gma.reference.dense import gma_dense, gma_dense_backward
from gma_np.mixers.gma.routing import (prepare_mixture, route_backward, route_backward_direct,
                                       route_forward, route_forward_direct)
from gma_np.mixers.linear.naive import linear_attention_dense
from gma_np.mixers.linear.ops import linear_attention_backward, linear_attention_forward
from gma_np.mixers.performer.features import draw_projections
from gma_np.mixers.performer.naive import performer_attention_dense
from gma_np.mixers.performer.ops import performer_attention_backward, performer_attention_forward
from tests.conftest import RTOL, assert_close, make_problem

# three groups of chunks at the default chunk (the last one partial), eight token blocks
N_LONG = 2 * CHUNK_GROUP_TOKENS + 37
U32 = float(np.finfo(np.float32).eps) / 2          # unit roundoff of float32, 6.0e-8


def test_the_sizes_reach_the_paths():
    assert N_LONG > 2 * CHUNK_GROUP_TOKENS and N_LONG % CAUSAL_CHUNK
    assert 4133 > 32 * ROUTING_BLOCK
    assert causal_form(256, 256) == "chunked" and causal_form(5, 3) == "scan"
    assert 256 * 256 >= CHUNKED_MIN_KE


# --- the feature memory at N = 549 ----------------------------------------------------------

def memory_problem(rng, P, N, F, e, masked, dtype=np.float64):
    """Positive features; masked: about 30% of the keys zeroed, never the first."""
    rq = rng.uniform(0.05, 1.0, (P, N, F))
    rk = rng.uniform(0.05, 1.0, (P, N, F))
    if masked:
        keep = rng.random((P, N)) > 0.3
        keep[:, 0] = True
        rk *= keep[:, :, None]
    v = rng.standard_normal((P, N, e))
    do = rng.standard_normal((P, N, e))
    return tuple(a.astype(dtype) for a in (rq, rk, v, do))


def dense_memory(rq, rk, v, do, causal, slot, eps):
    out = np.stack([dense_mix_forward(rq[p], rk[p], v[p], causal, slot, eps) for p in range(len(rq))])
    grads = [dense_mix_backward(do[p], rq[p], rk[p], v[p], causal, slot, eps) for p in range(len(rq))]
    return (out,) + tuple(np.stack(g) for g in zip(*grads))


# (causal, form, chunk): the bidirectional GEMMs, the scan, the chunked form at the default
# chunk (4 chunks a group), at 16 (16 chunks a group) and at an odd 37 (6 a group)
MEMORY_FORMS = [(False, None, None), (True, "scan", None), (True, "chunked", CAUSAL_CHUNK),
                (True, "chunked", 16), (True, "chunked", 37)]
MEMORY_IDS = ["bidirectional", "scan", "chunked-C64", "chunked-C16", "chunked-C37"]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("slot", [False, True], ids=["row", "slot"])
@pytest.mark.parametrize("causal,form,chunk", MEMORY_FORMS, ids=MEMORY_IDS)
def test_memory_forms_match_dense_over_several_groups_and_blocks(causal, form, chunk, slot, masked):
    """P=2, N=549, F=5, e=3, float64: o, drq, drk, dv to 1e-12 of the dense form."""
    args = memory_problem(np.random.default_rng(40), 2, N_LONG, 5, 3, masked)
    eps = 1e-6
    if chunk is not None:
        rq, rk, v, do = args
        got = [causal_chunked_forward(rq, rk, v, slot, eps, chunk)]
        drq, drk = np.empty_like(rq), np.empty_like(rk)
        dv = causal_chunked_backward(rq, rk, v, do, slot, eps, chunk, drq, drk)
        got += [drq, drk, dv]
    else:
        got = [memory_forward(*args[:3], causal=causal, slot=slot, eps=eps, form=form)]
        got += list(memory_backward(*args, causal=causal, slot=slot, eps=eps, form=form))
    for name, g, r in zip(("o", "drq", "drk", "dv"), got, dense_memory(*args, causal, slot, eps)):
        assert_close(f"{name} ({MEMORY_IDS[MEMORY_FORMS.index((causal, form, chunk))]})", g, r, 1e-12)


# --- GMA end to end at N = 549 ---------------------------------------------------------------

GMA_FORMS = [(False, "auto"), (True, "scan"), (True, "chunked")]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("causal,form", GMA_FORMS, ids=["bidirectional", "scan", "chunked"])
def test_gma_matches_dense_over_several_blocks_per_stream(causal, form, norm, masked, monkeypatch):
    """B=1, H=2, N=549, d=3, e=2, K=4, per-head temperature, float64: o to 1e-12 and every
    gradient to 1e-11 of the dense N x N reference (the chunked form forced through gma)."""
    if form == "chunked":
        monkeypatch.setattr(mixing, "causal_form", lambda K, e: "chunked")
    rng = np.random.default_rng(41)
    inputs, mask = make_problem(rng, B=1, H=2, N=N_LONG, d=3, e=2, K=4, per_head=True, masked=masked)
    opts = dict(causal=causal, norm=norm, key_mask=mask)
    o, cache = gma_np.gma_forward(**inputs, **opts)
    assert_close("o", o, gma_dense(**inputs, **opts), 1e-12)
    do = rng.standard_normal(o.shape)
    grads = gma_np.gma_backward(do, cache)
    ref = gma_dense_backward(do, **inputs, **opts)
    for name in ("q", "k", "v", "means", "log_var", "logits", "temperature"):
        assert_close(f"d{name}", grads[name], ref[name], 1e-11)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_routing_gemm_path_matches_direct_form_with_full_blocks(dtype):
    """N = 4133 (34 routing blocks of 122 tokens, the last of 107, dealt to the streams):
    responsibilities and every routing gradient, the GEMM path against the direct form."""
    rng = np.random.default_rng(42)
    inputs, _ = make_problem(rng, B=1, H=2, N=4133, d=3, e=2, K=4, per_head=True)
    mix = prepare_mixture(inputs["means"], inputs["log_var"], inputs["logits"])
    x = inputs["q"].astype(dtype)
    tau = inputs["temperature"]
    r, cache = route_forward(x, mix, tau, True, np.dtype(np.float64))
    r_d, cache_d = route_forward_direct(x, mix, tau, True, np.dtype(np.float64))
    assert_close("r", r, r_d, RTOL[dtype])
    dr = rng.standard_normal(r.shape).astype(dtype)
    got = route_backward(dr.copy(), cache)
    ref = route_backward_direct(dr.copy(), cache_d)
    for name in ("x", "means", "log_var", "logits", "temperature"):
        assert_close(f"d{name}", got[name], ref[name], 1e-10 if dtype == np.float64 else 1e-5)


# --- linear attention and the Performer where the chunked form is chosen ------------------------

def _scan_only(monkeypatch):
    monkeypatch.setattr(memory_ops, "causal_form", lambda F, e: "scan")


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_linear_attention_through_the_chunked_form(masked, monkeypatch):
    """d = e = 256 (F e = CHUNKED_MIN_KE: the chunked form), N = 300 (two groups): o against
    the dense form, every gradient against the scan form of the same op."""
    rng = np.random.default_rng(43)
    B, H, N, d = 1, 1, 300, 256
    q, k, v = 0.3 * rng.standard_normal((3, B, H, N, d))
    mask = (rng.random((B, N)) > 0.3) | (np.arange(N) == 0) if masked else None
    o, cache = linear_attention_forward(q, k, v, causal=True, key_mask=mask)
    assert_close("o", o, linear_attention_dense(q, k, v, causal=True, key_mask=mask), 1e-12)
    do = rng.standard_normal(o.shape)
    got = linear_attention_backward(do, cache)
    _scan_only(monkeypatch)
    ref = linear_attention_backward(do, linear_attention_forward(q, k, v, causal=True, key_mask=mask)[1])
    for name in ("q", "k", "v"):
        assert_close(f"d{name}", got[name], ref[name], 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_performer_through_the_chunked_form(masked, monkeypatch):
    """m = e = 256 random features (the chunked form), N = 300: as for linear attention."""
    rng = np.random.default_rng(44)
    B, H, N, d, m = 1, 1, 300, 4, 256
    q, k = 0.5 * rng.standard_normal((2, B, H, N, d))
    v = rng.standard_normal((B, H, N, m))
    W = draw_projections(H, m, d, rng)
    mask = (rng.random((B, N)) > 0.3) | (np.arange(N) == 0) if masked else None
    o, cache = performer_attention_forward(q, k, v, W, causal=True, key_mask=mask)
    assert_close("o", o, performer_attention_dense(q, k, v, W, causal=True, key_mask=mask), 1e-11)
    do = rng.standard_normal(o.shape)
    got = performer_attention_backward(do, cache)
    _scan_only(monkeypatch)
    ref = performer_attention_backward(
        do, performer_attention_forward(q, k, v, W, causal=True, key_mask=mask)[1])
    for name in ("q", "k", "v"):
        assert_close(f"d{name}", got[name], ref[name], 1e-12)


# --- float32 where slowly growing errors show ----------------------------------------------------

def row_error(got, ref):
    """max over rows of |got - ref| / |ref| (rows: the last axis)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float((np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max())


@pytest.mark.parametrize("slot", [False, True], ids=["row", "slot"])
@pytest.mark.parametrize("causal,form", [(False, None), (True, "scan"), (True, "chunked")],
                         ids=["bidirectional", "scan", "chunked"])
def test_float32_memory_error_does_not_grow_with_n(causal, form, slot):
    """float32 against float64 on the same values, N = 256 and 4096: every output and gradient
    row within 4 units of float32 rounding (the accumulators are float64: one rounding, of the
    result, whatever N; a float32 state gives 2.7e-7 at N = 256 and 1.2e-6 at 4096)."""
    for N in (256, 4096):
        args32 = memory_problem(np.random.default_rng(45), 2, N, 5, 3, masked=True, dtype=np.float32)
        args64 = tuple(a.astype(np.float64) for a in args32)
        opts = dict(causal=causal, slot=slot, eps=1e-6, form=form)
        got = [memory_forward(*args32[:3], **opts)] + list(memory_backward(*args32, **opts))
        ref = [memory_forward(*args64[:3], **opts)] + list(memory_backward(*args64, **opts))
        for name, g, r in zip(("o", "drq", "drk", "dv"), got, ref):
            assert g.dtype == np.float32, name
            err = row_error(g[np.linalg.norm(r, axis=-1) > 0], r[np.linalg.norm(r, axis=-1) > 0])
            assert err <= 4 * U32, f"{name} at N={N}: float32 row error {err:.2e} > {4 * U32:.2e}"


def far_mixture(rng, H, K, d, spread):
    """Means within `spread` of the origin, equal unit variances: data far away (|x| ~ 60)
    sees log-densities near -1800 that differ by a few units between components."""
    return dict(means=spread * rng.standard_normal((H, K, d)), log_var=np.zeros((H, K, d)),
                logits=rng.standard_normal((H, K)))


def test_float32_temperature_gradient_far_from_the_means():
    """Responsibilities of points at distance 60 from the means, tau = 0.1 (r not saturated:
    max_k r ~ 0.92 on average), float32 against float64 on the same values: dtau within 1e-5
    (measured 4e-7). The common part of l (~ -1800) times the float32 rounding of dl would
    put 1e-2 to 1e2 into dtau without the row shift."""
    from gma_np.mixers.gma.routing import responsibilities_backward, responsibilities_forward
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        H, K, d, N, B = 2, 5, 4, 37, 2
        mix = far_mixture(rng, H, K, d, 0.005)
        x = (30.0 + rng.standard_normal((B, H, N, d))).astype(np.float32)
        dr = rng.standard_normal((B, H, N, K)).astype(np.float32)
        tau = np.full(H, 0.1)
        got = []
        for dtype in (np.float32, np.float64):
            r, cache = responsibilities_forward(x.astype(dtype), **mix, temperature=tau)
            got.append(np.asarray(responsibilities_backward(dr.astype(dtype), cache)["temperature"]))
        assert r.max(axis=-1).mean() < 0.99, "saturated: the test would not see the shift"
        err = np.abs(got[0] - got[1]) / np.abs(got[1])
        assert err.max() <= 1e-5, f"seed {seed}: dtau float32 relative error {err.max():.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_gma_temperature_gradient_far_from_the_means(causal):
    """The same through gma: q, k at distance 60 from the means, tau = 0.1, float32 against
    float64: dtau within 2e-5 (measured up to 4e-6; without the shift 0.1 and more)."""
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        H, K, d, N, B = 2, 5, 4, 37, 2
        mix = far_mixture(rng, H, K, d, 0.01)
        q, k = (30.0 + rng.standard_normal((2, B, H, N, d))).astype(np.float32)
        v, do = rng.standard_normal((2, B, H, N, 3)).astype(np.float32)
        tau = np.full(H, 0.1)
        got = []
        for dtype in (np.float32, np.float64):
            o, cache = gma_np.gma_forward(q.astype(dtype), k.astype(dtype), v.astype(dtype), **mix,
                                          causal=causal, temperature=tau)
            got.append(np.asarray(gma_np.gma_backward(do.astype(dtype), cache)["temperature"]))
        err = np.abs(got[0] - got[1]) / np.abs(got[1])
        assert err.max() <= 2e-5, f"seed {seed}: dtau float32 relative error {err.max():.2e}"
