"""The definition as plain NumPy, for teaching and for checking the fast paths.

routing    responsibilities and log-likelihood by broadcasting over (N, K, d), with a
           hand-derived backward
dense      GMA through the explicit N x N affinity A, forward and backward
recurrent  causal GMA as a loop over t with an explicit state (S, z)

Nothing here is fast and nothing here is used by the fast paths: the reference knows
nothing above it, and the tests compare the fast paths against it.
"""
