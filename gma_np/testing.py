"""Check a port of GMA against the golden vectors, from the port's own test suite.

    import gma_np.testing
    gma_np.testing.assert_port_matches("path/to/bundle", my_gma, my_gma_backward)

The bundle is written by `gma-np vectors export DIR` (docs/vectors.md); the
port form of `forward` and `backward` is documented there and in
docs/port-guide.md. The same comparison runs from the command line as
`gma-np vectors check DIR --impl module:function --backward module:function`.

gma_np's own gma is already in the port form (`gma_np.gma`); its backward is
`reference_backward` below.
"""

from gma_np.mixers.gma.mixing import gma_backward, gma_forward
from gma_np.vectors.check import (BundleError, CheckReport, TensorResult, check_port,
                                  compare_tensor, load_case, read_manifest, verify_bundle)

__all__ = ["check_port", "assert_port_matches", "compare_tensor", "verify_bundle",
           "read_manifest", "load_case", "reference_backward",
           "BundleError", "CheckReport", "TensorResult"]


def assert_port_matches(directory, forward, backward=None, responsibilities=None,
                        dtypes=("float64",), cases=None):
    """Raise AssertionError, with the table of the failed tensors, unless the port passes.

    Arguments as gma_np.testing.check_port; returns the CheckReport when it passes.
    """
    report = check_port(directory, forward, backward, responsibilities, dtypes, cases)
    if not report.ok:
        raise AssertionError(f"the port fails {len(report.failures)} tensor checks of the "
                             f"bundle {directory!r}:\n" + report.format(failures_only=True))
    return report


def reference_backward(do, q, k, v, means, log_var, logits, *, causal=False, norm="row",
                       temperature=1.0, eps=1e-6, key_mask=None):
    """gma_np's own backward in the port form: gradients of sum(o * do), a dict keyed
    "q", "k", "v", "means", "log_var", "logits", "temperature"."""
    _, cache = gma_forward(q, k, v, means, log_var, logits, causal=causal, norm=norm,
                           temperature=temperature, eps=eps, key_mask=key_mask)
    return gma_backward(do, cache)
