"""The training loop: train, validate, checkpoint, resume, on any task.

    result = train(preset("tiny"), "runs/tiny")                 # a fresh run
    result = train(None, "runs/tiny", resume=True)              # continue it
    result = train(preset("listops-cpu"), "runs/listops")       # another task

The loop knows a task only through gma_np.tasks.base.Task (docs/tasks.md): the
config names it (cfg.task, cfg.task_params), `build_task` makes it, and the model is
the body with the task's head. One step: task.sample_batch("train", B, rng) with the
run's Generator, the body (causal or bidirectional, with the batch's key mask), the
task's head and loss, back through both (`loss_and_grads`), clip the global gradient
norm, AdamW with the warm-up + cosine learning rate. Every `eval_interval` steps
(and at the end) task.evaluate on the validation split: the task's metric (bits per
byte for the language model, accuracy for the others); every `checkpoint_interval`
steps (and at the end, and at step 0) an atomic checkpoint (gma_np.train.checkpoint).

Resume is exact: the checkpoint holds the parameters, the AdamW moments and
step count, the Generator's state (hence the batch order) and the step, so
10 steps + resume + 10 steps equal 20 straight steps bit for bit
(tests/test_train.py), on every task. Validation uses the task's fixed batches and
no randomness.

A resume may raise `steps` (extend a finished or paused run). The learning
rate keeps the schedule the run was following: the cosine still reaches its
floor at the old end (cfg.decay_steps is set to it), and the added steps run
at lr * min_lr_ratio; a resume that also gives decay_steps moves the cosine's
end there instead. So 20 steps extended to 40 equal a straight 40-step run
with decay_steps=20, bit for bit.

The run directory gets:
    checkpoint.npz, checkpoint.json   the last checkpoint
    config.json                       the TrainConfig
    log.jsonl                         one JSON object a line: {"step", "loss", "lr", "grad_norm",
                                      "tokens_per_s", "elapsed_s"} or, at a validation,
                                      {"step", "val_bpb", "elapsed_s"} (lm) /
                                      {"step", "val_<metric>", "val_loss", "elapsed_s"} (the others)
    loss.png                          the loss curves (when matplotlib is installed)

A NaN or inf loss (or gradient norm) stops the run with TrainingDiverged and
leaves the last good checkpoint untouched. Ctrl-C finishes the current step,
writes a checkpoint and returns.
"""

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from gma_np.nn.heads import add_head_grads
from gma_np.nn.model import LanguageModel, body_backward, body_forward, parameter_shapes
from gma_np._allocator import keep_freed_memory
from gma_np._threads import run_shards, sum_in_order, with_blas_threads
from gma_np.optim import AdamW, clip_grad_norm, lr_at
from gma_np.tasks import Batch, body_causal, default_cache_dir, get_task
from gma_np.train import checkpoint as ckpt
from gma_np.train.config import (BOOKKEEPING_FIELDS, SCHEDULE_FIELDS, ConfigError, TrainConfig,
                                  config_differences)
from gma_np.train.evaluate import evaluate_task, metric_key
from gma_np.train.runlog import RunLog


# Seeds the random draws of a mixer's buffers at step t as [seed, REDRAW_STREAM, t], a
# stream apart from the batch order (seed) and the mixture fit (seed + 1).
REDRAW_STREAM = 7


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int                 # steps done in all (this run and the ones it resumed)
    val_metric: float         # last validation value of the task's metric (nan if never evaluated)
    metric: str               # its name: "bits_per_byte" (lm), "accuracy", "answer_accuracy"
    tokens_per_s: float       # training throughput of this invocation (median over its steps)
    elapsed_s: float          # wall time of this invocation
    model: object             # the LanguageModel (body + the task's head) at the end
    stopped: str              # "done", "stop_after", "interrupted"

    @property
    def val_bpb(self):
        """The last validation bits per byte of a language-model run (nan for another task)."""
        return self.val_metric if self.metric == "bits_per_byte" else float("nan")


def _optimizer(cfg, model):
    return AdamW(model.params, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                 weight_decay=cfg.weight_decay, decay=model.decay_flags())


def build_task(cfg, cache_dir=None):
    """The run's task, made from cfg.task and its parameters (generated splits are kept
    in cache_dir, default gma_np.tasks.default_cache_dir()). A corpus that cannot be
    used is a DataError."""
    return get_task(cfg.task, cache_dir=default_cache_dir() if cache_dir is None else cache_dir,
                    **cfg.task_kwargs())


