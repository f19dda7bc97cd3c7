"""A selective state-space model (Mamba-style S6, Gu and Dao 2023): the scan and the block.

Dimension legend: B batch, N tokens (n for a decoding chunk), M channels, S state size
per channel. As arrays, B and C are the scan's write and read vectors (B, N, S).

    y = selective_scan(x, delta, A, B, C, D, h0=None)                      # (B, N, M)
    y, cache = selective_scan_forward(x, delta, A, B, C, D, h0=None, store_states=False)
    grads = selective_scan_backward(dy, cache)      # dict x, delta, A, B, C, D (h0 if given)
    y, state = selective_scan_recurrent(x, delta, A, B, C, D, state=None)  # decoding, (B, M, S)

    h_t = exp(delta_t A) * h_{t-1} + delta_t x_t B_t,    y_t = C_t . h_t + D x_t

    naive.py    the definition: the loop-over-t scan (forward and backward) and the block
    kernels.py  the private Numba kernels: forward scan, reverse-scan backward
    scan.py     the validating wrappers above
    block.py    the Mamba block's forward/backward pair and decoding (MambaState)
    core.py     the Mixer of the registry (gma_np.mixers), its parameters and initialisation

docs/mixers/mamba.md: the definition, the derivation of the backward, the
recomputation's cost, the initialisation, and the tests that prove each part.
"""

from gma_np.mixers.mamba.block import MambaState, mamba_backward, mamba_forward
from gma_np.mixers.mamba.scan import (
    SCAN_CHANNEL_GROUPS,
    SCAN_CHUNK,
    SelectiveScanCache,
    selective_scan,
    selective_scan_backward,
    selective_scan_forward,
    selective_scan_recurrent,
)

__all__ = [
    "selective_scan", "selective_scan_forward", "selective_scan_backward",
    "selective_scan_recurrent", "SelectiveScanCache", "SCAN_CHUNK", "SCAN_CHANNEL_GROUPS",
    "mamba_forward", "mamba_backward", "MambaState",
]
