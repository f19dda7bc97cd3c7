"""The small-model CPU trainer: config and presets, data, checkpoints, the loop, evaluation, sampling.

    config.py      TrainConfig (every default commented, the ModelConfig and the task nested) and the presets
    data.py        the language model's --data rule and batches (over gma_np.data)
    checkpoint.py  atomic, pickle-free checkpoints
    loop.py        train(): the loop over any task (gma_np.tasks), validation, resume
    evaluate.py    the task's validation metric, generation with the recurrent state
    runlog.py      log.jsonl and the loss-curve PNG
    commands.py    the train, eval and sample subcommands of gma-np
"""

from gma_np.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gma_np.train.config import PRESETS, ConfigError, TrainConfig, preset
from gma_np.train.data import DataError, load_corpus
from gma_np.train.evaluate import evaluate_bpb, evaluate_task, generate
from gma_np.train.loop import TrainingDiverged, TrainResult, build_task, restore, train

__all__ = [
    "TrainConfig", "PRESETS", "preset", "ConfigError", "load_corpus", "DataError",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "train", "restore", "build_task", "TrainResult", "TrainingDiverged", "evaluate_bpb",
    "evaluate_task", "generate",
]
