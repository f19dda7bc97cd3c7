"""gma_np.train: exact resume, checkpoint integrity, divergence, data, the CLI. All on the `test`
preset (one layer, d_model 16, 4 x 32 tokens a step), so every run takes a second or two."""

import json
import os

import numpy as np
import pytest

from gma_np.cli import main
from gma_np.train import CheckpointError, DataError, TrainingDiverged, load_checkpoint, preset, train
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
    real = loop_module.GMALanguageModel.loss_and_grads

    def poisoned(self, idx, targets):
        calls["n"] += 1
        loss, grads = real(self, idx, targets)
        return (float("nan") if calls["n"] == 8 else loss), grads
    monkeypatch.setattr(loop_module.GMALanguageModel, "loss_and_grads", poisoned)
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
