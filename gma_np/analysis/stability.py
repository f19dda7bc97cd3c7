"""Routing stability: the Jacobian of r(x) with respect to x, its bounds, and the measured
sensitivity to perturbations of growing size.

Dimension legend: T points (queries or keys of one head), K components, d head size.

With l_k(x) = log pi_k - 1/2 sum_j (x_j - mu_kj)^2 / sigma2_kj + const and
r = softmax(l / tau), the gradient of l_k is g_k(x) = -(x - mu_k) / sigma2_k and

    dr_k/dx = (1/tau) r_k (g_k - gbar),   gbar = sum_j r_j g_j
    J = (1/tau) (diag(r) - r r^T) G        G (K, d) the rows g_k; J (K, d)

For any unit direction u, with a_k = g_k . u (docs/analysis.md, "Routing stability"):

    ||J u||_1 = (1/tau) sum_k r_k |a_k - abar|
             <= (1/tau) sqrt( sum_k r_k ||g_k - gbar||^2 )      =: local(x)    (Jensen, Cauchy-Schwarz)
             <= (1/tau) max_k ||(x - mu_k) / sigma2_k||                         (variance <= 2nd moment)
             <= (1/tau) max_k ||x - mu_k|| * max_{k,j} 1 / sigma2_kj  =: global(x)

and ||J||_2 <= ||J||_{2->1} <= local(x). local(x) -> 0 where routing is confident
(r one-hot): small variances and a low temperature make routing *sharper*, which is
stable inside a component's region and maximally sensitive on its boundary, where the
Jacobian grows as 1/tau. Integrating along x + t delta, a perturbation delta moves r by

    ||r(x + delta) - r(x)||_1 <= min( 2, (||delta|| / tau) (max_k ||(x - mu_k) / sigma2_k||
                                                            + ||delta|| max_{k,j} 1/sigma2_kj) )

The routing itself is gma_np.responsibilities (the engine), in float64.
"""

import numpy as np

from gma_np import responsibilities

# Perturbation sizes, as fractions of the RMS norm of the points: from far below the
# scale of the mixture (the linear regime, where ||delta r|| ~ ||J delta||) to the size
# of the points themselves (where the bound's min(2, .) saturates).
PERTURBATION_FRACTIONS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# Multipliers of the head's temperature for the temperature sweep.
TEMPERATURE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
# Perturbation fraction the temperature sweep measures sensitivity at: in the linear
# regime for a trained tiny model, large enough to be far above rounding.
SWEEP_FRACTION = 0.01


def _mixture(means, log_var, logits):
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2:
        raise ValueError(f"means: expected one head's means (K, d), got shape {means.shape}")
    K, d = means.shape
    log_var = np.asarray(log_var, dtype=np.float64)
    if log_var.shape not in ((K, d), (K,)):
        raise ValueError(f"log_var: expected shape ({K}, {d}) or ({K},), got {log_var.shape}")
    inv_var = np.broadcast_to(np.exp(-(log_var if log_var.ndim == 2 else log_var[:, None])),
                              (K, d))
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (K,):
        raise ValueError(f"logits: expected shape ({K},), got {logits.shape}")
    return means, log_var, logits, inv_var


def _points(x, d):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x: expected points of shape (T, {d}), got {x.shape}")
    return x


def _tau(temperature):
    tau = float(temperature)
    if not tau > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    return tau


def route(x, means, log_var, logits, temperature):
    """r (T, K) of one head's points x (T, d), through gma_np.responsibilities."""
    means, log_var, logits, _ = _mixture(means, log_var, logits)
    x = _points(x, means.shape[1])
    return responsibilities(x[None], means[None], log_var[None], logits[None],
                            _tau(temperature))[0]


def log_density_gradients(x, means, log_var):
    """G (T, K, d): g_k(x) = d l_k / dx = -(x - mu_k) / sigma2_k."""
    K = np.shape(means)[0]
    means, _, _, inv_var = _mixture(means, log_var, np.zeros(K))
    x = _points(x, means.shape[1])
    return -(x[:, None, :] - means[None]) * inv_var[None]


def jacobian(x, means, log_var, logits, temperature):
    """(r (T, K), J (T, K, d)): J[t, k, j] = d r_k(x_t) / d x_tj (module docstring)."""
    tau = _tau(temperature)
    r = route(x, means, log_var, logits, tau)
    G = log_density_gradients(x, means, log_var)                   # (T, K, d)
    gbar = np.einsum("tk,tkd->td", r, G)                           # (T, d)
    return r, r[:, :, None] * (G - gbar[:, None, :]) / tau


