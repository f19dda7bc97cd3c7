"""GMA as an attention core of the shared multi-head shell (gma_np.mixers.attention).

Dimension legend: B batch, H heads, N tokens, d query/key head size, e value head
size, K mixture components.

Core parameters (local names; the model stores "h{l}.gma.<name>"):
    means (H, K, d)   log_var (H, K, d) "diag" or (H, K) "spherical"   logits (H, K)
    log_tau (H,), when cfg.learn_temperature: tau = exp(log_tau)

Config fields read: n_heads, head_dim, value_dim, n_components (K), covariance,
norm ("row" or "slot"), learn_temperature.

The mixing is gma_np.gma_forward / gma_backward; the only new gradient is the
temperature's: gma_backward returns dL/dtau, and tau = exp(log_tau) gives
dL/dlog_tau = dL/dtau * tau. Decoding is gma_np.gma_recurrent, whose state is the
K-slot memory (K (e + 1) numbers per head). The mixture is fitted to the keys of the
first batch by k-means++ (gma_np.mixers.gma.init) before training starts.
"""

import sys

import numpy as np

from gma_np.mixers.attention import attention_mixer
from gma_np.mixers.gma.init import fit_mixture
from gma_np.mixers.gma.mixing import gma_backward, gma_forward
from gma_np.mixers.gma.recurrent import gma_recurrent
from gma_np.mixers.gma.reference.dense import gma_dense

# The mixture is the parameters of a distribution, not weights that multiply
# activations: decay would pull the means to the origin, the variances to 1 and the
# weights to uniform, a prior unrelated to weight size.
NO_DECAY = ("means", "log_var", "logits")


def PARAMETER_SHAPES(cfg):
    H, K, d = cfg.n_heads, cfg.n_components, cfg.head_dim
    shapes = {"means": (H, K, d),
              "log_var": (H, K, d) if cfg.covariance == "diag" else (H, K),
              "logits": (H, K)}
    if cfg.learn_temperature:
        shapes["log_tau"] = (H,)
    return shapes


def init_parameters(cfg, rng):
    """Standard normal means (placeholders until init_from_keys fits them), unit
    variances, uniform weights, tau = 1."""
    p = {}
    for name, shape in PARAMETER_SHAPES(cfg).items():
        p[name] = rng.normal(0.0, 1.0, shape) if name == "means" else np.zeros(shape)
    return p


def temperature_of(p):
    """The temperature gma_forward gets: exp(log_tau) (H,) if the layer learns it, else 1.0."""
    return np.exp(p["log_tau"]) if "log_tau" in p else 1.0


def forward(q, k, v, p, cfg, *, causal, key_mask=None):
    tau = temperature_of(p)
    o, cache = gma_forward(q, k, v, p["means"], p["log_var"], p["logits"], causal=causal,
                           norm=cfg.norm, temperature=tau, key_mask=key_mask)   # (B, H, N, e)
    return o, (cache, tau)


def backward(do, cache):
    cache, tau = cache
    g = gma_backward(do, cache)
    grads = {name: g[name] for name in ("means", "log_var", "logits")}
    if isinstance(tau, np.ndarray):
        # in the forward pass this was: tau = exp(log_tau), so d tau / d log_tau = tau
        grads["log_tau"] = (g["temperature"] * tau).astype(tau.dtype)
    return g["q"], g["k"], g["v"], grads


def decode_init(B, p, cfg):
    return None                          # gma_recurrent starts from the empty memory


def decode(q, k, v, p, cfg, state):
    return gma_recurrent(q, k, v, p["means"], p["log_var"], p["logits"], state,
                         norm=cfg.norm, temperature=temperature_of(p))


def reference(q, k, v, p, cfg, *, causal, key_mask=None):
    """The dense N x N form of the definition (gma_np.mixers.gma.reference.dense)."""
    return gma_dense(q, k, v, p["means"], p["log_var"], p["logits"], causal=causal,
                     norm=cfg.norm, temperature=temperature_of(p), key_mask=key_mask)


def init_from_keys(k, p, cfg, rng):
    """The mixture fitted to the keys k (B, H, N, d) the layer projects from the data."""
    means, log_var, logits = fit_mixture(k, cfg.n_components, rng, cfg.covariance)
    return {"means": means, "log_var": log_var, "logits": logits}


MIXER = attention_mixer("gma", sys.modules[__name__])
