"""Data-dependent initialisation of a GMA layer's mixture, so every component is used from step one.

Dimension legend: H heads, K components, d key head size, M keys sampled per head.

A mixture initialised at random (means ~ N(0, 1), unit variances) sits far from
the projected keys of a freshly initialised network (their entries are ~0.2):
nearly every key routes to the one component nearest the origin, and the others
receive (almost) no responsibility, hence (almost) no gradient. They are dead.

Instead, each head's mixture is fitted to the keys the layer actually sees on
the first training batch:

1. means: k-means++ seeding (Arthur and Vassilvitskii 2007) on up to
   KMEANS_MAX_POINTS keys, then KMEANS_ITERATIONS Lloyd steps so each mean
   moves to the centre of the keys it owns; a component left with no key is
   re-seeded at the key farthest from its mean.
2. variances: the within-cluster spread of the keys around their means, per
   dimension and pooled over components (diag), or its mean over dimensions
   (spherical), floored at VARIANCE_FLOOR_FRACTION of the keys' total variance.
3. logits: the log of the share of keys each component owns (so pi matches
   the data), and the temperature starts at 1.
4. softness: with d = 32 dimensions, keys differ from the means by tens of
   nats of log-density, so the routing would be one-hot (entropy ~0): the
   softmax Jacobian r (1 - r) vanishes and no gradient reaches the routing
   (measured: in a run without this step every head routed with entropy < 0.02
   nats and half the components were dead by step 200). So every variance of a
   head is multiplied by one factor s, found by bisection, that makes the mean
   routing entropy of the keys ROUTING_ENTROPY_TARGET * log K. Since the
   variances of a head start equal across components, scaling them by s acts
   exactly as a temperature s on the distance term.

tests/test_nn.py::test_no_dead_component_at_init checks that no component is dead
(responsibility share below DEAD_SHARE / K) after this initialisation.
"""

import numpy as np
from scipy.special import logsumexp

# Keys per head the k-means runs on: enough to place 32 components, cheap at init.
KMEANS_MAX_POINTS = 4096
# Lloyd iterations after the seeding: two or three move means to the mass.
KMEANS_ITERATIONS = 3
# Smallest variance, as a fraction of the keys' variance per dimension: a cluster
# of identical keys must not give a component of zero width (log_var = -inf).
VARIANCE_FLOOR_FRACTION = 1e-2
# A component is called dead when its share of the total responsibility over a
# batch (queries and keys) is below DEAD_SHARE / K, i.e. 1% of a uniform share.
DEAD_SHARE = 1e-2
# Mean routing entropy the variance scaling aims at, as a fraction of its maximum
# log K: soft enough that gradients reach every component, sharp enough to route.
ROUTING_ENTROPY_TARGET = 0.5
# Bisection steps on log s in [-LOG_SCALE_RANGE, LOG_SCALE_RANGE]: 40 halvings of a
# range of 2 * 20 leave an error of 4e-11 in log s, far below anything that matters.
BISECTION_STEPS = 40
LOG_SCALE_RANGE = 20.0


def _sq_dist(x, c):
    """Squared Euclidean distances (M, K) between points x (M, d) and centres c (K, d)."""
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1)


def kmeans_plus_plus(x, K, rng):
    """k-means++ seeding: the first centre uniformly, each next one with probability
    proportional to the squared distance to the nearest centre chosen so far. x (M, d) -> (K, d)."""
    M = x.shape[0]
    centres = [x[rng.integers(M)]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)                        # (M,)
    for _ in range(1, K):
        total = d2.sum()
        i = rng.integers(M) if total <= 0 else rng.choice(M, p=d2 / total)
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    return np.array(centres)


def fit_head(keys, K, rng, covariance="diag"):
    """Fit one head's mixture to keys (M, d) float64: (means (K, d), log_var (K, d) or (K,), logits (K,))."""
    M, d = keys.shape
    if M > KMEANS_MAX_POINTS:
        keys = keys[rng.choice(M, KMEANS_MAX_POINTS, replace=False)]
    means = kmeans_plus_plus(keys, K, rng)                          # (K, d)
    for it in range(KMEANS_ITERATIONS + 1):
        dist = _sq_dist(keys, means)                                # (M, K)
        owner = dist.argmin(axis=1)                                 # (M,)
        counts = np.bincount(owner, minlength=K)                    # (K,)
        for k in np.flatnonzero(counts == 0):
            far = dist[np.arange(len(keys)), owner].argmax()        # worst-served key
            means[k] = keys[far]
            owner[far] = k
            dist[far] = 0.0
        counts = np.bincount(owner, minlength=K)
        if it < KMEANS_ITERATIONS:                                  # the last pass only assigns
            sums = np.zeros_like(means)
            np.add.at(sums, owner, keys)
            means = sums / counts[:, None]
    resid = keys - means[owner]                                     # (M, d)
    floor = VARIANCE_FLOOR_FRACTION * keys.var(axis=0).mean()
    var = np.maximum((resid ** 2).mean(axis=0), floor)              # (d,) within-cluster, pooled
    if covariance == "diag":
        log_var = np.broadcast_to(np.log(var), (K, d)).copy()
    else:
        log_var = np.full(K, np.log(var.mean()))
    logits = np.log(np.maximum(counts, 1) / counts.sum())
    log_var = log_var + _entropy_scale(keys, means, log_var, logits)
    return means, log_var, logits


def _entropy_scale(keys, means, log_var, logits):
    """log s such that scaling every variance by s gives mean routing entropy
    ROUTING_ENTROPY_TARGET * log K over the keys (the entropy grows with s: bisection).

    All components of the head share their variances at this point (pooled in
    fit_head), so with q_k(x) = sum_j (x_j - mu_kj)^2 / sigma2_j the log-density
    under variances s sigma2 is log pi_k - q_k(x) / (2 s) plus terms equal for
    every k, which the softmax of the responsibilities ignores: q is computed
    once and each bisection step is a softmax of (M, K) numbers.
    """
    var = np.exp(log_var if log_var.ndim == 2 else log_var[:, None])    # (K, d) or (K, 1)
    q = (((keys[:, None, :] - means[None, :, :]) ** 2) / var[None]).sum(axis=-1)   # (M, K)
    log_pi = logits - logsumexp(logits)                                  # (K,)
    target = ROUTING_ENTROPY_TARGET * np.log(means.shape[0])

    def entropy(log_s):
        a = log_pi - 0.5 * q * np.exp(-log_s)                            # (M, K)
        log_r = a - logsumexp(a, axis=1, keepdims=True)
        return float(-(np.exp(log_r) * log_r).sum(axis=1).mean())

    lo, hi = -LOG_SCALE_RANGE, LOG_SCALE_RANGE
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if entropy(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_mixture(keys, K, rng, covariance="diag"):
    """Fit every head to its keys (B, H, N, d): (means (H, K, d), log_var, logits (H, K))."""
    B, H, N, d = keys.shape
    out = [fit_head(keys[:, h].reshape(-1, d).astype(np.float64), K, rng, covariance)
           for h in range(H)]
    return tuple(np.stack(parts) for parts in zip(*out))


def component_shares(r):
    """Share of the total responsibility each component receives: r (..., H, N, K) -> (H, K)."""
    H, K = r.shape[-3], r.shape[-1]
    mass = r.reshape(-1, H, r.shape[-2], K).sum(axis=(0, 2))        # (H, K)
    return mass / mass.sum(axis=-1, keepdims=True)
