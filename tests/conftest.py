"""Shared helpers of the test-suite: random GMA problems and a comparison that names what failed."""

import numpy as np
import pytest

from gma_np.selfcheck import make_problem  # noqa: F401  (re-exported for the tests)

# Tolerances per dtype for two exact forms of the same computation (fast vs reference).
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


def assert_close(name, got, ref, rtol, atol_scale=True):
    """Assert max|got - ref| <= rtol * max|ref| (or elementwise rtol if atol_scale is False)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    err = np.abs(got - ref)
    scale = np.abs(ref).max() if atol_scale else np.abs(ref)
    scale = np.maximum(scale, 1e-300)
    rel = (err / scale).max()
    worst = np.unravel_index(np.argmax(err / scale), err.shape) if err.ndim else ()
    assert rel <= rtol, (f"{name}: relative error {rel:.3e} > {rtol:g} at {worst}: "
                         f"got {got[worst]!r}, reference {ref[worst]!r}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
