"""float32 and float64: outputs and gradients keep the dtypes that came in; float32 is accurate."""

import numpy as np
import pytest

import gma_np
from tests.conftest import make_problem


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_float32_in_float32_out_and_close_to_float64(causal, norm):
    rng = np.random.default_rng(31)
    inputs, mask = make_problem(rng, B=2, H=2, N=301, d=8, e=5, K=7, masked=True)
    f32 = {n: (a.astype(np.float32) if isinstance(a, np.ndarray) else a) for n, a in inputs.items()}
    f64 = {n: (a.astype(np.float64) if isinstance(a, np.ndarray) else a) for n, a in f32.items()}
    o32, c32 = gma_np.gma_forward(**f32, causal=causal, norm=norm, key_mask=mask)
    o64, c64 = gma_np.gma_forward(**f64, causal=causal, norm=norm, key_mask=mask)
    assert o32.dtype == np.float32 and o64.dtype == np.float64
    row_err = np.linalg.norm(o32 - o64, axis=-1) / np.linalg.norm(o64, axis=-1)
    assert row_err.max() <= 2e-6, f"worst row relative error {row_err.max():.2e}"
    do = rng.standard_normal(o32.shape)
    g32 = gma_np.gma_backward(do.astype(np.float32), c32)
    g64 = gma_np.gma_backward(do, c64)
    for name in ("q", "k", "v", "means", "log_var", "logits"):
        assert g32[name].dtype == np.float32, name
        err = np.abs(g32[name] - g64[name]).max() / np.abs(g64[name]).max()
        assert err <= 1e-5, f"d{name}: float32 relative error {err:.2e}"
    assert isinstance(g32["temperature"], float)


def test_parameter_gradients_keep_their_own_dtype():
    rng = np.random.default_rng(32)
    inputs, _ = make_problem(rng, B=1, H=2, N=9, d=3, e=2, K=3, per_head=True)
    inputs["means"] = inputs["means"].astype(np.float32)
    inputs["temperature"] = inputs["temperature"].astype(np.float32)
    o, cache = gma_np.gma_forward(**inputs)
    g = gma_np.gma_backward(np.ones_like(o), cache)
    assert o.dtype == np.float64
    assert g["means"].dtype == np.float32 and g["log_var"].dtype == np.float64
    assert g["temperature"].dtype == np.float32 and g["temperature"].shape == (2,)
