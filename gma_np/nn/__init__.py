"""The stateful shell: layers as forward/backward pairs, and the language model over any mixer.

    layers.py        embedding, positions, linear, layernorm, GELU MLP, cross-entropy, classifier head
    heads.py         task heads: tied-embedding token logits, the pooled classifier
    mixture_init.py  k-means++ initialisation of GMA's mixtures from the first batch's keys
    model.py         ModelConfig, the one block function, model_forward / model_backward, LanguageModel
"""

from gma_np.nn.model import (
    DecodeState,
    LanguageModel,
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
    "ModelConfig", "LanguageModel", "DecodeState", "parameter_shapes", "init_params", "decays",
    "model_forward", "model_backward", "lm_loss_forward", "lm_loss_backward",
]
