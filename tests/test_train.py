"""gma_np.train: exact resume, checkpoint integrity, divergence, data, the CLI. All on the `test`
preset (one layer, d_model 16, 4 x 32 tokens a step), so every run takes a second or two."""

import json
import os

import numpy as np
import pytest

from gma_np.cli import main
from gma_np.mixers import MIXER_NAMES
from gma_np.nn.model import LanguageModel
from gma_np.train import (CheckpointError, ConfigError, DataError, TrainConfig, TrainingDiverged,
                          load_checkpoint, preset, save_checkpoint, train)
from gma_np.train import loop as loop_module
from gma_np.train.data import eval_batches, load_corpus, sample_batch


def _quiet(*_):
    pass


def _run(cfg, run_dir, **kw):
    return train(cfg, str(run_dir), quiet=True, print_fn=_quiet, **kw)


def _assert_same_run(dir_a, dir_b):
    pa, oa, ma = load_checkpoint(str(dir_a))
    pb, ob, mb = load_checkpoint(str(dir_b))
    assert ma["step"] == mb["step"]
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), f"parameter {name} differs"
    for name in oa:
        assert np.array_equal(oa[name], ob[name]), f"optimizer state {name} differs"
    assert ma["rng"] == mb["rng"], "RNG state (batch order) differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 straight steps of the test preset: the reference of the resume tests."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = _run(preset("test", steps=20), run_dir)
    return run_dir, result


def test_ten_plus_resume_plus_ten_is_bit_identical(straight, tmp_path):
    ref_dir, ref = straight
    first = _run(preset("test", steps=20), tmp_path, stop_after=10)
    assert first.step == 10 and first.stopped == "stop_after"
    second = _run(None, tmp_path, resume=True)
    assert second.step == 20
    _assert_same_run(ref_dir, tmp_path)
    assert second.val_bpb == ref.val_bpb


def test_killed_between_checkpoints_resumes_from_the_last(straight, tmp_path):
    """Killed at step 13 (checkpoints every 5): resume restarts from 10 and still matches."""
    ref_dir, _ = straight

    def kill(step):
        if step == 13:
            raise KeyboardInterrupt("simulated kill")
    with pytest.raises(KeyboardInterrupt):
        _run(preset("test", steps=20, checkpoint_interval=5), tmp_path, on_step=kill)
    assert load_checkpoint(str(tmp_path))[2]["step"] == 10
    _run(None, tmp_path, resume=True)
    _assert_same_run(ref_dir, tmp_path)
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert steps == list(range(1, 21)), "the log repeats or misses steps after the resume"


def test_checkpoint_is_pickle_free_and_has_json_twin(straight):
    run_dir, _ = straight
    with np.load(run_dir / "checkpoint.npz", allow_pickle=False) as npz:
        assert "meta" in npz.files and "opt/t" in npz.files
        assert any(f.startswith("param/") for f in npz.files)
    meta = json.load(open(run_dir / "checkpoint.json"))
    assert meta["step"] == 20 and meta["config"]["preset"] == "test"
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")], "a temporary file was left"


def _copy_run(src, dst):
    dst.mkdir(exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())


@pytest.mark.parametrize("damage", ["truncated", "flipped-bytes", "empty", "missing"])
def test_damaged_checkpoint_gets_a_clear_error(straight, tmp_path, damage):
    _copy_run(straight[0], tmp_path)
    path = tmp_path / "checkpoint.npz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flipped-bytes":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                         + data[middle + 64:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="checkpoint"):
        _run(None, tmp_path, resume=True)


def test_config_mismatch_on_resume_names_the_field(straight, tmp_path):
    _copy_run(straight[0], tmp_path)
    with pytest.raises(CheckpointError, match="model.d_model: checkpoint 16, requested 32"):
        _run(preset("test", steps=20, d_model=32), tmp_path, resume=True)
    # bookkeeping fields may change
    _run(preset("test", steps=20, eval_interval=7), tmp_path, resume=True)


