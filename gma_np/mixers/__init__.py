"""Sequence mixers behind one contract (gma_np.mixers.contract.Mixer), and their registry.

    contract.py   the Mixer dataclass: what the model and the trainer call
    attention.py  the shared multi-head shell (projections, heads, output projection)
                  that turns a per-head attention core into a Mixer
    gma/          Gaussian Mixture Attention (the engine: routing, memory mixing, recurrence)
    softmax/      scaled dot-product attention (dense reference, blocked fast path, KV cache)
    linear/       linear attention, elu + 1 features (Katharopoulos et al. 2020)
    performer/    FAVOR+ positive random features (Choromanski et al. 2021)
    mamba/        a selective state-space block, Mamba-style S6 (Gu and Dao 2023)

Adding a mixer: a folder with its reference, fast path and adapter, and one line in
REGISTRY below (docs/mixers/contract.md). tests/test_mixer_contract.py is parametrised
over REGISTRY, so a registered mixer is proven the day it is added.
"""

from gma_np._registry import registered_module

# name -> the module whose `MIXER` attribute is the gma_np.mixers.contract.Mixer.
# Modules are imported on first use: a mixer costs nothing until it is asked for.
REGISTRY = {
    "gma": "gma_np.mixers.gma.core",
    "softmax": "gma_np.mixers.softmax.core",
    "linear": "gma_np.mixers.linear.core",
    "performer": "gma_np.mixers.performer.core",
    "mamba": "gma_np.mixers.mamba.core",
}

MIXER_NAMES = tuple(REGISTRY)


def get_mixer(name):
    """The registered Mixer called `name`; ValueError naming the known ones otherwise."""
    return registered_module(REGISTRY, "mixer", name).MIXER
