"""GMA's configuration matrix, built once: causal x norm x covariance x mask x temperature.

`gma-np check` (gma_np.selfcheck), the golden vectors (gma_np.vectors.cases) and the
tests (tests/test_mixing.py) run over these 32 points, in this order and under these
names, and compare gma_backward's gradients under the names of GRADIENT_NAMES.
"""

import itertools
from typing import NamedTuple

# The keys of gma_backward's dict, in the order of gma's arguments (definition, section 5).
GRADIENT_NAMES = ("q", "k", "v", "means", "log_var", "logits", "temperature")


class Configuration(NamedTuple):
    causal: bool        # prefix scan, or every query reads every key
    norm: str           # "row" or "slot" read-out
    covariance: str     # "diag" (H, K, d) or "spherical" (H, K) log-variances
    masked: bool        # a key padding mask, or none
    per_head: bool      # a temperature per head (H,), or one scalar

    @property
    def name(self):
        """Readable and unique, e.g. "causal-row-diag-mask-tauH"."""
        return (f"{'causal' if self.causal else 'bidir'}-{self.norm}-{self.covariance}-"
                f"{'mask' if self.masked else 'nomask'}-{'tauH' if self.per_head else 'tau'}")


def configurations():
    """The 32 Configurations, in a fixed order."""
    return [Configuration(*point) for point in
            itertools.product((False, True), ("row", "slot"), ("diag", "spherical"),
                              (False, True), (False, True))]
