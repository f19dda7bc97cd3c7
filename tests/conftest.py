"""Shared helpers of the test-suite: random GMA problems, a comparison that names what failed,
and the settings of the property-based tests."""

import os

import numpy as np
import pytest

from gma_np.memory.reference import dense_mix_backward, dense_mix_forward
from gma_np.memory.scan import _causal_backward, _causal_forward
from gma_np.selfcheck import make_problem  # noqa: F401  (re-exported for the tests)

collect_ignore = ["mutation"]      # tests/mutation/: the mutation check, a tool (docs/testing.md)

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


def causal_dense(rq, rk, v, do, slot, eps):
    """(out, drq, drk, dv) of the causal memory by the N x N reference in float64,
    sequence by sequence: rq, rk (P, N, K), v, do (P, N, e)."""
    rq, rk, v, do = (a.astype(np.float64) for a in (rq, rk, v, do))
    out = np.stack([dense_mix_forward(rq[p], rk[p], v[p], True, slot, eps) for p in range(len(rq))])
    grads = [dense_mix_backward(do[p], rq[p], rk[p], v[p], True, slot, eps) for p in range(len(rq))]
    return (out,) + tuple(np.stack(g) for g in zip(*grads))


def causal_scan(rq, rk, v, do, slot, eps):
    """(out, drq, drk, dv) of the causal memory by the scan's wrappers (gma_np.memory.scan)."""
    out = _causal_forward(rq, rk, v, slot, eps)
    drq, drk = np.empty_like(rq), np.empty_like(rk)
    dv = _causal_backward(rq, rk, v, do, slot, eps, drq, drk)
    return out, drq, drk, dv


def assert_results_close(names, got, dtype, **references):
    """Every result of got (a sequence, named by names) is in dtype and within RTOL[dtype]
    of the same result of each reference (label=its sequence of results)."""
    for name, g in zip(names, got):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {np.dtype(dtype)}"
    for label, ref in references.items():
        for name, g, r in zip(names, got, ref):
            assert_close(f"{name} vs {label}", g, r, RTOL[dtype])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# The property-based tests (tests/test_properties.py) run a fixed number of examples each (set
# there), with no deadline: the first example of a process waits for Numba to compile or load
# its kernels. No example database: a run leaves no files behind, and a failure prints the
# example (and a blob to reproduce it). With CI set, the examples are derandomized: every run
# tests the same ones, so that CI fails on a change of the code, not of the draw.
try:
    from hypothesis import HealthCheck, settings
except ImportError:                   # without hypothesis, test_properties.py skips itself
    settings = None
if settings is not None:
    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", **_common)
    settings.register_profile("ci", derandomize=True, **_common)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
