"""Accuracy of the temperature gradient of the responsibilities, in float64, as routing collapses.

Dimension legend: H heads, N points, K components, d feature size.

    dtau = -sum_{n,k} da_nk a_nk / tau = -sum_{n,k} da_nk log r_nk / tau

(equal in exact arithmetic because sum_k da_nk = 0; docs/derivations.md,
section 2). The log r form is the reference here: log r has its row maximum
at 0, so the rounding residue of sum_k da_nk multiplies nothing large. The
a form multiplies it by the common part of a (|l| / tau, up to 1e5 and more
when points are far from a tight mixture). gma_np takes the row maximum of l
out instead, dtau = -sum_{n,k} dl_nk (l_nk - max_k l_nk) / tau: it computes
sum dl * l from the by-products of its log-density backward GEMMs,
sum_k const_k sum_n dl_nk - sum_{k,j} dquad_kj, and subtracts
sum_n max_k l_nk * sum_k dl_nk over the dl values as stored.

The last column runs gma_np on the same problem in float32 (x, the mixture
and dr rounded to float32; the reference recomputed on those values upcast):
gma_np computes in float64 either way, but it stores r and dl in the dtype of
the points, so the rounding residue of sum_k dl_nk is a float32 one. The
column after it shows what the log r form would give with r and dl rounded
to float32 the same way (an emulation, not gma_np).

Problems: H=1, N=200, K=8, d=16, unit variances, means s N(0, 1) (a tight
mixture for small s), points N(0, 1) + offset. Printed per regime: mean |l|,
mean of max_k r (1.00: collapsed), dtau by the log r form, and the error of
gma_np's dtau and of the direct a-form sum, relative to |dtau| and to the
size of the terms, sum |da log r| / tau.

    python benchmarks/temperature_gradient.py
"""

import numpy as np
from scipy.special import logsumexp

import gma_np
from gma_np.mixers.gma.reference.routing import log_density_naive

H, N, K, d = 1, 200, 8, 16
REGIMES = [  # (means spread s, offset of the points, tau)
    (1.0, 0.0, 1.0), (1.0, 10.0, 1.0), (0.2, 10.0, 0.3),
    (0.05, 30.0, 1.0), (0.05, 100.0, 1.0), (0.01, 300.0, 1.0), (0.05, 30.0, 0.1),
]


def forms(x, means, log_var, logits, tau, dr):
    """(dtau by log r, dtau by a, sum |da log r| / tau, dtau by log r with r and dl
    rounded to float32 as gma_np stores them for float32 points), by broadcasting."""
    a = log_density_naive(x, means, log_var, logits) / tau         # (H, N, K)
    log_r = a - logsumexp(a, axis=-1, keepdims=True)
    r = np.exp(log_r)
    da = r * (dr - (r * dr).sum(-1, keepdims=True))                # (H, N, K)
    r32 = r.astype(np.float32).astype(np.float64)
    dl32 = (r32 * (dr - (r32 * dr).sum(-1, keepdims=True)) / tau).astype(np.float32)
    return (-(da * log_r).sum() / tau, -(da * a).sum() / tau, np.abs(da * log_r).sum() / tau,
            -(dl32.astype(np.float64) * log_r).sum())


def main():
    rng = np.random.default_rng(0)
    print(f"dtau of responsibilities, errors against the log r form in float64; H={H} N={N} K={K} d={d}")
    print(f"{'s':>5} {'offset':>6} {'tau':>4} {'mean |l|':>9} {'max r':>6} {'dtau (log r)':>13} "
          f"{'gma_np/|dtau|':>13} {'gma_np/terms':>12} {'a-form/|dtau|':>13} {'a-form/terms':>12} "
          f"{'gma_np f32/|dtau|':>17} {'log r, f32 dl/|dtau|':>20}")
    for s, offset, tau in REGIMES:
        means = s * rng.standard_normal((H, K, d))                 # (H, K, d)
        log_var, logits = np.zeros((H, K, d)), np.zeros((H, K))
        x = rng.standard_normal((H, N, d)) + offset                # (H, N, d)
        dr = rng.standard_normal((H, N, K))
        r, cache = gma_np.responsibilities_forward(x, means, log_var, logits, tau)
        got = gma_np.responsibilities_backward(dr, cache)["temperature"]
        ref, a_form, terms, _ = forms(x, means, log_var, logits, tau, dr)
        l_mean = np.abs(log_density_naive(x, means, log_var, logits)).mean()
        # the same problem in float32
        f32 = [a.astype(np.float32) for a in (x, means, log_var, logits, dr)]
        r32, cache32 = gma_np.responsibilities_forward(*f32[:4], tau)
        got32 = gma_np.responsibilities_backward(f32[4], cache32)["temperature"]
        ref32, _, _, log_r32 = forms(*[a.astype(np.float64) for a in f32[:4]], tau,
                                     f32[4].astype(np.float64))
        print(f"{s:>5g} {offset:>6g} {tau:>4g} {l_mean:>9.0f} {r.max(-1).mean():>6.2f} {ref:>13.4e} "
              f"{abs(got - ref) / abs(ref):>13.1e} {abs(got - ref) / terms:>12.1e} "
              f"{abs(a_form - ref) / abs(ref):>13.1e} {abs(a_form - ref) / terms:>12.1e} "
              f"{abs(got32 - ref32) / abs(ref32):>17.1e} {abs(log_r32 - ref32) / abs(ref32):>20.1e}")


if __name__ == "__main__":
    main()