def build(cfg, head=None):
    """A fresh model (the body with `head`, the task's; None: the language model's token
    head) and its optimizer for cfg (data-dependent parameters not yet set)."""
    model = LanguageModel(cfg.model_config(), seed=cfg.seed, head=head)
    return model, _optimizer(cfg, model)


# Shards of a training batch (gma_np._threads.run_shards): the batch's rows cut into this
# many shards, each run forward and backward on a thread of its own, their gradients
# summed in shard order. Within one op the two cores meet at every product and row layer
# (~50 times a step); two shards meet once. Tiny preset, interleaved in one process,
# medians of 21 (load ~0.6): 125.7 ms a step against 144.5 for the whole batch with the
# ops on two cores (docs/performance.md, section 6).
BATCH_SHARDS = 2


def _shards(batch):
    """Row ranges of the batch's shards: BATCH_SHARDS near-equal ranges, or the whole
    batch when it has fewer rows than that or a shard would score no target (its loss
    would be 0 / 0). A function of the batch alone, never of the thread count."""
    B = batch.tokens.shape[0]
    n = min(BATCH_SHARDS, B)
    rows = [slice(i * B // n, (i + 1) * B // n) for i in range(n)]
    if n > 1 and batch.loss_mask is not None and not all(batch.loss_mask[r].any() for r in rows):
        rows = [slice(0, B)]
    return rows


def _scored(batch, rows):
    """The targets of batch's rows that the loss scores: the count the head's mean is over."""
    if batch.loss_mask is not None:
        return int(batch.loss_mask[rows].sum())
    return int(batch.targets[rows].size)


def _shard_loss_and_grads(model, task, batch, dloss):
    arrays, cfg = model.arrays(), model.cfg
    h, c_body = body_forward(arrays, batch.tokens, cfg, causal=body_causal(task, cfg.mixer),
                             key_mask=batch.key_mask)                       # (B, N, D)
    loss, c_head, _ = task.head_forward(h, arrays, batch, cfg)
    dh, g_head = task.head_backward(c_head, dloss)
    return loss, add_head_grads(body_backward(dh, c_body), g_head)


def loss_and_grads(model, task, batch):
    """(loss in nats, gradient dict) of one batch: the body (causal or not, the batch's key
    mask), the task's head and loss, then back through both (docs/tasks.md, "One training
    step"). The head's gradient of a shared parameter (the tied wte) adds to the body's.

    The batch runs as shards of rows (_shards, BATCH_SHARDS), concurrently
    (gma_np._threads.run_shards). The loss is a mean over the scored targets, so shard s,
    scoring n_s of the batch's n, contributes (n_s / n) times its own mean: its head's
    backward gets dloss = n_s / n, and the loss and the gradients are the sums over the
    shards, in shard order."""
    rows = _shards(batch)
    if len(rows) == 1:
        return _shard_loss_and_grads(model, task, batch, 1.0)
    counts = [_scored(batch, r) for r in rows]
    weights = [c / sum(counts) for c in counts]
    parts = [Batch(*(None if a is None else a[r] for a in batch)) for r in rows]
    results = run_shards(lambda i: _shard_loss_and_grads(model, task, parts[i], weights[i]),
                         len(rows))
    loss = sum_in_order([w * l for w, (l, _) in zip(weights, results)])
    grads = {name: sum_in_order([g[name] for _, g in results]) for name in results[0][1]}
    return float(loss), grads


def restore(run_dir):
    """(cfg, model, opt, rng, step, meta) from run_dir's checkpoint."""
    arrays, opt_arrays, meta = ckpt.load_checkpoint(run_dir)
    try:
        cfg = TrainConfig.from_dict(meta["config"])
        model_cfg = cfg.model_config()
        head = cfg.task_spec().head
        # the checkpoint holds the parameters and the mixer's buffers (model.arrays())
        names = set(parameter_shapes(model_cfg, head))
        model = LanguageModel(model_cfg, params={n: a for n, a in arrays.items() if n in names},
                              buffers={n: a for n, a in arrays.items() if n not in names},
                              head=head)
    except (TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"checkpoint: {run_dir!r} does not match its own config: {err}") from None
    opt = _optimizer(cfg, model)
    try:
        opt.load_state_arrays(opt_arrays)
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
    except (ValueError, KeyError, TypeError) as err:
        raise ckpt.CheckpointError(f"checkpoint: {run_dir!r} has an unusable optimizer or RNG "
                                   f"state: {err}") from None
    return cfg, model, opt, rng, int(meta["step"]), meta


def _save(run_dir, cfg, model, opt, rng, step, key, value):
    """The checkpoint; its meta records the last validation under the log's key (val_bpb for lm)."""
    ckpt.save_checkpoint(run_dir, model.arrays(), opt.state_arrays(),
                         {"step": step, "config": cfg.to_dict(), "rng": rng.bit_generator.state,
                          key: None if value is None or math.isnan(value) else value})


def _progress(total, initial, quiet):
    from tqdm import tqdm
    disable = quiet if quiet is not None else not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                desc="train")


def _print_now(message):
    """print, flushed: a log redirected to a file shows each line when it happens."""
    print(message, flush=True)


def _describe(task):
    """How the run's metric reads in a line: (value -> text)."""
    if task.metric_name == "bits_per_byte":
        return lambda v: f"{v:.3f} bits/byte"
    return lambda v: f"{task.metric_name.replace('_', ' ')} {v:.3f}"


@with_blas_threads("blas_threads")
def train(cfg, run_dir, *, resume=False, stop_after=None, quiet=None, print_fn=_print_now,
          on_step=None, blas_threads=1, cache_dir=None):
    """Train (or resume) the run in run_dir. Returns a TrainResult.

    cfg : TrainConfig, or None with resume=True (use the checkpoint's). On resume
        a given cfg must equal the checkpoint's in every field but the bookkeeping
        ones (gma_np.train.config.BOOKKEEPING_FIELDS), else CheckpointError.
        A resume may change `steps` and `decay_steps` too (extend or shorten the run;
        the module docstring says what the learning rate does).
    stop_after : pause (with a checkpoint) after this many steps of this invocation;
        resume=True continues from there.
    quiet : None = progress bar only on a terminal; True/False force it.
    on_step : called as on_step(step) after each step (tests use it to kill a run).
    blas_threads : BLAS threads for the run (None = leave as is); the caller's come back
        when train returns or raises (gma_np._threads.with_blas_threads).
    cache_dir : where a task keeps generated splits (None: gma_np.tasks.default_cache_dir()).

    The process's C allocator is set to keep freed blocks for reuse (gma_np._allocator:
    glibc only, for the rest of the process).
    """
    if cfg is not None and not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig or None, got {type(cfg).__name__}")
    keep_freed_memory()                  # the steps' arrays reused, not re-faulted: _allocator
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool)
                                   or stop_after < 1):
        raise ValueError(f"stop_after: expected a positive integer or None, got {stop_after!r}")
    if not resume and cfg is not None and os.path.exists(ckpt.checkpoint_path(run_dir)):
        # the same command run again: continue the run if it is the same one, refuse otherwise
        existing = TrainConfig.from_dict(ckpt.load_checkpoint(run_dir)[2]["config"])
        diff = config_differences(existing, cfg)
        if diff:
            lines = "; ".join(f"{n}: existing {a!r}, requested {b!r}" for n, a, b in diff)
            hint = ("; add --resume to extend it, or choose another --out for a new run"
                    if all(n in SCHEDULE_FIELDS for n, _, _ in diff)
                    else "; choose another --out for a new run")
            raise ckpt.CheckpointError(f"checkpoint: {run_dir!r} already holds a different run "
                                       f"({lines}){hint}")
        print_fn(f"{run_dir} already holds this run: continuing it (as with --resume; "
                 f"choose another --out for a fresh run)")
        resume = True
    if resume:
        saved_cfg, model, opt, rng, step, meta = restore(run_dir)
        if cfg is not None:
            diff = config_differences(saved_cfg, cfg, ignore=BOOKKEEPING_FIELDS + SCHEDULE_FIELDS)
            if diff:
                lines = "; ".join(f"{n}: checkpoint {a!r}, requested {b!r}" for n, a, b in diff)
                raise ckpt.CheckpointError(f"checkpoint: the config of {run_dir!r} does not match "
                                           f"the requested one ({lines}); resume without those "
                                           f"options, or train into a new --out directory")
            cfg = _resumed_config(saved_cfg, cfg, step, run_dir, print_fn)
            if cfg != saved_cfg:
                _write_config(run_dir, cfg)
        else:
            cfg = saved_cfg
        task = _task_for(cfg, model, cache_dir)
        key = metric_key(task)
        val = meta.get(key)
        val = float("nan") if val is None else float(val)
        ckpt.remove_stale_temporaries(run_dir)
        log = RunLog(run_dir)
        log.truncate_after(step)
        print_fn(f"resumed {run_dir} at step {step}/{cfg.steps} ({task.summary()})")
    else:
        if cfg is None:
            raise ValueError("cfg: a new run needs a TrainConfig (cfg=None only with resume=True)")
        task = build_task(cfg, cache_dir)
        model, opt = build(cfg, task.head)
        _task_for(cfg, model, cache_dir, task)
        key = metric_key(task)
        rng = np.random.default_rng(cfg.seed)
        first = task.sample_batch("train", cfg.batch_size, rng)
        model.init_from_data(first.tokens, np.random.default_rng(cfg.seed + 1),
                             causal=body_causal(task, cfg.model.mixer), key_mask=first.key_mask)
        step, val = 0, float("nan")
        os.makedirs(run_dir, exist_ok=True)
        _write_config(run_dir, cfg)
        log = RunLog(run_dir)
        log.truncate_after(-1)
        _save(run_dir, cfg, model, opt, rng, step, key, None)
        how = ("" if task.causal else ", bidirectional" if not body_causal(task, cfg.model.mixer)
               else ", causal (a causal-only mixer on a bidirectional task)")
        rows = (f"{cfg.batch_size} x {task.seq_len} tokens" if task.name == "lm" else
                f"{cfg.batch_size} rows of up to {task.seq_len} tokens")
        print_fn(f"training {model.n_params():,} parameters ({cfg.model.mixer} mixer{how}) on "
                 f"{task.summary()}, {cfg.steps} steps of {rows}")
        base = task.baseline("val")
        if base is not None:
            print_fn(f"baseline to beat: {base[0]}, validation {task.metric_name} {base[1]:.3f}")

    shown = _describe(task)
    max_examples = max(1, cfg.eval_tokens // task.seq_len) if cfg.eval_tokens else 0
    bar = _progress(cfg.steps, step, quiet)
    say = print_fn if bar.disable else bar.write
    stop = {"signal": False}
    previous_handler = None

    def on_sigint(*_):
        if stop["signal"]:                      # a second Ctrl-C: stop now, keep the last checkpoint
            raise KeyboardInterrupt
        stop["signal"] = True
        say("Ctrl-C: finishing this step and writing a checkpoint (again to stop at once)")
    try:
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:            # not the main thread: Ctrl-C keeps its default behaviour
        pass
    rates, t_start, start_step, stopped = [], time.perf_counter(), step, "done"
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = task.sample_batch("train", cfg.batch_size, rng)
            loss, grads = loss_and_grads(model, task, batch)
            grad_norm = clip_grad_norm(grads, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}. "
                    f"The last good checkpoint (step {_checkpoint_step(run_dir)}) is kept in "
                    f"{run_dir}; lower --lr or raise warmup_steps and resume or restart.")
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.schedule_steps, cfg.min_lr_ratio)
            opt.step(model.params, grads, lr)
            step += 1
            redraw = cfg.model.feature_redraw
            if redraw and step % redraw == 0:
                # a Generator of its own per redraw: the batch order does not depend on it,
                # and a resumed run redraws the same projections (they are in the checkpoint)
                model.redraw_buffers(np.random.default_rng([cfg.seed, REDRAW_STREAM, step]))
            rates.append(batch.tokens.size / (time.perf_counter() - t0))
            if step % cfg.log_interval == 0 or step == cfg.steps:
                log.write({"step": step, "loss": round(loss, 6), "lr": lr,
                           "grad_norm": round(grad_norm, 6), "tokens_per_s": round(rates[-1], 1),
                           "elapsed_s": round(time.perf_counter() - t_start, 3)})
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                result = evaluate_task(model, task, "val", max_examples)
                val = result[task.metric_name]
                record = {"step": step, key: round(val, 6)}
                if task.name != "lm":              # the language model's lines stay as they were
                    record["val_loss"] = round(result["loss"], 6)
                record.update(_routing_usage(model, task))
                log.write({**record, "elapsed_s": round(time.perf_counter() - t_start, 3)})
                train_text = (f"{loss / math.log(2):.3f} bits/byte" if task.name == "lm"
                              else f"loss {loss:.3f} nats")
                val_text = shown(val) + ("" if task.name == "lm" else f" (loss {result['loss']:.3f})")
                say(f"step {step}/{cfg.steps}: train {train_text}, validation {val_text}, "
                    f"{np.median(rates):,.0f} tokens/s")
            if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                _save(run_dir, cfg, model, opt, rng, step, key, val)
            if task.name == "lm":
                bar.set_postfix(train_bpb=f"{loss / math.log(2):.3f}", val_bpb=f"{val:.3f}",
                                tok_s=f"{rates[-1]:,.0f}", refresh=False)
            else:
                bar.set_postfix(loss=f"{loss:.3f}", **{key: f"{val:.3f}"},
                                tok_s=f"{rates[-1]:,.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step)
            paused = stop_after is not None and step - start_step >= stop_after and step < cfg.steps
            if stop["signal"] or paused:
                stopped = "interrupted" if stop["signal"] else "stop_after"
                _save(run_dir, cfg, model, opt, rng, step, key, val)
                break
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    elapsed = time.perf_counter() - t_start
    rate = float(np.median(rates)) if rates else float("nan")
    if step > start_step:
        log.plot(print_fn)
    if rates:
        what = {"done": "done", "stop_after": "paused (stop_after)",
                "interrupted": "interrupted"}[stopped]
        then = "" if stopped == "done" else f"; continue with --resume --out {run_dir}"
        print_fn(f"{what} at step {step}/{cfg.steps}: validation {shown(val)}, "
                 f"{rate:,.0f} tokens/s (median), {elapsed:.1f} s; checkpoint in {run_dir}{then}")
    else:
        print_fn(f"nothing to do: the run in {run_dir} is complete (step {step}/{cfg.steps}, "
                 f"validation {shown(val)}); resume with a larger --steps to extend it")
    return TrainResult(step=step, val_metric=val, metric=task.metric_name, tokens_per_s=rate,
                       elapsed_s=elapsed, model=model, stopped=stopped)


# Validation rows the routing usage of the run log is measured on (a fixed sample: the
# same rows at every evaluation, so the curve shows the model change, not the data).
USAGE_WINDOWS = 8


def _routing_usage(model, task):
    """GMA's routing usage on the first USAGE_WINDOWS validation rows (effective number
    of components, token entropy, dead components: gma_np.analysis.usage_summary), for the
    run log at every evaluation, so a collapse to few components shows as it happens.
    The body runs as training runs it (causal or bidirectional, the rows' key mask), and
    padding is left out. {} for another mixer. It only reads the model: the run's numbers
    do not change."""
    if model.cfg.mixer != "gma":
        return {}
    batch = next(iter(task.eval_batches("val", USAGE_WINDOWS, USAGE_WINDOWS)))
    from gma_np.analysis.collect import usage_summary    # the analysis loads only when used
    return usage_summary(model, batch.tokens, causal=body_causal(task, model.cfg.mixer),
                         key_mask=batch.key_mask)


def _write_config(run_dir, cfg):
    ckpt.atomic_write(os.path.join(run_dir, "config.json"),
                      lambda f: f.write(json.dumps(cfg.to_dict(), indent=1).encode()))


def _task_for(cfg, model, cache_dir, task=None):
    """The run's task (built unless given), checked against the model: ConfigError if the
    vocabulary or the positional table does not fit (a config edited by hand)."""
    task = build_task(cfg, cache_dir) if task is None else task
    try:
        task.check_model(model.cfg)
    except ValueError as err:
        raise ConfigError(f"model.{err}") from None
    return task


def _resumed_config(saved, requested, step, run_dir, print_fn):
    """The config a resume continues with: the checkpoint's, with the requested bookkeeping
    fields and, if they changed, steps and decay_steps (module docstring: extending a run)."""
    new = {n: getattr(requested, n) for n in BOOKKEEPING_FIELDS}
    if requested.steps != saved.steps or requested.decay_steps != saved.decay_steps:
        if requested.steps < step:
            raise ckpt.CheckpointError(f"steps: the run in {run_dir!r} is at step {step}; "
                                       f"expected steps >= {step}, got {requested.steps}")
        if requested.decay_steps != saved.decay_steps:
            decay = requested.decay_steps       # asked for: the cosine's end moves there
        else:
            decay = saved.schedule_steps        # kept: the cosine ends where it was to end
        new.update(steps=requested.steps, decay_steps=decay)
        end = decay or requested.steps
        floor = f"its floor lr * min_lr_ratio = {saved.lr * saved.min_lr_ratio:g}"
        if end < requested.steps:
            plan = f"the cosine reaches {floor} at step {end} and stays there to step {requested.steps}"
        elif end > requested.steps:
            plan = f"the run ends at step {requested.steps}, before the cosine reaches {floor} at step {end}"
        else:
            plan = f"the cosine reaches {floor} at step {end}, the end"
        hint = ("" if requested.decay_steps != saved.decay_steps else
                f" (--decay-steps {requested.steps} would stretch the cosine to the new end)")
        print_fn(f"{run_dir}: steps {saved.steps} -> {requested.steps}: {plan}"
                 + (hint if end != requested.steps else ""))
    return TrainConfig.from_dict({**saved.to_dict(), **new})


def _checkpoint_step(run_dir):
    try:
        with open(os.path.join(run_dir, ckpt.JSON_NAME)) as f:
            return json.load(f)["step"]
    except (OSError, ValueError, KeyError):
        return "unknown"
