"""The attention shell's fused q, k, v projection against the three separate products.

gma_np.mixers.attention makes Q, K, V from one product x [Wq | Wk | Wv] and its backward
from one linear_backward of [dQ | dK | dV] (the module docstring). For every attention
mixer, at odd sizes (D 21, H 3, d 5, e 4 and d = e = 5, B 2, N 37), causal and
bidirectional, with and without a key mask:

- the fused shell's output and every gradient (x and each parameter) equal those of the
  shell built on the separate products (attention_mixer(..., fused=False)): float64 to
  1e-12, float32 to 2e-6, relative to the largest entry of the separate form's array;
- the gradients are separate contiguous arrays of their parameters' shapes;
- the split and the merge of heads are exact (same bits as split_heads / merge_heads);
- the fused shell passes a full-mode float64 gradcheck at a tiny size, d = e and d != e.
"""

import importlib

import numpy as np
import pytest

import gma_np
from gma_np.mixers import MIXER_NAMES, REGISTRY, get_mixer
from gma_np.mixers.attention import (attention_mixer, merge_heads, merge_qkv, split_heads,
                                     split_qkv)
from gma_np.nn.model import ModelConfig

RTOL = {np.float64: 1e-12, np.float32: 2e-6}

ATTENTION_MIXERS = ("gma", "softmax", "linear", "performer")

# odd sizes: D 21, H 3, K 5 components, m 7 random features; d, e per case
ODD = dict(vocab_size=11, max_len=40, d_model=21, n_layers=1, n_heads=3, n_components=5,
           n_features=7, mlp_ratio=2, conv_width=2, dtype="float64")
HEADS = {"d5e4": dict(head_dim=5, value_dim=4), "d5e5": dict(head_dim=5, value_dim=5)}


def test_attention_mixers_are_every_shell_mixer():
    """ATTENTION_MIXERS is every registered mixer built by the shell (a new one is not missed)."""
    shell = {n for n in MIXER_NAMES
             if get_mixer(n).forward.__qualname__.startswith("attention_mixer.")}
    assert shell == set(ATTENTION_MIXERS)


def _pair(name):
    """The registered (fused) Mixer and the same core's shell on separate products."""
    core = importlib.import_module(REGISTRY[name])
    return get_mixer(name), attention_mixer(name, core, fused=False)


def _setup(name, heads, seed=0, scale=0.5, B=2, N=37):
    fused, _ = _pair(name)
    cfg = ModelConfig(**{**ODD, **HEADS[heads], "mixer": name})
    rng = np.random.default_rng(seed)
    p = fused.init_parameters(cfg, rng)
    p = {n: v + scale * rng.standard_normal(v.shape) for n, v in p.items()}
    buf = fused.init_buffers(cfg, rng)
    x = rng.standard_normal((B, N, cfg.d_model))
    dy = rng.standard_normal((B, N, cfg.d_model))
    mask = np.ones((B, N), dtype=bool)
    mask[0, 3] = mask[0, N - 4] = mask[1, 10] = False
    return cfg, p, buf, x, dy, mask


def _close(what, got, ref, rtol, scale=None):
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), scale or 0.0, 1e-300)
    err = np.abs(got - ref).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:g}"


