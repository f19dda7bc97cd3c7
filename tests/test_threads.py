"""Thread control (gma_np/_threads.py): BLAS on one thread inside an op's block loops and
for a training run, the caller's BLAS threads back afterwards (on return and on raise), and
Numba's OpenMP wait policy applied to its own pool only.

A test about restoring more than one thread skips where BLAS cannot run on two threads (one
core, or a BLAS threadpoolctl cannot control): with one thread there is nothing to restore,
and it would pass whatever the code did.
"""

import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
import threadpoolctl

import gma_np
from gma_np import _threads
from gma_np.memory import bidirectional as bidirectional_module
from gma_np.mixers.gma import routing as routing_module
from gma_np.train import TrainingDiverged, preset, train
from gma_np.train import loop as loop_module
from tests.conftest import make_problem


def _blas_threads():
    """The thread count of every loaded BLAS library, as this thread sees it."""
    return [lib.get_num_threads()
            for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers]


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture
def blas_on_two():
    """Every BLAS on 2 threads for the test (the state a Python caller would have), then back."""
    if _cores() < 2:
        pytest.skip("one core: BLAS cannot be given two threads to restore")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        counts = _blas_threads()
        if not counts or any(n != 2 for n in counts):
            pytest.skip(f"BLAS cannot be set to 2 threads here (it reports {counts})")
        yield


@pytest.fixture(scope="module")
def problem():
    inputs, mask = make_problem(np.random.default_rng(3), B=2, H=2, N=37, d=4, e=3, K=5,
                                per_head=True, masked=True)
    return inputs, mask


@pytest.fixture(scope="module")
def large_problem():
    """Routing work above PARALLEL_MIN_WORK (2 x 2 x 1024 x 16 points x 16 components x 2),
    so that the streams run on the worker threads when Numba has two."""
    inputs, _ = make_problem(np.random.default_rng(4), B=1, H=2, N=1024, d=16, e=8, K=16)
    return inputs, None


def _recording_run_streams(monkeypatch, module, seen):
    """Wrap module.run_streams so that every stream records its thread and its BLAS threads."""
    real = module.run_streams

    def run_streams(fn, n_streams):
        def stream(s):
            seen.append((threading.current_thread().name, _blas_threads()))
            return fn(s)
        return real(stream, n_streams)
    monkeypatch.setattr(module, "run_streams", run_streams)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_an_op_runs_its_block_loops_on_one_blas_thread_and_restores(blas_on_two, problem, large_problem,
                                                                    monkeypatch, causal, size):
    if size == "large" and numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: the streams never run on worker threads")
    inputs, mask = problem if size == "small" else large_problem
    seen = []
    for module in (routing_module, bidirectional_module):
        _recording_run_streams(monkeypatch, module, seen)
    o, cache = gma_np.gma_forward(**inputs, causal=causal, key_mask=mask)
    gma_np.gma_backward(np.ones_like(o), cache)
    gma_np.responsibilities(inputs["q"], inputs["means"], inputs["log_var"], inputs["logits"])
    assert seen, "no block loop ran: the test checks nothing"
    if size == "large":
        assert any(name.startswith("gma_np") for name, _ in seen), "no stream ran on a worker thread"
    assert all(n == 1 for _, counts in seen for n in counts), f"BLAS threads inside the streams: {seen}"
    assert all(n == 2 for n in _blas_threads()), f"after the op: {_blas_threads()}"


def test_an_op_that_raises_restores_blas_threads(blas_on_two, problem):
    inputs, _ = problem
    nothing_written = np.zeros((2, 37), dtype=bool)
    with pytest.raises(FloatingPointError):                # eps = 0 on an empty memory
        gma_np.gma(**inputs, eps=0.0, key_mask=nothing_written)
    assert all(n == 2 for n in _blas_threads()), f"after the failed op: {_blas_threads()}"


def test_the_block_loop_limit_finds_the_libraries_once(monkeypatch, problem):
    """The per-call limit reuses the controller of the first call: no library scan per op."""
    inputs, _ = problem
    gma_np.gma(**inputs)                                   # the controller exists from here on
    scans = []
    real = threadpoolctl.ThreadpoolController

    def counting():
        scans.append(1)
        return real()
    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", counting)
    o, cache = gma_np.gma_forward(**inputs)
    gma_np.gma_backward(np.ones_like(o), cache)
    assert scans == []


def _quiet(*_):
    pass


def test_train_uses_one_blas_thread_and_gives_the_callers_back(blas_on_two, tmp_path):
    during = []
    result = train(preset("test", steps=6), str(tmp_path / "run"), quiet=True, print_fn=_quiet,
                   on_step=lambda step: during.append(_blas_threads()))
    assert result.step == 6 and len(during) == 6
    assert all(n == 1 for counts in during for n in counts), f"BLAS threads during training: {during}"
    assert all(n == 2 for n in _blas_threads()), f"after train(): {_blas_threads()}"


def test_train_that_raises_gives_the_callers_back(blas_on_two, tmp_path, monkeypatch):
    real = loop_module.loss_and_grads

    def diverging(model, task, batch):
        loss, grads = real(model, task, batch)
        return float("nan"), grads
    monkeypatch.setattr(loop_module, "loss_and_grads", diverging)
    with pytest.raises(TrainingDiverged):
        train(preset("test", steps=6), str(tmp_path / "run"), quiet=True, print_fn=_quiet)
    assert all(n == 2 for n in _blas_threads()), f"after the failed train(): {_blas_threads()}"


def test_train_with_blas_threads_none_leaves_them_alone(blas_on_two, tmp_path):
    during = []
    train(preset("test", steps=2), str(tmp_path / "run"), quiet=True, print_fn=_quiet,
          blas_threads=None, on_step=lambda step: during.append(_blas_threads()))
    assert during and all(n == 2 for counts in during for n in counts), during


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), ("2", TypeError),
                                       (True, TypeError), (1.0, TypeError)],
                         ids=["zero", "negative", "str", "bool", "float"])
def test_blas_threads_rejects_what_is_not_a_thread_count(bad, error):
    with pytest.raises(error, match="blas_threads: expected an int >= 1 or None"):
        _threads.blas_threads(bad)


def test_openmp_wait_policy_is_for_numbas_pool_only(monkeypatch):
    """The quieting sets OMP_WAIT_POLICY only while Numba loads its threading layer, and a
    value the user set stands."""
    monkeypatch.setattr(_threads, "_QUIETED", [])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _threads._quiet_openmp_workers()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(_threads, "_QUIETED", [])
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _threads._quiet_openmp_workers()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_set_numba_threads_starts_a_quiet_pool():
    """numba.set_num_threads starts Numba's OpenMP pool; gma_np's set_numba_threads quiets
    it first, so its workers never spin (libgomp reports GOMP_SPINCOUNT 0, against 300,000
    for a pool that numba.set_num_threads starts alone). In a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    code = ("import numba; from gma_np._threads import set_numba_threads; set_numba_threads(2); "
            "print(numba.threading_layer())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    if run.stdout.strip() != "omp" or "GOMP_SPINCOUNT" not in run.stderr:
        pytest.skip(f"Numba's threading layer is {run.stdout.strip()!r}, not libgomp's OpenMP")
    assert "GOMP_SPINCOUNT = '0'" in run.stderr, run.stderr