def test_same_command_again_continues_a_different_one_is_refused(straight, tmp_path):
    _copy_run(straight[0], tmp_path)
    with pytest.raises(CheckpointError, match="different run.*seed: existing 0, requested 1"):
        _run(preset("test", steps=20, seed=1), tmp_path)
    lines = []
    result = train(preset("test", steps=20), str(tmp_path), quiet=True, print_fn=lines.append)
    assert result.step == 20 and "already holds this run" in lines[0]
    _assert_same_run(straight[0], tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = preset("test", steps=20, checkpoint_interval=5)
    calls = {"n": 0}
    real = loop_module.loss_and_grads

    def poisoned(model, task, batch):
        calls["n"] += 1
        loss, grads = real(model, task, batch)
        return (float("nan") if calls["n"] == 8 else loss), grads
    monkeypatch.setattr(loop_module, "loss_and_grads", poisoned)
    with pytest.raises(TrainingDiverged, match="step 8.*last good checkpoint \\(step 5\\)"):
        _run(cfg, tmp_path)
    params, _, meta = load_checkpoint(str(tmp_path))
    assert meta["step"] == 5
    assert all(np.isfinite(p).all() for p in params.values())


# ---------------------------------------------------------------- data

def test_default_corpus_needs_no_download():
    corpus = load_corpus("")
    total = len(corpus.train) + len(corpus.val)
    assert 400_000 < total < 600_000
    assert abs(len(corpus.val) / total - 0.1) < 1e-3
    assert corpus.train.dtype == np.uint8


def test_text_file_and_wikitext_and_enwik8(tmp_path):
    text = ("héllo wörld\n" * 200).encode("utf-8")
    (tmp_path / "a.txt").write_bytes(text)
    corpus = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.25)
    assert bytes(corpus.train) + bytes(corpus.val) == text
    assert len(corpus.val) == round(len(text) * 0.25)
    wiki = tmp_path / "wikitext-103"
    wiki.mkdir()
    (wiki / "wiki.train.tokens").write_bytes(b" = Title = \n train text \n")
    (wiki / "wiki.valid.tokens").write_bytes(b" valid text \n")
    (wiki / "wiki.test.tokens").write_bytes(b" test text \n")
    for spec in (wiki, wiki / "wiki.test.tokens"):
        corpus = load_corpus(str(spec))
        assert bytes(corpus.val) == b" valid text \n" and bytes(corpus.train).startswith(b" = Title")
    (tmp_path / "enwik8").write_bytes(b"x" * 1000)
    with pytest.raises(DataError, match="100000000 bytes"):
        load_corpus(str(tmp_path / "enwik8"))
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8" * 10)
    with pytest.raises(DataError, match="UTF-8"):
        load_corpus(str(tmp_path / "bad.txt"))
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_batches_are_shifted_windows(rng):
    data = np.arange(200, dtype=np.uint8)
    idx, targets = sample_batch(data, 5, 17, rng)
    assert idx.shape == targets.shape == (5, 17)
    np.testing.assert_array_equal(targets[:, :-1], idx[:, 1:])
    np.testing.assert_array_equal(np.diff(idx, axis=1), 1)
    windows = list(eval_batches(data, 17, 4))
    assert sum(w[0].shape[0] for w in windows) == 199 // 17        # fixed, non-overlapping
    assert windows[1][0][0, 0] == 4 * 17


# ---------------------------------------------------------------- the command line

def test_cli_train_eval_sample(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "test", "--steps", "6", "--out", out, "--seed", "3"]) == 0
    assert json.load(open(os.path.join(out, "checkpoint.json")))["step"] == 6
    capsys.readouterr()
    assert main(["eval", out]) == 0
    line = capsys.readouterr().out
    assert "validation bits per byte" in line
    assert 0.0 < float(line.split(":")[1].split()[0]) < 9.0
    assert main(["sample", out, "--prompt", "The ", "--tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    # resume with a mismatching option: one clear line, exit 1
    assert main(["train", "--out", out, "--resume", "--seed", "4"]) == 1
    assert "seed: checkpoint 3, requested 4" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "no checkpoint.npz" in capsys.readouterr().err


def test_ctrl_c_finishes_the_step_and_checkpoints(straight, tmp_path):
    import signal

    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
    result = _run(preset("test", steps=20), tmp_path, on_step=interrupt)
    assert result.stopped == "interrupted" and result.step == 7
    assert load_checkpoint(str(tmp_path))[2]["step"] == 7
    (tmp_path / "checkpoint.npz.abc123.tmp").write_bytes(b"torn")      # a kill mid-write
    _run(None, tmp_path, resume=True)
    _assert_same_run(straight[0], tmp_path)
    assert not (tmp_path / "checkpoint.npz.abc123.tmp").exists()


def test_loss_plot_or_one_line_notice(straight, monkeypatch):
    import builtins

    from gma_np.train.runlog import RunLog
    log = RunLog(str(straight[0]))
    assert [r["step"] for r in log.records() if "val_bpb" in r] == [10, 20]
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = []
    assert log.plot(lines.append) is None
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]


# ---------------------------------------------------------------- the config: nested, flat, files

def _flat(cfg_dict):
    """The config.json form of runs written before TrainConfig nested the model: every model
    field at the top level, and no vocab_size or max_len (they were not fields then)."""
    flat = {k: v for k, v in cfg_dict.items() if k not in ("model", "decay_steps")}
    flat.update({k: v for k, v in cfg_dict["model"].items() if k not in ("vocab_size", "max_len")})
    return flat


def test_config_json_is_nested_and_reads_back(straight):
    run_dir, _ = straight
    written = json.load(open(run_dir / "config.json"))
    assert written["model"]["d_model"] == 16 and written["model"]["max_len"] == written["context"]
    assert "d_model" not in written
    assert TrainConfig.from_dict(written) == preset("test", steps=20)
    assert json.load(open(run_dir / "checkpoint.json"))["config"] == written


def test_flat_config_of_an_earlier_run_resumes_and_evaluates(straight, tmp_path, capsys):
    cfg = preset("test", steps=20)
    assert TrainConfig.from_dict(_flat(cfg.to_dict())) == cfg
    # an earlier run: its checkpoint records the flat config
    params, opt, meta = load_checkpoint(str(straight[0]))
    save_checkpoint(str(tmp_path), params, opt, dict(meta, config=_flat(meta["config"])))
    (tmp_path / "config.json").write_text(json.dumps(_flat(meta["config"])))
    assert main(["eval", str(tmp_path)]) == 0
    assert "validation bits per byte" in capsys.readouterr().out
    result = _run(preset("test", steps=24), tmp_path, resume=True)       # resumed and extended
    assert result.step == 24
    assert json.load(open(tmp_path / "config.json"))["model"]["d_model"] == 16   # rewritten nested


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"'stpes' \(did you mean 'steps'\?\).*'model\.d_modle'"):
        TrainConfig.from_dict({"stpes": 3, "model": {"d_modle": 8}})
    with pytest.raises(ConfigError, match="d_model given twice"):
        TrainConfig.from_dict({"d_model": 8, "model": {"d_model": 16}})
    with pytest.raises(ConfigError, match="model.max_len: expected the context, 64, got 32"):
        TrainConfig.from_dict({"context": 64, "model": {"max_len": 32}})
    with pytest.raises(ConfigError, match="model.vocab_size: expected 256"):
        TrainConfig.from_dict({"model": {"vocab_size": 100}})
    with pytest.raises(TypeError, match="model.learn_temperature: expected bool, got int 1"):
        preset("test", learn_temperature=1)
    with pytest.raises(ConfigError, match="preset: expected one of"):
        preset("huge")
    assert preset("tiny", context=64).model.max_len == 64        # max_len follows the context


