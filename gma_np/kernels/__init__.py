"""Private Numba kernels: plain loops with no validation, called only by gma_np.ops.

routing  Gaussian log-densities of every (token, component) pair and their gradient
scan     the causal prefix-scan read-out and its reverse-scan backward
"""
