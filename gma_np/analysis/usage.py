"""Component usage: how the routing mass of a head spreads over its K components.

Dimension legend: T tokens (any leading axes are flattened into T), K components.

For responsibilities r (T, K) whose rows sum to 1 (docs/analysis.md, "Usage"):

    usage u_k = (1/T) sum_t r_tk                the routing mass of component k; sum_k u_k = 1
    H(u) = -sum_k u_k log u_k                   entropy of the average usage, nats, in [0, log K]
    exp(H(u))                                   effective number of components, in [1, K]
    (1/T) sum_t H(r_t)                          mean per-token responsibility entropy
    dead: u_k < DEAD_SHARE / K                  components that (almost) nothing routes to

Broad usage with confident routing, the paper's picture, is exp(H(u)) near K with a
token entropy well below log K: every component is used, each token mostly by one.
Entropies use 0 log 0 = 0 (scipy.special.entr).
"""

import numpy as np
from scipy.special import entr

# A component is dead when its share of the routing mass is below 1% of the uniform
# share 1/K: it then receives about 1% of the gradient a uniformly used component
# gets, and its slot holds almost nothing, so it has effectively left the mixture.
DEAD_SHARE = 0.01


def _rows(r, name="r"):
    r = np.asarray(r, dtype=np.float64)
    if r.ndim < 1 or r.shape[-1] < 1:
        raise ValueError(f"{name}: expected responsibilities of shape (..., K), got {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError(f"{name}: expected finite, non-negative responsibilities")
    return r.reshape(-1, r.shape[-1])                              # (T, K)


def entropy(p, axis=-1):
    """Shannon entropy in nats of the distributions along `axis` (0 log 0 = 0)."""
    return entr(np.asarray(p, dtype=np.float64)).sum(axis=axis)


def component_usage(r):
    """u (K,): the mean responsibility of each component over all tokens of r (..., K)."""
    r = _rows(r)
    if r.shape[0] == 0:
        raise ValueError("r: expected at least one token")
    return r.mean(axis=0)


def effective_components(u):
    """exp(H(u)) of a usage vector u (K,): K for uniform usage, 1 for a single component."""
    u = np.asarray(u, dtype=np.float64)
    return float(np.exp(entropy(u / u.sum())))


def token_entropy(r):
    """H(r_t) (T,) of every token's responsibilities, r (..., K) flattened to (T, K)."""
    return entropy(_rows(r))


def dead_components(u, share=DEAD_SHARE):
    """Indices of the components whose usage is below share / K (module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    return np.flatnonzero(u < share / u.size)


def usage_stats(r, share=DEAD_SHARE):
    """The usage statistics of one head's responsibilities r (..., K), as a dict:

        usage (K,), usage_entropy, effective_components, token_entropy (mean),
        token_entropy_max (= log K), dead (indices), n_dead
    """
    u = component_usage(r)
    dead = dead_components(u, share)
    return {"usage": u, "usage_entropy": float(entropy(u)),
            "effective_components": effective_components(u),
            "token_entropy": float(token_entropy(r).mean()),
            "token_entropy_max": float(np.log(u.size)), "dead": dead, "n_dead": int(dead.size)}
