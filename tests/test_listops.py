"""ListOps (gma_np.tasks.listops): the generator, every label by the evaluator, splits, the cache."""

import os
import warnings

import numpy as np
import pytest

from gma_np.tasks import listops as LO

SMALL = dict(min_len=12, max_len=45, max_depth=6, max_args=7, n_train=300, n_val=60, n_test=60)


@pytest.fixture(scope="module")
def small():
    return LO.build(seed=5, **SMALL)


def _examples(task, split):
    return [task.example(split, i) for i in range(task.n_examples(split))]


def test_every_label_is_the_evaluators_and_every_example_is_well_formed(small):
    p = small.list_params
    for split in small.splits:
        for tokens, label in _examples(small, split):
            parsed = LO.evaluate_tokens(tokens)
            assert parsed.value == label, LO.decode(tokens)
            assert p.min_len <= len(tokens) <= p.max_len
            assert parsed.depth <= p.max_depth
            assert all(2 <= n <= p.max_args for _, n in parsed.operators)
            # brackets are tokens: one "[" before and one "]" after every operator
            n_ops = len(parsed.operators)
            assert (tokens == LO.OPEN).sum() == n_ops == (tokens == LO.CLOSE).sum()
            assert np.all(tokens[np.flatnonzero(tokens == LO.OPEN) + 1] >= LO.OP0)


def test_no_duplicates_within_or_across_splits(small):
    keys = [bytes(t.astype(np.uint8)) for s in small.splits for t, _ in _examples(small, s)]
    assert len(keys) == SMALL["n_train"] + SMALL["n_val"] + SMALL["n_test"]
    assert len(set(keys)) == len(keys)


def test_deterministic_from_the_seed(small):
    again = LO.build(seed=5, **SMALL)
    other = LO.build(seed=6, **SMALL)
    for split in small.splits:
        for a, b in zip(small.data[split], again.data[split]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(small.data["val"][0][:40], other.data["val"][0][:40])


def test_operators_and_digits_are_all_drawn(small):
    tokens = small.data["train"][0]
    counts = np.bincount(tokens, minlength=LO.CLS + 1)
    assert counts[LO.DIGIT0:LO.DIGIT0 + 10].min() > 0
    ops = counts[LO.OP0:LO.OP0 + 4] / counts[LO.OP0:LO.OP0 + 4].sum()
    assert np.all(np.abs(ops - 0.25) < 0.04), ops                # each operator is uniform
    assert counts[LO.PAD] == 0 and counts[LO.CLS] == 0


@pytest.mark.parametrize("args, med", [([3, 4], 3), ([1, 3, 6, 8], 4), ([9, 0, 5], 5), ([7], 7),
                                       ([2, 2, 9, 9], 5), ([0, 1], 0)])
def test_median_is_rounded_down(args, med):
    assert LO.apply_operator("MED", args) == med == int(np.median(args))


def test_operators_against_numpy(rng):
    for _ in range(200):
        args = rng.integers(0, 10, rng.integers(1, 11)).tolist()
        assert LO.apply_operator("MIN", args) == min(args)
        assert LO.apply_operator("MAX", args) == max(args)
        assert LO.apply_operator("MED", args) == int(np.floor(np.median(args)))
        assert LO.apply_operator("SM", args) == sum(args) % 10


def _ids(text):
    return [LO.TOKEN_NAMES.index(w) for w in text.split()]


def test_the_closing_brackets_decide_the_label():
    # the same tokens without "]" would be one sequence for two different labels
    a, b = "[ MAX 1 [ MIN 2 3 ] 4 ]", "[ MAX 1 [ MIN 2 3 4 ] ]"
    assert [t for t in _ids(a) if t != LO.CLOSE] == [t for t in _ids(b) if t != LO.CLOSE]
    assert LO.evaluate_tokens(_ids(a)).value == 4
    assert LO.evaluate_tokens(_ids(b)).value == 2
    assert LO.evaluate_tokens(_ids("[ SM [ MED 3 8 1 6 ] 5 9 ]")).value == 8
    parsed = LO.evaluate_tokens(_ids("[ SM [ MED 3 8 1 6 ] 5 9 ]"))
    assert parsed.depth == 3 and parsed.operators == [("MED", 4), ("SM", 3)]


@pytest.mark.parametrize("text, match", [("[ MAX 1 2", "not closed"), ("[ 1 2 ]", "operator after"),
                                         ("[ MIN ]", "no argument"), ("1 2", "ends at token 0"),
                                         ("[ MAX 1 ] ]", "ends at token"), ("]", "closes nothing"),
                                         ("", "empty")])
def test_evaluator_rejects_malformed_expressions(text, match):
    with pytest.raises(ValueError, match=match):
        LO.evaluate_tokens(_ids(text))
    with pytest.raises(ValueError, match="got id 0"):
        LO.evaluate_tokens([LO.OPEN, LO.OP0, LO.DIGIT0, LO.PAD, LO.CLOSE])


def test_batches_pad_at_the_end_with_a_key_mask(small):
    rng = np.random.default_rng(0)
    batch = small.sample_batch("train", 9, rng)
    tokens, labels, key_mask, loss_mask = batch
    assert tokens.shape[0] == 9 and tokens.dtype == np.int64 and labels.shape == (9,)
    assert loss_mask is None and key_mask.dtype == bool
    for row, mask, label in zip(tokens, key_mask, labels):
        real = row[mask]
        assert np.all(row[~mask] == LO.PAD) and mask[:len(real)].all()
        assert LO.evaluate_tokens(real).value == label
    assert tokens.shape[1] == key_mask.sum(axis=1).max() <= small.seq_len
    # the evaluation batches are fixed and cover the split in order
    first = list(small.eval_batches("val", 16))
    assert [len(b.targets) for b in first] == [16, 16, 16, 12]
    np.testing.assert_array_equal(np.concatenate([b.targets for b in first]), small.data["val"][2])
    again = list(small.eval_batches("val", 16))
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, again))
    assert sum(len(b.targets) for b in small.eval_batches("test", 16, max_examples=20)) == 20