def test_config_file_then_flags(straight, tmp_path):
    # the run's own config.json as --config reproduces the run bit for bit
    assert main(["train", "--config", str(straight[0] / "config.json"),
                 "--out", str(tmp_path / "again")]) == 0
    _assert_same_run(straight[0], tmp_path / "again")
    # a partial file over its preset, and a flag over the file
    (tmp_path / "part.json").write_text(json.dumps(
        {"preset": "test", "steps": 6, "lr": 0.002, "model": {"d_model": 24, "covariance": "spherical"}}))
    assert main(["train", "--config", str(tmp_path / "part.json"), "--steps", "4",
                 "--out", str(tmp_path / "part")]) == 0
    got = TrainConfig.from_dict(json.load(open(tmp_path / "part" / "config.json")))
    assert got == preset("test", steps=4, lr=0.002, d_model=24, covariance="spherical")


# ---------------------------------------------------------------- extending and pausing a run

def test_extending_keeps_the_cosine_end_and_matches_a_straight_run(straight, tmp_path, capsys):
    """20 steps extended to 40 == 40 straight steps with decay_steps=20, bit for bit; the added
    steps run at the floor lr * min_lr_ratio; --stop-after pauses the extension in the middle."""
    reference = tmp_path / "straight40"
    _run(preset("test", steps=40, decay_steps=20), reference)
    _copy_run(straight[0], tmp_path / "extended")
    out = str(tmp_path / "extended")
    assert main(["train", "--out", out, "--resume", "--steps", "40", "--stop-after", "7"]) == 0
    printed = capsys.readouterr().out
    assert "steps 20 -> 40" in printed and "stays there to step 40" in printed
    assert load_checkpoint(out)[2]["step"] == 27
    assert main(["train", "--out", out, "--resume"]) == 0
    _assert_same_run(reference, out)
    cfg = preset("test")
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "extended" / "log.jsonl"))
           if "lr" in r}
    assert sorted(lrs) == list(range(1, 41))
    assert all(lrs[s] == cfg.lr * cfg.min_lr_ratio for s in range(21, 41))
    assert lrs[19] > cfg.lr * cfg.min_lr_ratio
    saved = TrainConfig.from_dict(json.load(open(tmp_path / "extended" / "config.json")))
    assert (saved.steps, saved.decay_steps) == (40, 20)


def test_decay_steps_on_resume_moves_the_cosine_end(straight, tmp_path):
    from gma_np.optim import lr_at
    _copy_run(straight[0], tmp_path)
    _run(preset("test", steps=30, decay_steps=30), tmp_path, resume=True)
    cfg = preset("test")
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r}
    for step in (21, 25, 30):
        assert lrs[step] == lr_at(step - 1, cfg.lr, cfg.warmup_steps, 30, cfg.min_lr_ratio)
    assert lrs[21] > 2 * cfg.lr * cfg.min_lr_ratio        # the rise the help warns about


def test_cannot_shorten_below_the_current_step(straight, tmp_path, capsys):
    _copy_run(straight[0], tmp_path)
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "10"]) == 1
    err = capsys.readouterr().err
    assert "steps" in err and "is at step 20" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="add --resume to extend it"):
        _run(preset("test", steps=40), tmp_path)          # without --resume: refused, with the hint


def test_stop_after_from_the_command_line_then_resume_is_bit_identical(straight, tmp_path):
    out = str(tmp_path)
    assert main(["train", "--preset", "test", "--out", out, "--stop-after", "7"]) == 0
    assert load_checkpoint(out)[2]["step"] == 7
    assert main(["train", "--out", out, "--resume", "--stop-after", "100"]) == 0
    _assert_same_run(straight[0], tmp_path)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="stop_after"):
            _run(preset("test"), tmp_path / "x", stop_after=bad)


# ---------------------------------------------------------------- file modes follow the umask