def _bias_scale(n, g):
    """The scale a bias gradient's rounding is relative to: that of its weight's gradient.

    A bias gradient is a column sum of dQ (dK, dV) over B N rows, and some are zero but
    for rounding (softmax attention's dbk: q . (k + b) shifts every score of a query by
    the same amount); its rounding is of the size of the terms it sums, which the weight
    gradient x^T dQ (x standard normal) has too."""
    w = {"bq": "Wq", "bk": "Wk", "bv": "Wv", "bo": "Wo"}.get(n)
    return None if w is None else float(np.abs(np.asarray(g[w], np.float64)).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("name", ATTENTION_MIXERS)
def test_fused_equals_separate_products(name, heads, dtype):
    fused, separate = _pair(name)
    cfg, p, buf, x, dy, mask = _setup(name, heads)
    arrays = {n: v.astype(dtype) for n, v in {**p, **buf}.items()}
    x, dy = x.astype(dtype), dy.astype(dtype)
    for causal in ([True] if fused.causal_only else [True, False]):
        for key_mask in (None, mask):
            case = f"{name} {heads} {dtype.__name__} causal={causal} mask={key_mask is not None}"
            y, cache = fused.forward(x, arrays, cfg, causal=causal, key_mask=key_mask)
            y_ref, cache_ref = separate.forward(x, arrays, cfg, causal=causal, key_mask=key_mask)
            assert y.dtype == y_ref.dtype == dtype, f"{case}: dtype {y.dtype}, {y_ref.dtype}"
            _close(f"{case} y", y, y_ref, RTOL[dtype])
            dx, g = fused.backward(dy, cache)
            dx_ref, g_ref = separate.backward(dy, cache_ref)
            assert dx.dtype == dx_ref.dtype, f"{case}: dx dtype {dx.dtype} != {dx_ref.dtype}"
            _close(f"{case} dx", dx, dx_ref, RTOL[dtype])
            assert list(g) == list(g_ref), f"{case}: gradients {list(g)} != {list(g_ref)}"
            for n in g:
                assert g[n].dtype == g_ref[n].dtype, f"{case} {n}: dtype {g[n].dtype}"
                _close(f"{case} d{n}", g[n], g_ref[n], RTOL[dtype], _bias_scale(n, g_ref))


def test_projection_gradients_are_their_own_arrays():
    fused, _ = _pair("softmax")
    cfg, p, buf, x, dy, _ = _setup("softmax", "d5e4")
    y, cache = fused.forward(x, {**p, **buf}, cfg, causal=True)
    _, g = fused.backward(dy, cache)
    names = ("Wq", "bq", "Wk", "bk", "Wv", "bv")
    for n in names:
        assert g[n].shape == p[n].shape, f"{n}: shape {g[n].shape} != {p[n].shape}"
        assert g[n].flags.c_contiguous and g[n].flags.owndata, f"{n}: not its own contiguous array"
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.shares_memory(g[a], g[b]), f"{a} and {b} share memory"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d, e", [(5, 4), (5, 5), (3, 7)])
def test_split_and_merge_of_heads_are_exact(d, e, dtype):
    B, N, H = 2, 37, 3
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((B, N, H * (2 * d + e))).astype(dtype)
    q, k, v = split_qkv(qkv, H, d, e)
    Hd = H * d
    parts = (qkv[:, :, :Hd], qkv[:, :, Hd:2 * Hd], qkv[:, :, 2 * Hd:])
    for got, part, c in zip((q, k, v), parts, (d, d, e)):
        assert got.shape == (B, H, N, c) and got.flags.c_contiguous and got.dtype == dtype
        np.testing.assert_array_equal(got, split_heads(np.ascontiguousarray(part), H))
    merged = merge_qkv(q, k, v)
    assert merged.dtype == dtype
    np.testing.assert_array_equal(merged, qkv)
    np.testing.assert_array_equal(
        merge_qkv(q, k, v), np.concatenate([merge_heads(t) for t in (q, k, v)], axis=2))


@pytest.mark.parametrize("heads", ["d3e2", "d3e3"])
@pytest.mark.parametrize("name", ATTENTION_MIXERS)
def test_fused_shell_full_gradcheck(name, heads):
    fused, _ = _pair(name)
    d, e = int(heads[1]), int(heads[3])
    cfg = ModelConfig(**{**ODD, "d_model": 5, "n_heads": 2, "head_dim": d, "value_dim": e,
                         "n_components": 3, "n_features": 4, "mixer": name})
    rng = np.random.default_rng(2)
    p = fused.init_parameters(cfg, rng)
    p = {n: v + 0.5 * rng.standard_normal(v.shape) for n, v in p.items()}
    buf = fused.init_buffers(cfg, rng)
    x = rng.standard_normal((2, 5, cfg.d_model))

    def fun(x, **q):
        return fused.forward(x, {**q, **buf}, cfg, causal=True)[0]

    def grad(dy, x, **q):
        dx, g = fused.backward(dy, fused.forward(x, {**q, **buf}, cfg, causal=True)[1])
        return {"x": dx, **g}

    # step 1e-5: linear attention's elu + 1 features are C^1 only (tests/test_mixer_contract.py)
    report = gma_np.gradcheck(fun, grad, {"x": x, **p}, mode="full", step=1e-5)
    assert report.ok, f"{name} {heads}\n{report}"
    assert {c.name for c in report.inputs} == {"x", *p}
