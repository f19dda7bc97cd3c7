"""gma_np.gradcheck passes right gradients and flags wrong ones, naming the element."""

import numpy as np
import pytest

import gma_np
from tests.conftest import make_problem

OPTS = dict(causal=True, norm="row")


def fun(**a):
    return gma_np.gma(**a, **OPTS)


def grad(dout, **a):
    return gma_np.gma_backward(dout, gma_np.gma_forward(**a, **OPTS)[1])


@pytest.fixture(scope="module")
def problem():
    inputs, mask = make_problem(np.random.default_rng(5), B=1, H=2, N=6, d=3, e=2, K=3, per_head=True)
    return inputs


def corrupted(name, index, factor):
    """grad with one element of d<name> multiplied by `factor`."""
    def wrong(dout, **a):
        g = grad(dout, **a)
        g[name] = np.array(g[name], dtype=np.float64)
        g[name][index] *= factor
        return g
    return wrong


@pytest.mark.parametrize("name", ["q", "k", "v", "means", "log_var", "logits", "temperature"])
def test_flags_a_single_element_wrong_by_1e_4(problem, name):
    """Corrupt the largest element of one gradient by 1e-4 relative: the report fails on that input,
    names that element, and passes every other input."""
    g = np.asarray(grad(np.random.default_rng(0).standard_normal(fun(**problem).shape), **problem)[name])
    index = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    report = gma_np.gradcheck(fun, corrupted(name, index, 1 + 1e-4), problem, mode="full")
    assert not report.ok
    assert not report[name].ok
    assert report[name].worst_index == tuple(int(i) for i in index)
    assert 0.5e-4 < report[name].rel_error < 2e-4
    assert all(c.ok for c in report.inputs if c.name != name), str(report)
    assert name in str(report) and "FAIL" in str(report)


def test_flags_a_small_element_too(problem):
    """An element a hundred times smaller than the largest one, wrong by 1e-4, is still caught."""
    g = np.asarray(grad(np.random.default_rng(0).standard_normal(fun(**problem).shape), **problem)["v"])
    mags = np.abs(g).ravel()
    target = np.argmin(np.abs(mags - mags.max() / 100))
    index = np.unravel_index(target, g.shape)
    report = gma_np.gradcheck(fun, corrupted("v", index, 1 + 1e-4), problem, mode="full")
    assert not report["v"].ok and report["v"].worst_index == tuple(int(i) for i in index)


def test_passes_right_gradients_in_every_mode(problem):
    for mode in ("full", "random", "auto"):
        report = gma_np.gradcheck(fun, grad, problem, mode=mode)
        assert report.ok, report
        assert {c.name for c in report.inputs} == set(problem)
        assert max(c.rel_error for c in report.inputs) <= 1e-6


def test_random_mode_flags_a_wrong_tensor(problem):
    report = gma_np.gradcheck(fun, corrupted("means", (slice(None),), 1 + 1e-4), problem, mode="random")
    assert not report["means"].ok and report["q"].ok


def test_simple_function_and_wrt():
    """A hand-written pair outside GMA: f(x, y) = x^3 * y elementwise."""
    x, y = np.linspace(-1, 2, 5), np.linspace(0.5, 1.5, 5)
    report = gma_np.gradcheck(lambda x, y, flag: x ** 3 * y,
                              lambda do, x, y, flag: {"x": 3 * x ** 2 * y * do, "y": x ** 3 * do},
                              {"x": x, "y": y, "flag": True}, wrt=["x"])
    assert report.ok and [c.name for c in report.inputs] == ["x"]


def test_gradcheck_reports_misuse():
    with pytest.raises(ValueError, match="gradient of 'x' has shape"):
        gma_np.gradcheck(lambda x: x * 2, lambda do, x: {"x": do[:2]}, {"x": np.ones(3)})
    with pytest.raises(ValueError, match="returned no gradient for 'y'"):
        gma_np.gradcheck(lambda x, y: x * y, lambda do, x, y: {"x": do * y}, {"x": np.ones(3), "y": np.ones(3)},
                         wrt=["x", "y"])
    with pytest.raises(ValueError, match="mode"):
        gma_np.gradcheck(lambda x: x, lambda do, x: {"x": do}, {"x": np.ones(2)}, mode="fast")