def test_class_token_pool_puts_it_first():
    task = LO.build(seed=5, pool="first", **SMALL)
    batch = task.sample_batch("val", 4, np.random.default_rng(1))
    assert np.all(batch.tokens[:, 0] == LO.CLS) and task.vocab_size == LO.CLS + 1
    assert task.seq_len == SMALL["max_len"] + 1
    assert LO.evaluate_tokens(batch.tokens[0][batch.key_mask[0]][1:]).value == batch.targets[0]


def test_second_build_reads_the_cache_without_generating(tmp_path, monkeypatch):
    first = LO.build(seed=2, cache_dir=str(tmp_path), **SMALL)
    npz, sha = LO.cache_paths(tmp_path, LO.ListOpsParams(**SMALL), 2)
    assert os.path.isfile(npz) and os.path.isfile(sha)

    def must_not_run(*a, **k):
        raise AssertionError("the generator ran although the cache holds the splits")
    monkeypatch.setattr(LO, "generate_splits", must_not_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = LO.build(seed=2, cache_dir=str(tmp_path), **SMALL)
    for split in first.splits:
        for a, b in zip(first.data[split], second.data[split]):
            np.testing.assert_array_equal(a, b)
    # other parameters or another seed: another file
    assert LO.cache_paths(tmp_path, LO.ListOpsParams(**SMALL), 3)[0] != npz
    assert LO.cache_paths(tmp_path, LO.ListOpsParams(**{**SMALL, "max_len": 46}), 2)[0] != npz


def _counting(monkeypatch):
    calls, real = [], LO.generate_splits
    monkeypatch.setattr(LO, "generate_splits", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_checksum_mismatch_regenerates_with_a_warning(tmp_path, monkeypatch):
    first = LO.build(seed=2, cache_dir=str(tmp_path), **SMALL)
    npz, sha = LO.cache_paths(tmp_path, LO.ListOpsParams(**SMALL), 2)
    data = bytearray(open(npz, "rb").read())
    data[len(data) // 2] ^= 0xFF                             # one flipped byte inside an array
    open(npz, "wb").write(bytes(data))
    calls = _counting(monkeypatch)
    with pytest.warns(UserWarning, match="checksum mismatch.*regenerating"):
        second = LO.build(seed=2, cache_dir=str(tmp_path), **SMALL)
    assert calls == [1]
    np.testing.assert_array_equal(first.data["train"][0], second.data["train"][0])
    assert LO.file_sha256(npz) == open(sha).read().split()[0]   # the cache is whole again
    os.remove(sha)
    with pytest.warns(UserWarning, match="no checksum file"):
        LO.build(seed=2, cache_dir=str(tmp_path), **SMALL)
    assert calls == [1, 1]


def test_parameter_errors_name_the_parameter(monkeypatch):
    with pytest.raises(ValueError, match="max_len: expected an integer >= 50"):
        LO.ListOpsParams(min_len=50, max_len=40)
    with pytest.raises(ValueError, match="min_len: expected at most 21"):
        LO.ListOpsParams(min_len=40, max_len=60, max_depth=3, max_args=3)
    with pytest.raises(ValueError, match="max_args"):
        LO.build(max_args=1)
    with pytest.raises(ValueError, match="pool"):
        LO.build(pool="max")
    # "[ OP d d ]" is the only form of 5 tokens: 4 * 10 * 10 = 400 distinct expressions
    monkeypatch.setattr(LO, "MAX_ATTEMPTS_PER_EXAMPLE", 30)
    with pytest.raises(ValueError, match=r"distinct expressions of 5\.\.5 tokens \(wanted 401\)"):
        LO.generate_splits(LO.ListOpsParams(min_len=5, max_len=5, max_depth=2, n_train=398,
                                            n_val=1, n_test=2), 0)


def test_stats_command_prints_the_tables(capsys, small):
    text = LO.format_stats(small)
    for title in ("| label |", "| operator |", "| depth |", "| length |", "majority-class"):
        assert title in text
    stats = LO.split_stats(small, "train")
    assert sum(stats["labels"]) == stats["n"] == SMALL["n_train"]
    assert sum(stats["depths"].values()) == stats["n"]
    assert max(stats["depths"]) <= SMALL["max_depth"]
    args = ["--stats", "--seed", "5"] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert LO.main(args) == 0
    assert capsys.readouterr().out.strip() == text
    assert LO.main(["--min-len", "9", "--max-len", "3"]) == 2
    assert "max_len" in capsys.readouterr().err
