"""Why gma_np computes (x - mu)^2 directly and not by the matmul expansion.

Dimension legend: N points, K components, d feature size.

The quadratic term of the log-density, q_k(x) = sum_j (x_j - mu_kj)^2 / sigma2_kj,
can be computed

    direct:     sum_j (x_j - mu_kj)^2 * inv_var_kj                       (what gma_np does)
    expansion:  (x*x) @ inv_var^T - 2 x @ (mu*inv_var)^T + sum_j mu_kj^2 inv_var_kj

The expansion is one matmul, but it subtracts terms of size |x|^2 / sigma2 to
get a result of size |x - mu|^2 / sigma2. Here the components overlap (means
offset + 0.7 N(0, 1) per coordinate, so responsibilities are genuinely mixed),
the points are drawn from them (|x - mu| ~ sigma), and the whole mixture sits
`offset` away from the origin. Both forms run in float32 NumPy; the reference is the direct form
in float64 on the same float32 values. The last column is
gma_np.responsibilities on the float32 input (direct form, float64 accumulators).

Printed per offset: the worst relative error of q_k(x) over all (point,
component) pairs, and the worst absolute error of a responsibility r_k(x).

    python benchmarks/expansion_cancellation.py
"""

import argparse

import numpy as np
from scipy.special import logsumexp

import gma_np

LOG_2PI = np.log(2 * np.pi)


def quad_direct(x, mu, inv_var):
    """(N, K): sum_j (x - mu)^2 * inv_var, in the dtype of the inputs."""
    diff = x[:, None, :] - mu[None, :, :]                          # (N, K, d)
    return (diff * diff * inv_var[None]).sum(-1)


def quad_expansion(x, mu, inv_var):
    """(N, K): x^2 @ inv_var^T - 2 x @ (mu inv_var)^T + sum mu^2 inv_var, in the inputs' dtype."""
    return (x * x) @ inv_var.T - 2 * x @ (mu * inv_var).T + (mu * mu * inv_var).sum(-1)[None, :]


def responsibilities_from_quad(quad, log_var, log_pi):
    """r (N, K) = softmax_k(log pi_k - 1/2 (quad + sum log_var + d log 2pi)), float64 softmax."""
    d = log_var.shape[1]
    l = log_pi[None, :] - 0.5 * (quad.astype(np.float64) + log_var.sum(-1)[None, :] + d * LOG_2PI)
    return np.exp(l - logsumexp(l, axis=-1, keepdims=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=2000)
    parser.add_argument("--K", type=int, default=8)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    f32 = np.float32
    print(f"float32 quadratic term and responsibilities, N={a.N} K={a.K} d={a.d}; "
          f"means = offset + 0.7 N(0,1) per coordinate (overlapping), points drawn from them")
    print(f"{'offset':>7} | {'quad rel err':>12} {'r abs err':>10} (direct f32) | "
          f"{'quad rel err':>12} {'r abs err':>10} (expansion f32) | {'r abs err':>10} (gma_np f32)")
    for offset in (0.0, 10.0, 100.0, 1000.0):
        mu = (offset + 0.7 * rng.standard_normal((a.K, a.d))).astype(f32)      # (K, d)
        log_var = (0.3 * rng.standard_normal((a.K, a.d))).astype(f32)          # (K, d)
        inv_var = np.exp(-log_var.astype(np.float64)).astype(f32)             # (K, d)
        log_pi = np.full(a.K, -np.log(a.K))                                    # (K,)
        comp = rng.integers(0, a.K, a.N)
        x = (mu[comp] + np.exp(0.5 * log_var[comp]) * rng.standard_normal((a.N, a.d))).astype(f32)

        ref_q = quad_direct(x.astype(np.float64), mu.astype(np.float64), inv_var.astype(np.float64))
        ref_r = responsibilities_from_quad(ref_q, log_var.astype(np.float64), log_pi)
        cols = []
        for form in (quad_direct, quad_expansion):
            qf = form(x, mu, inv_var)                                          # float32
            rel = np.abs(qf - ref_q) / ref_q
            r = responsibilities_from_quad(qf, log_var.astype(np.float64), log_pi)
            cols += [rel.max(), np.abs(r - ref_r).max()]
        # gma_np itself: the same float32 values, one head; inv_var is exp(-log_var) there
        r_pkg = gma_np.responsibilities(x[None, :, :], mu[None], log_var[None],
                                        np.zeros((1, a.K), dtype=f32))[0]      # (N, K) float32
        ref_pkg = responsibilities_from_quad(
            quad_direct(x.astype(np.float64), mu.astype(np.float64),
                        np.exp(-log_var.astype(np.float64))), log_var.astype(np.float64), log_pi)
        cols.append(np.abs(r_pkg - ref_pkg).max())
        print(f"{offset:>7g} | {cols[0]:>12.2e} {cols[1]:>10.2e}              | "
              f"{cols[2]:>12.2e} {cols[3]:>10.2e}                 | {cols[4]:>10.2e}")


if __name__ == "__main__":
    main()
