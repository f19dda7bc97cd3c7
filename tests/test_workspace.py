"""Scratch arrays kept from call to call (gma_np._workspace), and gma_backward's use of one:
its dr is written in full on every call, so a kept array's old contents never reach a
gradient (held here with the array poisoned with NaN before each call, for every form
of the memory: bidirectional, the causal scan, the chunked form; masked and not)."""

import threading
import time

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


# ---------------------------------------------------------------- the pool (pooled)

@pytest.fixture
def pool_everything(monkeypatch):
    """Every pooled() array from the pool, whatever its size (the op's tests run at sizes
    below POOL_MIN_BYTES)."""
    monkeypatch.setattr(_workspace, "POOL_MIN_BYTES", 0)


def test_a_pooled_buffer_comes_back_only_when_no_view_of_it_is_left(pool_everything):
    a = _workspace.pooled((3, 5), np.float64)
    assert a.shape == (3, 5) and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
    where = a.ctypes.data
    view = a[1:].reshape(-1)[2:]                  # a view of a view
    del a
    assert _workspace.pool_bytes() == 0           # the view still holds the buffer
    b = _workspace.pooled((3, 5), np.float64)
    assert b.ctypes.data != where
    view[...] = 7.0
    del view
    assert _workspace.pool_bytes() == 15 * 8
    c = _workspace.pooled((5, 3), np.float64)     # the same bytes, another shape
    assert c.ctypes.data == where and _workspace.pool_bytes() == 0
    d = _workspace.pooled((30,), np.float32)      # 120 bytes: no free buffer of that size
    assert d.ctypes.data not in (where, b.ctypes.data, c.ctypes.data)


def test_small_arrays_are_not_pooled():
    a = _workspace.pooled((4,), np.float64)
    assert a.base is None and a.nbytes < _workspace.POOL_MIN_BYTES
    del a
    assert _workspace.pool_bytes() == 0


def test_the_pool_holds_at_most_pool_max_bytes(pool_everything, monkeypatch):
    monkeypatch.setattr(_workspace, "POOL_MAX_BYTES", 200)
    arrays = [_workspace.pooled((10,), np.float64) for _ in range(3)]   # 80 bytes each
    arrays.clear()
    assert _workspace.pool_bytes() == 160         # the third would exceed 200: freed
    _workspace.release()
    assert _workspace.pool_bytes() == 0


def test_threads_never_share_a_pooled_buffer(pool_everything):
    """Two threads taking and dropping pooled arrays of one size: each finds its own marks
    in its arrays after yielding to the other between writing and reading them."""
    errors = []

    def work(mark):
        for _ in range(300):
            a = _workspace.pooled((64,), np.float64)
            a.fill(mark)
            b = _workspace.pooled((64,), np.float64)
            b.fill(-mark)
            time.sleep(0)                         # give the other thread the GIL here
            if not (np.all(a == mark) and np.all(b == -mark)):
                errors.append(mark)
            del a, b

    threads = [threading.Thread(target=work, args=(m,)) for m in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal,form", FORMS, ids=["bidirectional", "scan", "chunked"])
@pytest.mark.parametrize("norm", ["row", "slot"])
def test_the_op_writes_every_entry_of_its_pooled_arrays(causal, form, masked, norm, pool_everything,
                                                         monkeypatch):
    """The output and the gradients with every free buffer of the pool poisoned (NaN)
    before the call are those of a call on fresh arrays, bit for bit, and the call took
    its arrays from the pool."""
    if form == "chunked":
        monkeypatch.setattr(mixing, "causal_form", lambda K, e: "chunked")
    rng = np.random.default_rng(5)
    inputs, mask = make_problem(rng, B=2, H=3, N=37, d=3, e=2, K=5, per_head=True, masked=masked)
    do = rng.standard_normal((2, 3, 37, 2))

    def call():
        o, cache = gma_np.gma_forward(**inputs, causal=causal, norm=norm, key_mask=mask)
        return o, gma_np.gma_backward(do, cache)

    o_fresh, g_fresh = call()                     # from fresh buffers (the pool was empty)
    o_fresh, g_fresh = o_fresh.copy(), {n: np.copy(g) for n, g in g_fresh.items()}
    call()                                        # its arrays, dropped, fill the pool
    held = _workspace.pool_bytes()
    assert held > 0
    for buffers in _workspace._POOL.values():
        for b in buffers:
            b[...] = 0xFF                         # every bit set: NaN in float32 and float64
    o, g = call()
    assert np.array_equal(o, o_fresh)
    for name, value in g_fresh.items():
        assert np.array_equal(g[name], value), name
    assert _workspace.pool_bytes() < held         # the call took buffers from the pool
