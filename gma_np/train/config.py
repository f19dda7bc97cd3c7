"""The training configuration: one typed dataclass, every default commented, and named presets.

    cfg = preset("tiny")                       # the classroom run: minutes on 2 CPU cores
    cfg = preset("tiny", steps=200, seed=1)    # any field can be overridden
    cfg.model_config()                         # the gma_np.nn.ModelConfig it describes

The defaults are the `tiny` preset (docs/training.md gives its measured time
and validation bits per byte). `test` is the few-second model of the test-suite.
"""

from dataclasses import asdict, dataclass, fields

from gma_np.nn.model import ModelConfig

# Python types a field of each annotated type accepts (an int where a float is expected is fine).
_ACCEPTED = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


@dataclass
class TrainConfig:
    """Everything that decides a training run's numbers. Two runs with equal
    configs and seeds produce the same parameters bit for bit."""
    preset: str = "tiny"              # name of the preset this config started from (for the record)
    # ---- model (gma_np.nn.ModelConfig)
    d_model: int = 128                # D: width of the residual stream
    n_layers: int = 2                 # L: pre-norm blocks (GMA layer + MLP)
    n_heads: int = 4                  # H: GMA heads per layer
    head_dim: int = 32                # d: query/key size per head
    value_dim: int = 32               # e: value size per head
    n_components: int = 16            # K: mixture components (memory slots) per head
    covariance: str = "diag"          # "diag" or "spherical" mixture variances
    learn_temperature: bool = True    # learn a log-temperature per head
    norm: str = "row"                 # GMA read-out normalisation, "row" or "slot"
    mlp_ratio: int = 4                # MLP hidden size = mlp_ratio * d_model
    conv_width: int = 4               # short causal convolution before each GMA layer (0 = none)
    tie_embeddings: bool = True       # the LM head is the transposed token embedding
    dtype: str = "float32"            # compute dtype (float64 only for checks: 2-3x slower)
    context: int = 128                # N: tokens per training sequence (= positional table size)
    # ---- data
    data: str = ""                    # "" = the embedded corpus (pydoc_data.topics); else a path
    val_fraction: float = 0.1         # share of a plain text file (or the default corpus) held out, at its end
    # ---- optimisation
    steps: int = 600                  # total optimizer steps (the schedule's length)
    batch_size: int = 32              # B: sequences per step (B * context tokens)
    lr: float = 3e-3                  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1         # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50            # linear warm-up steps
    weight_decay: float = 0.1         # decoupled decay of weight matrices and embeddings only
    beta1: float = 0.9                # AdamW first-moment decay
    beta2: float = 0.99               # AdamW second-moment decay (0.99: small batches, short runs)
    adam_eps: float = 1e-8            # AdamW denominator floor
    grad_clip: float = 1.0            # global gradient-norm clip (0 = off)
    seed: int = 0                     # seeds initialisation and the batch order
    # ---- bookkeeping (may change on --resume: they do not change the numbers)
    eval_interval: int = 100          # validate every this many steps (and at the end)
    eval_tokens: int = 0              # validation tokens per evaluation (0 = the whole split)
    checkpoint_interval: int = 100    # write a checkpoint every this many steps (and at the end)
    log_interval: int = 10            # write a training-loss line to log.jsonl every this many steps

    def model_config(self):
        return ModelConfig(vocab_size=256, max_len=self.context, d_model=self.d_model,
                           n_layers=self.n_layers, n_heads=self.n_heads, head_dim=self.head_dim,
                           value_dim=self.value_dim, n_components=self.n_components,
                           covariance=self.covariance, learn_temperature=self.learn_temperature,
                           norm=self.norm, mlp_ratio=self.mlp_ratio, conv_width=self.conv_width,
                           tie_embeddings=self.tie_embeddings, dtype=self.dtype)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            ok = (isinstance(value, bool) if f.type is bool else
                  not isinstance(value, bool) and isinstance(value, _ACCEPTED[f.type]))
            if not ok:
                raise TypeError(f"{f.name}: expected {f.type.__name__}, got {type(value).__name__} {value!r}")
            if f.type is float:
                setattr(self, f.name, float(value))
        for name in ("steps", "batch_size", "context", "eval_interval", "checkpoint_interval",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        self.model_config()        # validates the model fields

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**d)


# Fields that do not change the numbers of a run: they may differ on --resume.
BOOKKEEPING_FIELDS = ("eval_interval", "eval_tokens", "checkpoint_interval", "log_interval")

PRESETS = {
    # The classroom run (the defaults): 2 layers, d_model 128, 4 heads, K = 16,
    # a width-4 convolution before each GMA layer, context 128, batch 32, 600 steps.
    # See docs/training.md for its time and bits per byte.
    "tiny": {},
    # The same without the convolution: the plain section-4 GMA block. It learns
    # more slowly per step (docs/training.md, "Why a short convolution").
    "tiny-noconv": dict(conv_width=0, steps=1000),
    # The test-suite's model: one layer, d_model 16; a step takes milliseconds.
    "test": dict(d_model=16, n_layers=1, n_heads=2, head_dim=8, value_dim=8, n_components=5,
                 context=32, batch_size=4, steps=20, warmup_steps=5, eval_interval=10,
                 eval_tokens=512, checkpoint_interval=10, log_interval=1),
    # A bigger model for a longer run (not timed: docs/training.md reports only the tiny presets).
    "small": dict(d_model=192, n_layers=4, n_heads=6, n_components=32, context=256,
                  steps=6000, batch_size=32, lr=2e-3, warmup_steps=200, eval_interval=500,
                  checkpoint_interval=500),
}


def preset(name, **overrides):
    """The TrainConfig of a named preset, with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**{"preset": name, **PRESETS[name], **overrides})


def config_differences(a, b, ignore=BOOKKEEPING_FIELDS):
    """[(field, value in a, value in b)] of the fields that differ, bookkeeping excepted."""
    return [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in fields(a)
            if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]
