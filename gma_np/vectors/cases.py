"""The case matrix of the golden vectors: configurations x numerical regimes.

Dimension legend: B batch, H heads, N tokens, d query/key size, e value size,
K mixture components.

A case is one configuration of GMA (bidirectional or causal, row or slot
read-out, diagonal or spherical covariance, with or without a key mask,
scalar or per-head temperature) in one regime:

    well       well-conditioned: unit-scale inputs, moderate variances, tau near 1
    collapsed  tiny variances (sigma ~ 0.1): responsibilities near 0/1, points
               drawn between pairs of means so that some rows are still mixed
    cold       low temperature (tau ~ 0.05): the softmax of l / tau is near one-hot
    spread     very spread inputs: q, k over tens of units, wide variances,
               v spanning six decades of magnitude
    long       long sequences (N ~ 4000): the float32 error of the memory sums
               grows with N unless they are accumulated in float64

Every input is drawn in float64 and rounded to the nearest float32, so that
the float32 inputs of a case are exactly its float64 inputs: a float32 port
and a float64 port compute the same function and are held to the same
expected values, each with its own tolerance (docs/vectors.md).
"""

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

from gma_np._numerics import DEFAULT_EPS
from gma_np.mixers.gma.configurations import Configuration, configurations

REGIMES = ("well", "collapsed", "cold", "spread", "long")

# (B, H, N, d, e, K): small odd sizes, so that a transposed axis cannot pass by accident.
SIZES = dict(B=2, H=3, N=29, d=5, e=4, K=7)
# The long regime: one batch, N a prime near 4000. float32 sums of N terms lose
# about sqrt(N) * 6e-8 relative, 64x more than at N = 1.
LONG_SIZES = dict(B=1, H=2, N=4093, d=4, e=4, K=6)
# The reduced matrix of `gma-np vectors export --quick` (and of the tests).
QUICK_LONG_SIZES = dict(B=1, H=2, N=1031, d=4, e=3, K=5)


@dataclass(frozen=True)
class Case:
    """One configuration of GMA in one regime, with its sizes."""
    regime: str            # one of REGIMES
    causal: bool           # query i reads keys j <= i only
    norm: str              # "row" or "slot"
    covariance: str        # "diag" (log_var (H, K, d)) or "spherical" (log_var (H, K))
    masked: bool           # a key mask with padding keys is passed
    per_head: bool         # temperature is an (H,) array, else a scalar
    B: int
    H: int
    N: int
    d: int
    e: int
    K: int
    eps: float = DEFAULT_EPS

    @property
    def name(self):
        """Readable and unique, e.g. "well-causal-row-diag-mask-tauH"."""
        point = Configuration(self.causal, self.norm, self.covariance, self.masked, self.per_head)
        return f"{self.regime}-{point.name}"

    @property
    def sizes(self):
        return dict(B=self.B, H=self.H, N=self.N, d=self.d, e=self.e, K=self.K)

    def config(self):
        """The JSON-able description written to the manifest."""
        return dict(regime=self.regime, causal=self.causal, norm=self.norm,
                    covariance=self.covariance, masked=self.masked,
                    temperature="per_head" if self.per_head else "scalar",
                    eps=self.eps, **self.sizes)


