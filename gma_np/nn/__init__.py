"""The stateful shell over gma_np.ops: layers as forward/backward pairs, and the GMA language model.

    layers.py        embedding, positions, linear, layernorm, GELU MLP, cross-entropy, classifier head
    gma_layer.py     the multi-head GMA layer (docs/definition.md, section 6)
    mixture_init.py  k-means++ initialisation of the mixtures from the first batch's keys
    model.py         ModelConfig, the pure model_forward / model_backward, GMALanguageModel
"""

from gma_np.nn.model import (
    DecodeState,
    GMALanguageModel,
    ModelConfig,
    decays,
    init_params,
    lm_loss_backward,
    lm_loss_forward,
    model_backward,
    model_forward,
    parameter_shapes,
)

__all__ = [
    "ModelConfig", "GMALanguageModel", "DecodeState", "parameter_shapes", "init_params", "decays",
    "model_forward", "model_backward", "lm_loss_forward", "lm_loss_backward",
]