@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
def test_run_files_respect_the_umask(tmp_path):
    from gma_np.train.checkpoint import atomic_write
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            path = tmp_path / f"f{umask:o}"
            atomic_write(str(path), lambda f: f.write(b"x"))
            assert path.stat().st_mode & 0o777 == mode, (oct(umask), oct(path.stat().st_mode))
        os.umask(0o027)
        _run(preset("test", steps=2), tmp_path / "run")
    finally:
        os.umask(old)
    modes = {name: (tmp_path / "run" / name).stat().st_mode & 0o777
             for name in os.listdir(tmp_path / "run")}
    assert {"checkpoint.npz", "checkpoint.json", "config.json", "log.jsonl"} <= set(modes)
    assert all(mode == 0o640 for mode in modes.values()), {n: oct(m) for n, m in modes.items()}


# ---------------------------------------------------------------- every mixer through the trainer

@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_cli_trains_evaluates_and_samples_every_mixer(mixer, tmp_path, capsys):
    out = str(tmp_path / mixer)
    assert main(["train", "--preset", "test", "--mixer", mixer, "--steps", "4", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"({mixer} mixer)" in printed and "parameters" in printed
    meta = json.load(open(os.path.join(out, "checkpoint.json")))
    assert meta["config"]["model"]["mixer"] == mixer
    assert any(name.startswith(f"h0.{mixer}.") for name in meta["params"])
    assert main(["eval", out]) == 0
    assert "validation bits per byte" in capsys.readouterr().out
    assert main(["sample", out, "--prompt", "ab", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_unknown_mixer_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "test", "--mixer", "flash"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--mixer" in err and "expected one of" in err and "Traceback" not in err


def test_performer_buffers_are_checkpointed_and_redrawn_exactly(tmp_path):
    """The random projections live in the checkpoint; redrawn every 3 steps from the seed and
    the step, a paused and resumed run equals a straight one bit for bit."""
    cfg = preset("test", steps=8, checkpoint_interval=4, mixer="performer", feature_redraw=3)
    straight_dir, paused_dir = tmp_path / "straight", tmp_path / "paused"
    _run(cfg, straight_dir)
    _run(cfg, paused_dir, stop_after=4)
    _run(cfg, paused_dir, resume=True)
    _assert_same_run(straight_dir, paused_dir)
    name = "h0.performer.projections"
    final = load_checkpoint(str(straight_dir))[0][name]
    assert np.array_equal(load_checkpoint(str(paused_dir))[0][name], final)
    # the redraws (steps 3 and 6) changed the projections from their initial draw
    fresh = LanguageModel(cfg.model_config(), seed=cfg.seed)
    assert not np.array_equal(final, fresh.buffers[name])


# ---------------------------------------------------------------- tasks through the trainer

# Tiny parameters of each generated task: a step takes milliseconds, a split is drawn in
# well under a second.
TASK_ARGS = {
    "listops": dict(min_len=5, max_len=20, max_depth=4, max_args=4, n_train=60, n_val=12, n_test=12),
    "recall": dict(seq_len=24, n_pairs=4, vocab_size=40, n_val=20, n_test=20),
    "copying": dict(region_len=12, n_tokens=3, vocab_size=8, n_val=20, n_test=20),
}


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    """Generated splits go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("GMA_NP_CACHE", str(tmp_path_factory.getbasetemp() / "task-cache"))


def _task_flags(name):
    return [f for k, v in TASK_ARGS[name].items() for f in ("--task-param", f"{k}={v}")]


def test_lm_task_batches_are_the_trainers():
    """The lm task draws exactly the windows gma_np.train.data.sample_batch draws from the same
    Generator, and its evaluation windows are eval_batches' (max_examples = max_tokens // N)."""
    from gma_np.tasks import get_task
    cfg = preset("test")
    task = get_task("lm", **cfg.task_kwargs())
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):
        batch = task.sample_batch("train", cfg.batch_size, a)
        idx, targets = sample_batch(corpus.train, cfg.batch_size, cfg.context, b)
        assert np.array_equal(batch.tokens, idx) and np.array_equal(batch.targets, targets)
        assert batch.key_mask is None and batch.loss_mask is None
    assert a.bit_generator.state == b.bit_generator.state
    for max_tokens in (0, 512, 20):
        ours = list(task.eval_batches("val", 64, max(1, max_tokens // cfg.context) if max_tokens else 0))
        theirs = list(eval_batches(corpus.val, cfg.context, 64, max_tokens))
        assert len(ours) == len(theirs)
        for x, (idx, targets) in zip(ours, theirs):
            assert np.array_equal(x.tokens, idx) and np.array_equal(x.targets, targets)


def test_config_takes_vocabulary_and_length_from_the_task():
    cfg = preset("test", task="listops", task_params=TASK_ARGS["listops"])
    assert (cfg.model.vocab_size, cfg.model.max_len) == (17, 20)
    assert cfg.task_params == {"seed": 0, "pool": "mean", **TASK_ARGS["listops"]}   # every parameter
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    first = preset("test", task="listops", task_params={**TASK_ARGS["listops"], "pool": "first"})
    assert (first.model.vocab_size, first.model.max_len) == (18, 21)
    rc = preset("test", task="recall", task_params=TASK_ARGS["recall"])
    assert (rc.model.vocab_size, rc.model.max_len) == (40, 24)
    assert rc.task_params["power_a"] == 0.01
    assert preset("test", task="recall", task_params=TASK_ARGS["recall"], max_len=30).model.max_len == 30
    lm = preset("test")
    assert lm.task == "lm" and lm.task_params == {"dataset": None, "dataset_params": {}}
    # a config written before tasks existed is a language-model run
    old = {k: v for k, v in lm.to_dict().items() if k not in ("task", "task_params")}
    assert TrainConfig.from_dict(old) == lm


@pytest.mark.parametrize("bad, match", [
    (dict(task="listops", mixer="mamba", task_params={"pool": "first"}),
     "model.mixer: 'mamba' is causal only, and task 'listops' with pool='first' needs a bidirectional"),
    (dict(task="listops", task_params={"min_len": 0}), "task_params.min_len: expected an integer >= 1"),
    (dict(task="listops", task_params={"min_lenn": 5}),
     "task_params.min_lenn: task 'listops' has no such parameter \\(did you mean 'min_len'\\?\\)"),
    (dict(task="recall", task_params={"seq_len": 25}), "task_params.seq_len: expected an even number"),
    (dict(task="recall", task_params={"n_pairs": 3, "seq_len": 8}), "task_params.n_pairs: expected at most"),
    (dict(task="copying", task_params={"n_tokens": 0}), "task_params.n_tokens"),
    (dict(task="copying", data="corpus.txt"), "data: task 'copying' reads no corpus"),
    (dict(task="recall", task_params=TASK_ARGS["recall"], max_len=16), "model.max_len: expected at least 24"),
    (dict(task="recall", vocab_size=256, task_params={"vocab_size": 40}),
     "model.vocab_size: expected 40 \\(task 'recall'\\)"),
    (dict(task="listop"), "task: expected one of lm, listops, recall, copying"),
    (dict(task="lm", task_params={"context": 16}), "task_params.context: .*top-level field"),
    (dict(task="lm", task_params={"dataset": "enwik9"}), "task_params.dataset: expected one of"),
    (dict(task_params=[1, 2]), "task_params: expected an object"),
])
def test_task_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        preset("test", **bad)


def test_a_later_layer_naming_another_task_drops_the_earlier_task_params():
    from gma_np.train.config import merge
    merged = merge({"task": "listops", "task_params": {"min_len": 9}}, {"task_params": {"max_len": 30}})
    assert merged["task_params"] == {"min_len": 9, "max_len": 30}
    merged = merge({"task": "listops", "task_params": {"min_len": 9}}, {"task": "recall"})
    assert merged["task"] == "recall" and merged["task_params"] == {}


@pytest.mark.parametrize("mixer", ["gma", "linear"])
@pytest.mark.parametrize("name", sorted(TASK_ARGS))
def test_cli_trains_and_evaluates_every_task(name, mixer, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--preset", "test", "--task", name, "--mixer", mixer, "--steps", "3",
            "--out", out] + _task_flags(name)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"({mixer} mixer{', bidirectional' if name == 'listops' else ''})" in printed
    base = {"listops": "majority class", "recall": "1 / n_pairs", "copying": "chance"}[name]
    assert "baseline to beat: " in printed and base in printed.split("baseline to beat: ")[1]
    meta = json.load(open(os.path.join(out, "checkpoint.json")))
    assert meta["config"]["task"] == name and meta["step"] == 3
    metric = "accuracy" if name == "listops" else "answer_accuracy"
    vals = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "val_loss" in r]
    # GMA also logs its routing usage (on ListOps over the real tokens, bidirectionally)
    usage = ({"eff_components", "eff_components_min", "token_entropy", "dead_q", "dead_k"}
             if mixer == "gma" else set())
    assert vals and set(vals[-1]) == {"step", f"val_{metric}", "val_loss", "elapsed_s"} | usage
    assert 0.0 <= vals[-1][f"val_{metric}"] <= 1.0
    assert meta[f"val_{metric}"] == pytest.approx(vals[-1][f"val_{metric}"], abs=1e-6)   # the log rounds
    assert ("cls.W" in meta["params"]) == (name == "listops")
    assert main(["eval", out]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"validation {metric.replace('_', ' ')}: ")
    assert 0.0 <= float(line.split(":")[1].split()[0]) <= 1.0
    assert main(["eval", out, "--split", "test"]) == 0
    assert capsys.readouterr().out.startswith("test ")
    assert main(["sample", out, "--prompt", "ab"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a {name!r} run" in err[0] and "task lm" in err[0]


def test_cli_trains_mamba_on_listops_left_to_right(tmp_path, capsys):
    """A causal-only mixer on the bidirectional task: trained, evaluated (gma-np eval gives
    the logged figure: both run the body causally) and resumed through the same path."""
    out = str(tmp_path / "run")
    args = ["train", "--preset", "test", "--task", "listops", "--mixer", "mamba", "--steps", "3",
            "--out", out] + _task_flags("listops")
    assert main(args) == 0
    assert "(mamba mixer, causal (a causal-only mixer on a bidirectional task))" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "checkpoint.json")))
    assert main(["eval", out]) == 0
    shown = float(capsys.readouterr().out.split(":")[1].split()[0])
    assert shown == pytest.approx(meta["val_accuracy"], abs=1e-3)


def test_listops_resume_is_bit_identical(tmp_path):
    cfg = preset("test", task="listops", task_params=TASK_ARGS["listops"], steps=12,
                 checkpoint_interval=4, eval_interval=4)
    _run(cfg, tmp_path / "straight")
    _run(cfg, tmp_path / "paused", stop_after=5)
    result = _run(None, tmp_path / "paused", resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "paused")
    log = [r for r in map(json.loads, open(tmp_path / "paused" / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 13))
    straight = [r for r in map(json.loads, open(tmp_path / "straight" / "log.jsonl"))
                if "val_accuracy" in r]
    assert result.val_metric == straight[-1]["val_accuracy"] and result.metric == "accuracy"
    assert np.isnan(result.val_bpb)


def test_task_flags_and_default_preset(tmp_path, capsys):
    from gma_np.train.commands import default_preset
    assert default_preset("listops") == "listops-cpu" and default_preset(None) == "tiny"
    assert default_preset("lm") == "tiny"
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "test", "--task", "recall", "--steps", "2", "--out", out,
                 "--task-param", "seq_len=24", "--task-param", "n_pairs=4",
                 "--task-param", "vocab_size=40", "--task-param", "power_a=0.5"]) == 0
    saved = TrainConfig.from_dict(json.load(open(os.path.join(out, "config.json"))))
    assert saved.task_params["power_a"] == 0.5 and saved.model.vocab_size == 40
    capsys.readouterr()
    for args, named in ((["--task-param", "seq_len"], "--task-param"),
                        (["--task", "listop"], "--task")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--preset", "test"] + args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--preset", "test", "--task", "listops", "--mixer", "mamba",
                 "--task-param", "pool=first", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'mamba' is causal only" in err[0]
    assert main(["eval", out, "--data", "x.txt"]) == 1
    assert "reads no corpus" in capsys.readouterr().err


def test_each_task_preset_is_valid():
    from gma_np.train.config import PRESETS
    for name in ("listops-cpu", "recall-cpu", "copying-cpu"):
        cfg = preset(name)
        assert cfg.task == name.split("-")[0] and name in PRESETS
        assert cfg.model.max_len == cfg.task_spec().seq_len


# =============================================================================================
# The training step as a whole, and the checkpoint's own checks (added with the mutation
# check, docs/testing.md). Clipping and AdamW are each tested alone in tests/test_optim.py,
# and resume compares two runs of the same loop: here, what the optimizer receives from the
# step before it, so that clipping in the wrong place or a shifted schedule cannot pass.
# =============================================================================================

import copy as _copy  # noqa: E402

from gma_np.optim import AdamW, clip_grad_norm, global_norm, lr_at  # noqa: E402
from gma_np.train.checkpoint import remove_stale_temporaries  # noqa: E402


def _spy_on_steps(monkeypatch):
    """Per step: the gradient loss_and_grads returned, the gradient and lr AdamW.step got, the
    optimizer and parameters just before the step and the parameters after it (copies)."""
    steps = []
    real_grads, real_step = loop_module.loss_and_grads, AdamW.step

    def loss_and_grads(model, task, batch):
        loss, grads = real_grads(model, task, batch)
        steps.append({"raw": {n: g.copy() for n, g in grads.items()}})
        return loss, grads

    def step(self, params, grads, lr):
        steps[-1].update(given={n: np.array(g, copy=True) for n, g in grads.items()}, lr=lr,
                         opt=_copy.deepcopy(self), before={n: p.copy() for n, p in params.items()})
        real_step(self, params, grads, lr)
        steps[-1]["after"] = {n: p.copy() for n, p in params.items()}

    monkeypatch.setattr(loop_module, "loss_and_grads", loss_and_grads)
    monkeypatch.setattr(AdamW, "step", step)
    return steps, real_step


def test_the_optimizer_gets_the_clipped_gradient_at_the_steps_learning_rate(tmp_path, monkeypatch):
    """Clipping on (grad_clip far below the norm): every step hands AdamW the gradient clipped
    to grad_clip, at lr_at(step), and the parameters become AdamW's update by that gradient."""
    cfg = preset("test", steps=4, grad_clip=1e-3, warmup_steps=3)
    steps, real_step = _spy_on_steps(monkeypatch)
    _run(cfg, tmp_path)
    assert len(steps) == 4
    for s, rec in enumerate(steps):
        assert global_norm(rec["raw"]) > 10 * cfg.grad_clip, "clipping was not active"
        clipped = {n: g.copy() for n, g in rec["raw"].items()}
        clip_grad_norm(clipped, cfg.grad_clip)
        assert global_norm(rec["given"]) == pytest.approx(cfg.grad_clip, rel=1e-6), f"step {s}"
        for name in clipped:
            assert np.array_equal(rec["given"][name], clipped[name]), f"step {s}: d{name} not clipped"
        assert rec["lr"] == lr_at(s, cfg.lr, cfg.warmup_steps, cfg.schedule_steps, cfg.min_lr_ratio)
        params = {n: p.copy() for n, p in rec["before"].items()}
        real_step(rec["opt"], params, clipped, rec["lr"])
        for name in params:
            assert np.array_equal(params[name], rec["after"][name]), f"step {s}: {name}"


def test_a_step_with_clipping_differs_from_one_without(tmp_path, monkeypatch):
    """The same 3 steps with clipping off (grad_clip = 0): AdamW gets the raw gradient and the
    parameters end elsewhere than with clipping on."""
    steps, _ = _spy_on_steps(monkeypatch)
    _run(preset("test", steps=3, grad_clip=0.0), tmp_path / "off")
    for rec in steps:
        for name in rec["raw"]:
            assert np.array_equal(rec["given"][name], rec["raw"][name]), name
    off = steps[-1]["after"]
    steps.clear()
    _run(preset("test", steps=3, grad_clip=1e-3), tmp_path / "on")
    on = steps[-1]["after"]
    assert any(not np.array_equal(off[n], on[n]) for n in off)


def test_a_checkpoint_holding_nan_is_refused(tmp_path):
    params = {"w": np.array([1.0, np.nan]), "b": np.zeros(2)}
    save_checkpoint(str(tmp_path), params, {"t": np.array(1)}, {"step": 1, "config": {}, "rng": {}})
    with pytest.raises(CheckpointError, match="parameter 'w' holds NaN or inf"):
        load_checkpoint(str(tmp_path))


def test_the_temporaries_of_a_killed_write_are_removed(tmp_path):
    """What atomic_write leaves when killed mid-write, for each file it writes; nothing else."""
    stale = ["checkpoint.npz.1a2b3c4d.tmp", "checkpoint.json.00ff00ff.tmp", "log.jsonl.deadbeef.tmp",
             "config.json.0badf00d.tmp"]
    kept = ["checkpoint.npz", "notes.tmp", "log.jsonl"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


# ---------------------------------------------------------------- routing usage in the run log

def test_gma_runs_log_routing_usage_at_every_evaluation(straight):
    """Every validation line of a GMA run carries the routing usage, equal to the summary
    recomputed from the final checkpoint on the same windows; another mixer's has none."""
    from gma_np.analysis.collect import usage_summary
    from gma_np.train.loop import USAGE_WINDOWS, build_task, restore
    run_dir, _ = straight
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "log.jsonl"))]
    evals = [l for l in lines if "val_bpb" in l]
    assert evals and all("eff_components" in l and "dead_k" in l for l in evals)
    cfg, model, _, _, _, _ = restore(str(run_dir))
    final = evals[-1]
    task = build_task(cfg)
    batch = next(iter(task.eval_batches("val", USAGE_WINDOWS, USAGE_WINDOWS)))
    expected = usage_summary(model, batch.tokens)
    assert {k: final[k] for k in expected} == expected
    assert 1.0 <= final["eff_components"] <= cfg.model.n_components


def test_listops_gma_run_logs_routing_usage_over_its_real_tokens(tmp_path):
    """On a bidirectional padded task the logged usage is the summary of the body run as
    trained (bidirectionally) over the real tokens only."""
    from gma_np.analysis.collect import usage_summary
    from gma_np.train.loop import USAGE_WINDOWS, build_task, restore
    _run(preset("test", task="listops", task_params=TASK_ARGS["listops"], steps=4,
                eval_interval=2), tmp_path)
    evals = [json.loads(l) for l in open(tmp_path / "log.jsonl") if "val_accuracy" in l]
    assert len(evals) == 2 and all("eff_components" in l for l in evals)
    cfg, model, _, _, _, _ = restore(str(tmp_path))
    batch = next(iter(build_task(cfg).eval_batches("val", USAGE_WINDOWS, USAGE_WINDOWS)))
    assert not batch.key_mask.all()
    expected = usage_summary(model, batch.tokens, causal=False, key_mask=batch.key_mask)
    assert {k: evals[-1][k] for k in expected} == expected
    assert expected != usage_summary(model, batch.tokens, causal=False)    # padding would count


def test_other_mixers_log_no_routing_usage(tmp_path):
    _run(preset("test", steps=4, eval_interval=2, mixer="linear"), tmp_path)
    evals = [json.loads(l) for l in open(tmp_path / "log.jsonl") if "val_bpb" in l]
    assert evals and not any("eff_components" in l for l in evals)


# ---------------------------------------------------------------- the batch's shards

def _task_model(name, dtype="float64", seed=0):
    kw = {} if name == "lm" else dict(task=name, task_params=TASK_ARGS[name])
    cfg = preset("test", seed=seed, **kw)
    cfg.model.dtype = dtype
    task = loop_module.build_task(cfg)
    model, _ = loop_module.build(cfg, task.head)
    return task, model


def _assert_grads_close(got, ref, rtol, what):
    """Each gradient within rtol of its largest entry; a bias's within rtol of its weight's
    (softmax attention's key bias has a zero gradient but for rounding)."""
    assert got.keys() == ref.keys(), what
    for name in ref:
        assert got[name].dtype == ref[name].dtype, f"{what}: {name} dtype"
        head, _, last = name.rpartition(".")
        weight = f"{head}.W{last[1:]}" if last.startswith("b") else name
        scale = max(float(np.abs(ref[name]).max()), 1e-300,
                    float(np.abs(ref[weight]).max()) if weight in ref else 0.0)
        err = float(np.abs(got[name] - ref[name]).max()) / scale
        assert err <= rtol, f"{what}: {name} off by {err:.2e} of its largest entry"


@pytest.mark.parametrize("name", ["lm", "listops", "recall", "copying"])
def test_the_sharded_step_is_the_whole_batchs_step(name):
    """loss_and_grads cuts an odd batch (5 rows: shards of 2 and 3) into BATCH_SHARDS
    shards; in float64 its loss and every gradient are the whole batch's
    (_shard_loss_and_grads with dloss 1) to 1e-12 of each gradient's largest entry, on the
    language model, the classifier (listops, a key mask) and the masked tasks."""
    task, model = _task_model(name)
    batch = task.sample_batch("train", 5, np.random.default_rng(1))
    assert len(loop_module._shards(batch)) == loop_module.BATCH_SHARDS == 2
    loss, grads = loop_module.loss_and_grads(model, task, batch)
    ref_loss, ref_grads = loop_module._shard_loss_and_grads(model, task, batch, 1.0)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    _assert_grads_close(grads, ref_grads, 1e-12, name)


def test_shards_scoring_unequal_counts_are_weighted_by_them():
    """A loss mask scoring 1 target in one shard and 9 in the other: each shard's mean
    counts by its share of the targets (a plain average of the two means would not)."""
    task, model = _task_model("lm")
    batch = task.sample_batch("train", 4, np.random.default_rng(2))
    mask = np.zeros(batch.tokens.shape, dtype=bool)
    mask[0, 3] = True                                   # shard 0 (rows 0, 1): one target
    mask[2, :5] = mask[3, 7:11] = True                  # shard 1 (rows 2, 3): nine
    masked = batch._replace(loss_mask=mask)
    loss, grads = loop_module.loss_and_grads(model, task, masked)
    ref_loss, ref_grads = loop_module._shard_loss_and_grads(model, task, masked, 1.0)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    _assert_grads_close(grads, ref_grads, 1e-12, "unequal shards")
    halves = [loop_module._shard_loss_and_grads(model, task, masked._replace(
        **{f: getattr(masked, f)[r] for f in ("tokens", "targets", "loss_mask")}), 1.0)[0]
        for r in (slice(0, 2), slice(2, 4))]
    assert abs(0.5 * sum(halves) - ref_loss) > 1e-3     # the weights matter here


def test_a_shard_without_scored_targets_leaves_the_batch_whole():
    """Rows 0 and 1 score nothing: a shard of them would be 0 / 0, so the batch is one
    shard, and a one-row batch is one shard too."""
    task, model = _task_model("lm")
    batch = task.sample_batch("train", 4, np.random.default_rng(3))
    mask = np.zeros(batch.tokens.shape, dtype=bool)
    mask[2:] = True
    masked = batch._replace(loss_mask=mask)
    assert loop_module._shards(masked) == [slice(0, 4)]
    loss, grads = loop_module.loss_and_grads(model, task, masked)
    assert np.isfinite(loss)
    ref_loss, ref_grads = loop_module._shard_loss_and_grads(model, task, masked, 1.0)
    assert loss == ref_loss
    for g in ref_grads:
        np.testing.assert_array_equal(grads[g], ref_grads[g])
    one = task.sample_batch("train", 1, np.random.default_rng(4))
    assert loop_module._shards(one) == [slice(0, 1)]


def test_the_sharded_step_is_the_same_bits_at_one_and_two_threads():
    """The shards run concurrently when Numba has two threads and one after the other on
    one: the same loss and gradients, bit for bit (float32, the trainer's dtype)."""
    import numba
    if min(2, numba.config.NUMBA_NUM_THREADS) < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one thread or one core: the shards cannot run concurrently here")
    task, model = _task_model("lm", dtype="float32")
    batch = task.sample_batch("train", 6, np.random.default_rng(5))
    runs = []
    threads = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            runs.append(loop_module.loss_and_grads(model, task, batch))
    finally:
        numba.set_num_threads(threads)
    (l1, g1), (l2, g2) = runs
    assert l1 == l2
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name], err_msg=name)


