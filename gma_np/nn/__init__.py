"""The stateful shell: layers as forward/backward pairs, and the language model over any mixer.

    layers.py        embedding, positions, linear, layernorm, GELU MLP, cross-entropy, classifier head
    heads.py         heads over the body's states: token logits (tied or not), the pooled classifier
    model.py         ModelConfig, the one block function, the body, model_forward / model_backward, LanguageModel
"""

from gma_np.nn.heads import PooledClassifierHead, TokenHead, add_head_grads
from gma_np.nn.model import (
    DecodeState,
    LanguageModel,
    ModelConfig,
    body_backward,
    body_forward,
    body_shapes,
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
    "body_forward", "body_backward", "body_shapes", "TokenHead", "PooledClassifierHead",
    "add_head_grads",
]
