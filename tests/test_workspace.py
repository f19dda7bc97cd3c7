"""Scratch arrays kept from call to call (gma_np._workspace), and gma_backward's use of one:
its dr is written in full on every call, so a kept array's old contents never reach a
gradient (held here with the array poisoned with NaN before each call, for every form
of the memory: bidirectional, the causal scan, the chunked form; masked and not)."""

import threading

import numpy as np
import pytest

import gma_np
from gma_np import _workspace
from gma_np.mixers.gma import mixing
from tests.conftest import make_problem


@pytest.fixture(autouse=True)
def empty_workspace():
    _workspace.release()
    yield
    _workspace.release()


def test_the_same_name_shape_and_dtype_give_the_same_array_back():
    a = _workspace.scratch("t", (3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32
    assert _workspace.scratch("t", (3, 5), np.float32) is a
    assert _workspace.scratch("u", (3, 5), np.float32) is not a          # another name
    b = _workspace.scratch("t", (3, 6), np.float32)                        # another shape
    assert b is not a and b.shape == (3, 6)
    c = _workspace.scratch("t", (3, 6), np.float64)                        # another dtype
    assert c is not b and c.dtype == np.float64
    assert _workspace.scratch("t", (3, 6), np.float64) is c                # c replaced b
    _workspace.release()
    assert _workspace.scratch("t", (3, 6), np.float64) is not c


def test_an_array_above_the_bound_is_not_kept(monkeypatch):
    monkeypatch.setattr(_workspace, "WORKSPACE_MAX_BYTES", 100)
    small = _workspace.scratch("t", (12,), np.float64)                     # 96 bytes
    assert _workspace.scratch("t", (12,), np.float64) is small
    large = _workspace.scratch("t", (13,), np.float64)                     # 104 bytes
    assert _workspace.scratch("t", (13,), np.float64) is not large


def test_each_thread_has_its_own_arrays():
    mine = _workspace.scratch("t", (4,), np.float64)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(_workspace.scratch("t", (4,), np.float64)))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
    assert _workspace.scratch("t", (4,), np.float64) is mine


FORMS = [(False, "auto"), (True, "scan"), (True, "chunked")]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal,form", FORMS, ids=["bidirectional", "scan", "chunked"])
def test_gma_backward_writes_every_entry_of_its_kept_dr(causal, form, masked, monkeypatch):
    """The gradients with dr poisoned (NaN) before each call are those with a fresh array,
    bit for bit, and the kept array is the one the next call gets."""
    if form == "chunked":
        monkeypatch.setattr(mixing, "causal_form", lambda K, e: "chunked")
    rng = np.random.default_rng(3)
    inputs, mask = make_problem(rng, B=2, H=3, N=37, d=3, e=2, K=5, per_head=True, masked=masked)
    o, cache = gma_np.gma_forward(**inputs, causal=causal, key_mask=mask)
    do = rng.standard_normal(o.shape)
    fresh = gma_np.gma_backward(do, cache)
    kept = []

    def poisoned(name, shape, dtype):
        a = _workspace.scratch(name, shape, dtype)
        a.fill(np.nan)
        kept.append(a)
        return a

    monkeypatch.setattr(mixing, "scratch", poisoned)
    for _ in range(2):
        grads = gma_np.gma_backward(do, cache)
        for name, g in fresh.items():
            assert np.array_equal(grads[name], g), name
    assert kept[0] is kept[1]
