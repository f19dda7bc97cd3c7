"""gma_np.testing: the comparison a port calls from its own test suite, and the PyTorch worked example."""

import numpy as np
import pytest

import gma_np
from gma_np.testing import (assert_port_matches, check_port, compare_tensor, reference_backward,
                            verify_bundle)
from gma_np.vectors.check import resolve
from gma_np.vectors.cases import quick_matrix
from gma_np.vectors.export import export_bundle
from tests import port_example


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A custom 4-case bundle: the first four "well" cases of the quick matrix, seed 3."""
    directory = str(tmp_path_factory.mktemp("bundle"))
    export_bundle(directory, quick_matrix()[:4], seed=3)
    return directory


def test_compare_tensor_statistics():
    expected = np.array([[1.0, -2.0], [4.0, 0.5]])
    got = expected.copy()
    got[1, 0] += 4e-3                                  # 1e-3 relative on the largest element
    row = compare_tensor(got, expected, tol=2e-3, tensor="o")
    assert row.ok and row.error == ""
    assert row.max_abs == pytest.approx(4e-3)
    assert row.err_scale == pytest.approx(1e-3)        # max abs error / max |expected|
    assert row.max_rel == pytest.approx(1e-3)
    rms = lambda x: np.sqrt(np.mean(x ** 2))          # noqa: E731
    assert row.rms_ratio == pytest.approx(rms(got) / rms(expected))
    assert not compare_tensor(got, expected, tol=5e-4).ok


def test_compare_tensor_rejects_shape_and_non_finite():
    expected = np.ones((3, 2))
    row = compare_tensor(np.ones((2, 3)), expected, tol=1.0, tensor="dq")
    assert not row.ok and "shape (2, 3), expected (3, 2)" in row.error
    bad = expected.copy()
    bad[0, 0] = np.nan
    row = compare_tensor(bad, expected, tol=1.0)
    assert not row.ok and "1 non-finite" in row.error


def test_assert_port_matches_passes_and_fails(bundle):
    report = assert_port_matches(bundle, gma_np.gma, reference_backward, dtypes=("float64", "float32"))
    assert report.ok and len(report.rows) == 4 * 2 * 8

    def wrong_scale(*args, **kwargs):
        return 1.001 * gma_np.gma(*args, **kwargs)
    with pytest.raises(AssertionError, match=r"(?s)well-bidir-row-diag-nomask-tau\s+float64 o"):
        assert_port_matches(bundle, wrong_scale)


def test_a_port_that_raises_or_returns_junk_is_a_failure_not_a_crash(bundle):
    def broken(*args, **kwargs):
        raise RuntimeError("not implemented yet")

    def no_dict(do, *args, **kwargs):
        return [1, 2, 3]
    report = check_port(bundle, broken, no_dict, cases="well-bidir-row")
    assert not report.ok
    assert all("RuntimeError: not implemented yet" in r.error for r in report.rows if r.tensor == "o")
    assert all("expected a dict" in r.error for r in report.rows if r.tensor.startswith("d"))


def test_missing_gradient_key_is_named(bundle):
    def backward(do, *args, **kwargs):
        grads = reference_backward(do, *args, **kwargs)
        del grads["temperature"]
        return grads
    report = check_port(bundle, gma_np.gma, backward, cases="well-bidir-row")
    assert [(r.tensor, r.error) for r in report.failures] == [
        ("dtemperature", "key 'temperature' missing from the dict")]


def test_bad_arguments_are_named(bundle):
    with pytest.raises(TypeError, match="forward: expected a callable"):
        check_port(bundle, "gma_np:gma")
    with pytest.raises(ValueError, match="dtypes: expected a subset"):
        check_port(bundle, gma_np.gma, dtypes=("float16",))
    with pytest.raises(ValueError, match="cases: 'nothing' selects none"):
        check_port(bundle, gma_np.gma, cases="nothing")
    with pytest.raises(ValueError, match="--impl: expected 'module:function'"):
        resolve("gma_np.gma")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        resolve("gma_np:nope")


def test_resolve_a_file_path(tmp_path):
    path = tmp_path / "myport.py"
    path.write_text("def gma(*a, **k):\n    return 42\n")
    assert resolve(f"{path}:gma")() == 42


def test_reference_backward_is_gma_backward():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 2, 5, 3))
    v = rng.standard_normal((1, 2, 5, 2))
    mix = (rng.standard_normal((2, 3, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    do = rng.standard_normal(v.shape)
    got = reference_backward(do, q, k, v, *mix, causal=True, norm="slot")
    want = gma_np.gma_backward(do, gma_np.gma_forward(q, k, v, *mix, causal=True, norm="slot")[1])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_verify_bundle_returns_the_manifest(bundle):
    manifest = verify_bundle(bundle)
    assert manifest["seed"] == 3 and manifest["matrix"] == "custom" and len(manifest["cases"]) == 4


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pytorch_port_passes(bundle, dtype):
    """The worked example of docs/port-guide.md: a PyTorch port with autograd gradients."""
    pytest.importorskip("torch")
    from tests import port_torch
    report = check_port(bundle, port_torch.gma, port_torch.gma_backward,
                        port_torch.responsibilities, dtypes=(dtype,))
    assert report.ok, report.format(failures_only=True)


def test_numpy_port_checks_step_by_step(bundle):
    """The order of the port guide: routing first, then the output, then gradients."""
    report = check_port(bundle, port_example.gma, responsibilities=port_example.responsibilities)
    assert report.ok and {r.tensor for r in report.rows} == {"r_q", "r_k", "o"}


def test_export_refuses_a_bad_matrix(tmp_path):
    with pytest.raises(ValueError, match="matrix: expected one of"):
        export_bundle(str(tmp_path), "huge")
    with pytest.raises(ValueError, match="two cases have the same name"):
        export_bundle(str(tmp_path), quick_matrix()[:1] * 2)
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        export_bundle(str(tmp_path), "quick", seed=-1)
