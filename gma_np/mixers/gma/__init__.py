"""Gaussian Mixture Attention: the engine and its adapter to the mixer contract.

The public functional API (definition, section 5) is re-exported from the package
root, gma_np; core.py is the adapter the model uses (gma_np.mixers.attention).

    reference/    the definition in plain NumPy: naive routing, dense N x N GMA, loop over t
    kernels.py    private Numba kernels of the routing: log-densities (also of one decoding
                  token), the fused softmax, their gradients
    routing.py    responsibilities and log-likelihood of the per-head mixtures, forward/backward
    mixing.py     gma / gma_forward / gma_backward: the routing, then the feature memory
                  (gma_np.memory)
    recurrent.py  the stateful causal form: gma_recurrent over a chunk, gma_step over one token
    init.py       k-means++ fit of the mixtures to the first batch's keys
    core.py       the adapter of the shared multi-head shell
"""
