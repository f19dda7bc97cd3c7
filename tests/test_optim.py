"""gma_np.optim: AdamW against a scalar reference, decay masks, the schedule, clipping, state round trip."""

import math

import numpy as np
import pytest

from gma_np.nn import ModelConfig, decays
from gma_np.optim import AdamW, adamw_update_naive, clip_grad_norm, global_norm, lr_at

RTOL = {np.float64: 1e-12, np.float32: 1e-6}


def _reference_adamw(p, grads, lrs, beta1, beta2, eps, wd, decay):
    """Element by element, straight from Loshchilov and Hutter (2019), in Python floats."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for i in range(len(p)):
            if decay:
                p[i] -= lr * wd * p[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            mhat = m[i] / (1 - beta1 ** t)
            vhat = v[i] / (1 - beta2 ** t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return np.array(p)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "no-decay"])
def test_adamw_matches_reference(rng, dtype, decay):
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(5)]
    lrs = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2]
    params = {"w": p0.astype(dtype)}
    opt = AdamW(params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, decay={"w": decay})
    for g, lr in zip(grads, lrs):
        opt.step(params, {"w": g.astype(dtype)}, lr)
    ref = _reference_adamw(p0.astype(dtype), [g.astype(dtype) for g in grads], lrs,
                           0.9, 0.99, 1e-8, 0.1, decay)
    np.testing.assert_allclose(params["w"], ref, rtol=RTOL[dtype], atol=RTOL[dtype])
    assert params["w"].dtype == dtype


def test_no_decay_on_norms_biases_and_mixture():
    cfg = ModelConfig()                                   # GMA, the tiny preset's shape
    assert all(decays(n, cfg) for n in ("h0.gma.Wq", "h1.mlp.W2", "wte", "wpe"))
    for name in ("h0.ln1.g", "h0.ln1.b", "h0.gma.bq", "h0.mlp.b1", "lnf.g", "h0.gma.logits",
                 "h0.gma.means", "h0.gma.log_var", "h0.gma.log_tau", "h0.conv.c"):
        assert not decays(name, cfg), name
    # with a zero gradient only the decayed parameter moves, by exactly lr * wd * p
    params = {"h0.gma.Wq": np.ones(3), "h0.gma.logits": np.ones(3)}
    opt = AdamW(params, weight_decay=0.5, decay={n: decays(n, cfg) for n in params})
    opt.step(params, {n: np.zeros(3) for n in params}, lr=0.1)
    np.testing.assert_array_equal(params["h0.gma.logits"], np.ones(3))
    np.testing.assert_allclose(params["h0.gma.Wq"], np.full(3, 1 - 0.1 * 0.5), rtol=1e-15)


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-15)   # linear warm-up
    assert lrs[9] == 1.0                                                         # peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                      # then decreasing
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1, rel=1e-12)      # min at the end
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55, rel=1e-12)      # halfway: mean


def test_clip_grad_norm(rng):
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    norm = global_norm(grads)
    assert norm == pytest.approx(math.sqrt(sum((g ** 2).sum() for g in grads.values())))
    before = {n: g.copy() for n, g in grads.items()}
    assert clip_grad_norm(grads, 10 * norm) == norm                              # below: no-op
    for n in grads:
        np.testing.assert_array_equal(grads[n], before[n])
    clip_grad_norm(grads, norm / 4)
    assert global_norm(grads) == pytest.approx(norm / 4, rel=1e-12)
    np.testing.assert_allclose(grads["a"], before["a"] / 4, rtol=1e-12)         # direction kept


def test_state_round_trip(rng):
    params = {"w": rng.standard_normal(4)}
    opt = AdamW(params)
    opt.step(params, {"w": rng.standard_normal(4)}, 0.1)
    other = AdamW(params)
    other.load_state_arrays(opt.state_arrays())
    assert other.t == 1
    np.testing.assert_array_equal(other.m["w"], opt.m["w"])
    with pytest.raises(ValueError, match="m/w"):
        other.load_state_arrays({"t": np.array(1)})


def test_adamw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="betas"):
        AdamW({}, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW({}, weight_decay=-1)
    opt = AdamW({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="grads"):
        opt.step({"w": np.zeros(2)}, {}, 0.1)


def test_adamw_in_two_streams_is_the_naive_update_bit_for_bit(rng, monkeypatch):
    """Every parameter updated in one of two groups on the streams (threshold 0, five
    parameters of odd sizes, float32 and float64, decayed or not): the same bits as
    adamw_update_naive parameter by parameter, at one Numba thread and at two."""
    import numba
    from gma_np import optim
    monkeypatch.setattr(optim, "ADAMW_STREAM_MIN_ELEMENTS", 0)
    sizes = {"a": (3, 7), "b": (11,), "c": (5, 2, 3), "d": (1,), "e": (13, 4)}
    assert len(optim._halves(list(sizes), [int(np.prod(s)) for s in sizes.values()])) == 2
    for dtype in (np.float32, np.float64):
        p0 = {n: rng.standard_normal(s).astype(dtype) for n, s in sizes.items()}
        gs = [{n: rng.standard_normal(s).astype(dtype) for n, s in sizes.items()} for _ in range(3)]
        decay = {n: n in ("a", "c") for n in sizes}
        runs = []
        threads = numba.get_num_threads()
        try:
            for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(t)
                params = {n: p.copy() for n, p in p0.items()}
                opt = AdamW(params, weight_decay=0.1, decay=decay)
                for step, g in enumerate(gs):
                    opt.step(params, g, 1e-2 * (step + 1))
                runs.append(params)
        finally:
            numba.set_num_threads(threads)
        for n in sizes:
            p, m, v = p0[n].copy(), np.zeros_like(p0[n]), np.zeros_like(p0[n])
            for step, g in enumerate(gs):
                adamw_update_naive(p, g[n], m, v, 1e-2 * (step + 1), step + 1, 0.9, 0.99, 1e-8,
                                   0.1, decay[n])
            for run in runs:
                np.testing.assert_array_equal(run[n], p, err_msg=f"{n} {np.dtype(dtype).name}")
