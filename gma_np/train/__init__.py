"""The small-model CPU trainer: config and presets, data, checkpoints, the loop, evaluation, sampling.

    config.py      TrainConfig (every default commented, the ModelConfig nested) and the presets
    data.py        the byte-level corpora and their splits, batches
    checkpoint.py  atomic, pickle-free checkpoints
    loop.py        train(): the loop, validation, resume
    evaluate.py    validation bits per byte, generation with the recurrent state
    runlog.py      log.jsonl and the loss-curve PNG
"""

from gma_np.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gma_np.train.config import PRESETS, ConfigError, TrainConfig, preset
from gma_np.train.data import DataError, load_corpus
from gma_np.train.evaluate import evaluate_bpb, generate
from gma_np.train.loop import TrainingDiverged, TrainResult, restore, train

__all__ = [
    "TrainConfig", "PRESETS", "preset", "ConfigError", "load_corpus", "DataError",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "train", "restore", "TrainResult", "TrainingDiverged", "evaluate_bpb", "generate",
]
