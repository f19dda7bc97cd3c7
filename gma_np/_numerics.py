"""Named numeric constants of gma_np, each with the reason it has its value.

Every magic number the package uses lives here, so that a port can copy them
and a reader can find why they are what they are.
"""

import math

import numpy as np

# log(2 pi): the constant term of a Gaussian log-density, per dimension.
LOG_2PI = math.log(2.0 * math.pi)

# Default eps of the read-out denominators (definition, section 2). It keeps
# O finite when a query routes to slots that nothing was written to yet
# (first tokens of a causal sequence, all-padding keys): then O = 0 / eps = 0.
DEFAULT_EPS = 1e-6

# Floating dtypes the engine computes in. Everything else is rejected at the
# public boundary with a clear error (never cast silently: an integer q is
# almost always a bug in the caller).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Dtype of every accumulator: the log-densities l_k(x) (a sum over d terms),
# the memory S and normalizer z (sums over N tokens) and parameter gradients
# (sums over B*N tokens). float32 inputs keep float64-grade accuracy where the
# error would otherwise grow with d or N; see docs/numerics.md.
ACCUM_DTYPE = np.dtype(np.float64)

# Finite-difference defaults of gma_np.gradcheck (docs/gradcheck.md).
# The 5-point central stencil has truncation error O(h^4) and rounding error
# O(eps_64 |f| / h); h = 1e-3 balances the two at about 1e-12 relative.
FD_STEP = 1e-3
# Relative tolerance a float64 gradient must meet (issue figure: 1e-6).
GRADCHECK_RTOL = 1e-6
# Absolute floor of the comparison, in units of the estimated rounding error
# of the stencil (eps_64 * sum|out * dout| / h): below it no difference is
# meaningful. Measured noise on the gma_np.selfcheck problems is 10-100 times
# below eps_64 * sum|out * dout| / h, so a factor 10 leaves a margin of 100+.
GRADCHECK_NOISE_FACTOR = 10.0
# Above this many scalar inputs, gradcheck(mode="auto") switches from
# checking every element to random directional derivatives.
GRADCHECK_MAX_FULL_ELEMENTS = 4096

# Tolerances the test-suite states per dtype when comparing two exact forms
# (dense vs naive vs fast) of the same computation.
RTOL_EXACT = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6}