def test_train_keeps_freed_memory_where_glibc_allows(tmp_path, monkeypatch):
    """train() sets the C allocator to keep freed blocks (gma_np._allocator) before its first
    step; on glibc both thresholds are accepted, and a second call is a no-op."""
    import platform
    from gma_np import _allocator
    calls = []
    real = loop_module.keep_freed_memory
    monkeypatch.setattr(loop_module, "keep_freed_memory", lambda: calls.append(1) or real())
    _run(preset("test", steps=1), tmp_path)
    assert calls == [1]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _allocator.keep_freed_memory() is True
        assert _allocator._APPLIED == [True]


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_the_sharded_step_is_the_whole_batchs_for_every_mixer(mixer):
    """Every mixer's kernels run on the two shards' threads at once: float64, loss and
    gradients within 1e-12 of the whole batch's (5 rows: shards of 2 and 3)."""
    cfg = preset("test", mixer=mixer)
    cfg.model.dtype = "float64"
    task = loop_module.build_task(cfg)
    model, _ = loop_module.build(cfg, task.head)
    batch = task.sample_batch("train", 5, np.random.default_rng(6))
    loss, grads = loop_module.loss_and_grads(model, task, batch)
    ref_loss, ref_grads = loop_module._shard_loss_and_grads(model, task, batch, 1.0)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    _assert_grads_close(grads, ref_grads, 1e-12, mixer)
