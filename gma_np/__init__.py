"""gma_np: a NumPy/Numba CPU reference engine for Gaussian Mixture Attention.

The functional API of section 5 of the definition (docs/definition.md), plus
the forward/backward pairs, the recurrent form and the gradient checker.
"""

from gma_np.gradcheck import GradcheckReport, gradcheck
from gma_np.mixers.gma.mixing import GMACache, gma, gma_backward, gma_forward
from gma_np.mixers.gma.recurrent import GMAState, gma_recurrent, gma_step, init_state
from gma_np.mixers.gma.routing import (
    log_likelihood,
    log_likelihood_backward,
    log_likelihood_forward,
    responsibilities,
    responsibilities_backward,
    responsibilities_forward,
)

__version__ = "0.1.0"

__all__ = [
    "responsibilities", "responsibilities_forward", "responsibilities_backward",
    "log_likelihood", "log_likelihood_forward", "log_likelihood_backward",
    "gma", "gma_forward", "gma_backward", "GMACache",
    "gma_recurrent", "gma_step", "init_state", "GMAState",
    "gradcheck", "GradcheckReport",
    "__version__",
]