def default_matrix():
    """The matrix of `gma-np vectors export`: 32 + 3 x 8 + 3 = 59 cases.

    well: every configuration. collapsed, cold, spread: the 8 points of
    causal x norm x covariance, masks and per-head temperature alternating.
    long: causal row and slot at N = 4093, bidirectional row at N = 2039 (a
    second length, and the bundle stays under 20 MB).
    """
    cases = [Case("well", *point, **SIZES) for point in configurations()]
    for regime in ("collapsed", "cold", "spread"):
        grid = itertools.product((False, True), ("row", "slot"), ("diag", "spherical"))
        for i, (causal, norm, cov) in enumerate(grid):
            cases.append(Case(regime, causal, norm, cov, masked=i % 2 == 0,
                              per_head=(i // 2) % 2 == 0, **SIZES))
    cases += [Case("long", True, "row", "diag", False, False, **LONG_SIZES),
              Case("long", True, "slot", "spherical", True, True, **LONG_SIZES),
              Case("long", False, "row", "diag", True, False, **dict(LONG_SIZES, N=2039))]
    return cases


def quick_matrix():
    """A reduced matrix (9 cases, well under a second to export) for tests and a first look."""
    return [
        Case("well", False, "row", "diag", False, False, **SIZES),
        Case("well", True, "row", "diag", True, True, **SIZES),
        Case("well", False, "slot", "spherical", True, True, **SIZES),
        Case("well", True, "slot", "spherical", False, False, **SIZES),
        Case("collapsed", True, "row", "diag", True, False, **SIZES),
        Case("cold", False, "row", "spherical", False, True, **SIZES),
        Case("spread", True, "slot", "diag", True, True, **SIZES),
        Case("long", True, "row", "diag", False, False, **QUICK_LONG_SIZES),
        Case("long", True, "slot", "spherical", True, True, **QUICK_LONG_SIZES),
    ]


MATRICES = {"default": default_matrix, "quick": quick_matrix}


def case_rng(seed, case):
    """The generator of one case: depends on the bundle seed and the case name only,
    so adding a case to the matrix does not change the others."""
    return np.random.default_rng([seed, zlib.crc32(case.name.encode("ascii"))])


def _f32_exact(x):
    """x rounded to the nearest float32, returned as float64 (exactly representable)."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def draw_inputs(case, seed):
    """Inputs of one case: (inputs dict, key_mask (B, N) bool or None, cotangent do).

    inputs holds q, k (B, H, N, d), v (B, H, N, e), means (H, K, d), log_var
    ((H, K, d) or (H, K)), logits (H, K) and temperature (a 0-d array, or (H,)),
    all float64 and exactly representable in float32.
    """
    rng = case_rng(seed, case)
    B, H, N, d, e, K = case.B, case.H, case.N, case.d, case.e, case.K
    lv_shape = (H, K, d) if case.covariance == "diag" else (H, K)
    v = rng.standard_normal((B, H, N, e))
    logits = 0.5 * rng.standard_normal((H, K))
    if case.regime in ("well", "long"):
        means = rng.standard_normal((H, K, d))
        log_var = 0.3 * rng.standard_normal(lv_shape)
        q, k = rng.standard_normal((2, B, H, N, d))
        tau = rng.uniform(0.5, 1.5, H) if case.per_head else 0.8
    elif case.regime == "collapsed":
        means = 1.5 * rng.standard_normal((H, K, d))
        log_var = -4.5 + 0.2 * rng.standard_normal(lv_shape)          # sigma ~ 0.1
        # points on the segment between two random means, plus noise of about one sigma:
        # most rows collapse onto one component, those near the middle stay mixed
        a, b = rng.integers(0, K, (2, 2, B, H, N))
        t = rng.uniform(0.0, 1.0, (2, B, H, N, 1))
        h = np.arange(H)[None, None, :, None]
        q, k = (means[h, a] * (1 - t) + means[h, b] * t
                + 0.1 * rng.standard_normal((2, B, H, N, d)))
        tau = rng.uniform(0.8, 1.2, H) if case.per_head else 1.0
    elif case.regime == "cold":
        means = rng.standard_normal((H, K, d))
        log_var = 0.3 * rng.standard_normal(lv_shape)
        q, k = rng.standard_normal((2, B, H, N, d))
        tau = rng.uniform(0.03, 0.08, H) if case.per_head else 0.05
    elif case.regime == "spread":
        means = 4.0 * rng.standard_normal((H, K, d))
        log_var = rng.uniform(0.0, 4.0, lv_shape)                     # sigma from 1 to 7
        q, k = 12.0 * rng.standard_normal((2, B, H, N, d))
        v = v * 10.0 ** rng.uniform(-3.0, 3.0, (B, H, N, 1))
        tau = rng.uniform(0.5, 2.0, H) if case.per_head else 1.5
    else:
        raise ValueError(f"regime: expected one of {REGIMES}, got {case.regime!r}")
    mask = None
    if case.masked:
        mask = rng.random((B, N)) > 0.25
        mask[:, 0] = True                 # every sequence has a real first key
        mask[-1, -(N // 5):] = False      # and one ends in a block of padding
    inputs = dict(q=q, k=k, v=v, means=means, log_var=log_var, logits=logits,
                  temperature=np.asarray(tau, dtype=np.float64))
    inputs = {name: _f32_exact(x) for name, x in inputs.items()}
    do = _f32_exact(rng.standard_normal((B, H, N, e)))
    return inputs, mask, do
