"""The mixer contract: what the model and the trainer know of a sequence mixer.

A sequence mixer maps the residual stream x (B, N, D) to y (B, N, D), mixing
information across the N tokens. The model (gma_np.nn.model) and the trainer
(gma_np.train) call a mixer only through the fields of `Mixer`; they never import
a mixer's own modules. A mixer is registered by one line in gma_np/mixers/__init__.py
(docs/mixers/contract.md: how to add one).

Dimension legend: B batch, N tokens (n for a decoding chunk), D model width.

Parameter names are local to the mixer ("Wq", "means", ...); the model stores them
as "h{layer}.{mixer name}.{local name}". Two kinds of arrays:

    parameters  trained: the optimizer updates them, backward returns their gradients
    buffers     not trained but part of the model (performer's random projections):
                saved in checkpoints, changed only by `redraw`

Weight decay is a rule, not a list: a parameter with ndim >= 2 is decayed (a matrix
that multiplies activations: nanoGPT's rule) unless its mixer names it in `no_decay`
(parameters of a distribution, such as GMA's mixture, whose prior is not "small").
"""

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Mixer:
    """One sequence mixer, as functions over plain arrays.

    Every function takes the model config `cfg` (gma_np.nn.ModelConfig) and reads the
    fields it needs (n_heads, head_dim, value_dim, and its own).
    """
    name: str
    # cfg -> {local name: shape} of the trained parameters, in a fixed order
    parameter_shapes: Callable
    # (cfg, rng) -> {local name: float64 array}: initial values of those parameters
    init_parameters: Callable
    # (x (B, N, D), p, cfg, *, causal, key_mask=None) -> (y (B, N, D), cache);
    # p holds the parameters and the buffers, by local name
    forward: Callable
    # (dy (B, N, D), cache) -> (dx (B, N, D), {local name: gradient}) for every parameter
    backward: Callable
    # (B, p, cfg) -> the empty recurrent state of a causal mixer
    decode_init: Callable
    # (x (B, n, D), p, cfg, state) -> (y (B, n, D), state): n >= 1 new tokens after the
    # state's prefix; any chunking equals the causal forward of the whole sequence
    decode: Callable
    # (x (B, N, D), p, cfg, *, causal, key_mask=None) -> y: the naive reference the fast
    # forward is tested against (the dense N x N form or a loop over t)
    reference: Callable
    # cfg -> {local name: shape} of the buffers ({} for most mixers)
    buffer_shapes: Callable = lambda cfg: {}
    # (cfg, rng) -> {local name: float64 array}: initial buffers
    init_buffers: Callable = lambda cfg, rng: {}
    # (buffers, cfg, rng) -> new buffers, or None when the mixer has nothing to redraw
    redraw: Optional[Callable] = None
    # (x (B, N, D), p, cfg, rng) -> {local name: array}: parameters set from the data the
    # layer sees at the start of training (GMA fits its mixtures to the keys), or None
    init_from_data: Optional[Callable] = None
    # local names of parameters with ndim >= 2 that are NOT weight-decayed
    no_decay: frozenset = field(default_factory=frozenset)
    # True if the mixer has no bidirectional form
    causal_only: bool = False

    def decays(self, local_name, shape):
        """Whether AdamW decays this parameter (module docstring: the rule)."""
        return len(shape) >= 2 and local_name not in self.no_decay
