"""Causality is exact: changing tokens at positions >= t changes nothing before t, bit for bit,
neither the outputs nor any gradient of a loss on the outputs before t."""

import numpy as np
import pytest

import gma_np
from tests.conftest import make_problem


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("t", [1, 18, 36])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_future_tokens_change_nothing_before_t(t, norm, masked, dtype):
    rng = np.random.default_rng(21)
    B, H, N, e = 2, 2, 37, 3
    inputs, mask = make_problem(rng, B=B, H=H, N=N, d=4, e=e, K=5, per_head=True, masked=masked)
    for n in ("q", "k", "v"):
        inputs[n] = inputs[n].astype(dtype)
    changed = {n: a.copy() for n, a in inputs.items()}
    for n in ("q", "k", "v"):
        changed[n][:, :, t:] = rng.standard_normal(changed[n][:, :, t:].shape) * 3
    changed_mask = None
    if masked:
        changed_mask = mask.copy()
        changed_mask[:, t:] = ~changed_mask[:, t:]              # the future mask changes too
    opts = dict(causal=True, norm=norm)
    o_a, cache_a = gma_np.gma_forward(**inputs, **opts, key_mask=mask)
    o_b, cache_b = gma_np.gma_forward(**changed, **opts, key_mask=changed_mask)
    assert np.array_equal(o_a[:, :, :t], o_b[:, :, :t]), "an output before t changed"
    assert not np.array_equal(o_a[:, :, t:], o_b[:, :, t:]), "the change did not reach the future"
    # a loss on the outputs before t only
    do = np.zeros(o_a.shape, dtype=dtype)
    do[:, :, :t] = rng.standard_normal((B, H, t, e))
    g_a = gma_np.gma_backward(do, cache_a)
    g_b = gma_np.gma_backward(do, cache_b)
    for name in ("q", "k", "v"):
        assert np.array_equal(g_a[name][:, :, :t], g_b[name][:, :, :t]), f"d{name} before t changed"
        assert not np.any(g_a[name][:, :, t:]), f"d{name} at or after t is not exactly zero"
    for name in ("means", "log_var", "logits", "temperature"):
        assert np.array_equal(g_a[name], g_b[name]), f"d{name} changed"
