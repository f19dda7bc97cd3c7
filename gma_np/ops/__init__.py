"""Forward/backward pairs over arrays: the functional core that layers and tools build on.

routing    responsibilities and log-likelihood of the per-head Gaussian mixtures
mixing     gma / gma_forward / gma_backward, bidirectional and causal (fused Numba passes)
recurrent  the stateful causal form: gma_recurrent over a chunk, gma_step over one token
"""