def jacobian_bounds(x, means, log_var, logits, temperature):
    """Per point (T,) each: the measured ||J||_2 and the three bounds of the module
    docstring, as a dict: spectral, local, max_gradient, global."""
    tau = _tau(temperature)
    means_, _, _, inv_var = _mixture(means, log_var, logits)
    r, J = jacobian(x, means, log_var, logits, tau)
    G = log_density_gradients(x, means, log_var)
    gbar = np.einsum("tk,tkd->td", r, G)
    spread = np.einsum("tk,tk->t", r, ((G - gbar[:, None, :]) ** 2).sum(-1))
    dist = np.linalg.norm(_points(x, means_.shape[1])[:, None, :] - means_[None], axis=-1)
    return {"spectral": np.linalg.norm(J, ord=2, axis=(1, 2)),
            "local": np.sqrt(spread) / tau,
            "max_gradient": np.linalg.norm(G, axis=-1).max(axis=1) / tau,
            "global": dist.max(axis=1) * inv_var.max() / tau}


def perturbation_bound(x, means, log_var, size, temperature):
    """(T,): the bound on ||r(x + delta) - r(x)||_1 over all ||delta|| = size."""
    tau = _tau(temperature)
    G = log_density_gradients(x, means, log_var)
    inv_max = _mixture(means, log_var, np.zeros(np.shape(means)[0]))[3].max()
    reach = np.linalg.norm(G, axis=-1).max(axis=1) + size * inv_max
    return np.minimum(2.0, size / tau * reach)


def perturbation_sensitivity(x, means, log_var, logits, temperature, sizes, rng):
    """The measured movement of r under random perturbations of each size, a dict of
    arrays (len(sizes),): mean and max of ||r(x + s u) - r(x)||_1 over the points (u a
    uniformly random unit direction per point), the share of points whose argmax
    component changes, the mean bound, and the share of points above their bound."""
    tau = _tau(temperature)
    x = _points(x, np.shape(means)[1])
    r0 = route(x, means, log_var, logits, tau)
    out = {k: [] for k in ("mean", "max", "flips", "bound", "violations")}
    for s in sizes:
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        r1 = route(x + s * u, means, log_var, logits, tau)
        moved = np.abs(r1 - r0).sum(axis=1)                        # (T,)
        bound = perturbation_bound(x, means, log_var, s, tau)
        out["mean"].append(moved.mean())
        out["max"].append(moved.max())
        out["flips"].append((r1.argmax(1) != r0.argmax(1)).mean())
        out["bound"].append(bound.mean())
        # a relative 1e-9 (and 1e-12 absolute) for rounding: the bound is exact arithmetic
        out["violations"].append((moved > bound * (1 + 1e-9) + 1e-12).mean())
    return {k: np.array(v) for k, v in out.items()}


def temperature_sweep(x, means, log_var, logits, temperature, rng,
                      factors=TEMPERATURE_FACTORS, fraction=SWEEP_FRACTION):
    """How the Jacobian, its bounds and the sensitivity move with the temperature: for
    tau' = factor * temperature, a dict of arrays (len(factors),): tau, spectral (mean
    ||J||_2), local, global (mean bounds), entropy (mean token entropy), sensitivity
    (mean ||delta r||_1 / size at size = fraction * RMS norm of x), flips."""
    x = _points(x, np.shape(means)[1])
    size = fraction * np.sqrt((x ** 2).sum(axis=1).mean())
    out = {k: [] for k in ("tau", "spectral", "local", "global", "entropy", "sensitivity",
                           "flips")}
    for f in factors:
        tau = f * _tau(temperature)
        b = jacobian_bounds(x, means, log_var, logits, tau)
        r = route(x, means, log_var, logits, tau)
        sens = perturbation_sensitivity(x, means, log_var, logits, tau, [size], rng)
        out["tau"].append(tau)
        out["spectral"].append(b["spectral"].mean())
        out["local"].append(b["local"].mean())
        out["global"].append(b["global"].mean())
        out["entropy"].append(-(r * np.log(np.where(r > 0, r, 1.0))).sum(1).mean())
        out["sensitivity"].append(sens["mean"][0] / size)
        out["flips"].append(sens["flips"][0])
    return {k: np.array(v) for k, v in out.items()}
