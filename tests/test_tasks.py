"""Tasks (gma_np.tasks) and their heads (gma_np.nn.heads): every head's backward by central
differences in float64 (every element), the body + token head against the language model,
and each task's batches, sets and evaluation."""

import math

import numpy as np
import pytest

import gma_np
from gma_np.nn import heads as Hd
from gma_np.nn.model import (LanguageModel, ModelConfig, body_backward, body_forward,
                             lm_loss_backward, lm_loss_forward)
from gma_np.tasks import TASK_NAMES, get_task
from gma_np.tasks import copying as CP
from gma_np.tasks import recall as RC
from gma_np.tasks.base import Batch, add_head_grads


def _check(fun, grad, inputs):
    report = gma_np.gradcheck(fun, grad, inputs, mode="full")
    assert report.ok, str(report)
    return report


# ---------------------------------------------------------------- heads, by central differences

@pytest.mark.parametrize("masked", [False, True], ids=["all", "loss_mask"])
def test_token_head_gradcheck(rng, masked):
    B, N, D, V = 2, 5, 3, 7
    targets = rng.integers(0, V, (B, N))
    mask = (rng.random((B, N)) < 0.5) | (np.arange(N) == 2) if masked else None

    def grad(dout, h, W):
        dh, dW = Hd.token_head_backward(Hd.token_head_forward(h, W, targets, mask)[2], float(dout))
        return {"h": dh, "W": dW}
    report = _check(lambda h, W: np.array(Hd.token_head_forward(h, W, targets, mask)[0]), grad,
                    {"h": rng.standard_normal((B, N, D)), "W": rng.standard_normal((D, V))})
    assert report["h"].checked == B * N * D


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_pooled_classifier_gradcheck(rng, pool):
    B, N, D, C = 3, 6, 4, 5
    labels = rng.integers(0, C, B)
    key_mask = np.arange(N)[None, :] < np.array([6, 2, 4])[:, None]       # variable lengths

    def grad(dout, h, W, b):
        cache = Hd.pooled_classifier_forward(h, W, b, labels, key_mask, pool)[2]
        dh, dW, db = Hd.pooled_classifier_backward(cache, float(dout))
        return {"h": dh, "W": dW, "b": db}
    fun = lambda h, W, b: np.array(Hd.pooled_classifier_forward(h, W, b, labels, key_mask, pool)[0])
    _check(fun, grad, {"h": rng.standard_normal((B, N, D)), "W": rng.standard_normal((D, C)),
                       "b": rng.standard_normal(C)})
    # padding positions get no gradient and do not change the loss
    h = rng.standard_normal((B, N, D))
    loss, _, cache = Hd.pooled_classifier_forward(h, rng.standard_normal((D, C)), np.zeros(C),
                                                  labels, key_mask, pool)
    dh = Hd.pooled_classifier_backward(cache)[0]
    assert np.all(dh[~key_mask] == 0)
    h2 = h.copy()
    h2[~key_mask] = 1e3
    assert Hd.pooled_classifier_forward(h2, cache[1][1], np.zeros(C), labels, key_mask, pool)[0] == loss


def test_mean_pool_is_the_mean_of_the_real_tokens(rng):
    h = rng.standard_normal((2, 5, 3))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    pooled, _ = Hd.pool_forward(h, mask, "mean")
    np.testing.assert_allclose(pooled[0], h[0, :2].mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(pooled[1], h[1].mean(axis=0), rtol=1e-14)


def test_head_errors_name_the_argument(rng):
    h = rng.standard_normal((2, 4, 3))
    with pytest.raises(ValueError, match="key_mask: expected a bool array of shape \\(2, 4\\)"):
        Hd.pooled_classifier_forward(h, np.ones((3, 2)), np.zeros(2), np.array([0, 1]),
                                     np.ones((2, 4), dtype=int))
    with pytest.raises(ValueError, match="labels: expected shape \\(2,\\)"):
        Hd.pooled_classifier_forward(h, np.ones((3, 2)), np.zeros(2), np.array([0]))
    with pytest.raises(ValueError, match="pool 'first' reads token 0, which is padding in rows \\[1\\]"):
        Hd.pool_forward(h, np.array([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=bool), "first")
    with pytest.raises(ValueError, match="pool: expected one of"):
        Hd.pool_forward(h, None, "max")
    with pytest.raises(ValueError, match="mask: every position is masked out"):
        Hd.token_head_forward(h, np.ones((3, 5)), np.zeros((2, 4), dtype=int), np.zeros((2, 4), bool))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_task_token_head_names_its_gradients(rng, tied):
    cfg = ModelConfig(vocab_size=7, d_model=3, tie_embeddings=tied, dtype="float64")
    task = get_task("copying", region_len=4, n_tokens=2, vocab_size=7, n_val=3, n_test=3)
    batch = task.sample_batch("train", 2, np.random.default_rng(0))
    head = task.init_head(cfg, rng)
    assert set(head) == set(task.head_shapes(cfg)) == (set() if tied else {"head"})
    name = "wte" if tied else "head"
    shape = (cfg.vocab_size, cfg.d_model) if tied else (cfg.d_model, cfg.vocab_size)

    def grad(dout, h, **p):
        dh, g = task.head_backward(task.head_forward(h, p, batch, cfg)[1], float(dout))
        assert set(g) == {name}
        return {"h": dh, **g}
    _check(lambda h, **p: np.array(task.head_forward(h, p, batch, cfg)[0]), grad,
           {"h": rng.standard_normal((2, task.seq_len, 3)), name: rng.standard_normal(shape)})


def test_listops_head_gradcheck_through_the_task(rng):
    cfg = ModelConfig(vocab_size=17, d_model=4, dtype="float64")
    task = get_task("listops", min_len=5, max_len=16, max_depth=3, max_args=3,
                    n_train=40, n_val=5, n_test=5)
    batch = task.sample_batch("train", 3, np.random.default_rng(2))
    p = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in task.init_head(cfg, rng).items()}
    assert {n: v.shape for n, v in p.items()} == task.head_shapes(cfg) == {"cls.W": (4, 10),
                                                                         "cls.b": (10,)}

    def grad(dout, h, **q):
        dh, g = task.head_backward(task.head_forward(h, q, batch, cfg)[1], float(dout))
        return {"h": dh, **g}
    _check(lambda h, **q: np.array(task.head_forward(h, q, batch, cfg)[0]), grad,
           {"h": rng.standard_normal(batch.tokens.shape + (4,)), **p})


# ---------------------------------------------------------------- body + head = the language model

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_body_and_token_head_are_the_language_model(rng, tied):
    cfg = ModelConfig(vocab_size=256, max_len=9, d_model=8, n_layers=1, n_heads=2, head_dim=3,
                      value_dim=2, n_components=3, mlp_ratio=2, tie_embeddings=tied, dtype="float64")
    model = LanguageModel(cfg, seed=1)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in model.params.items()}
    task = get_task("lm", context=9)
    batch = task.sample_batch("train", 3, np.random.default_rng(4))
    loss_ref, cache_ref = lm_loss_forward(params, batch.tokens, batch.targets, cfg)
    grads_ref = lm_loss_backward(cache_ref)

    h, c_body = body_forward(params, batch.tokens, cfg, causal=task.causal, key_mask=batch.key_mask)
    loss, c_head, out = task.head_forward(h, params, batch, cfg)
    dh, g_head = task.head_backward(c_head)
    grads = add_head_grads(body_backward(dh, c_body), g_head)
    assert loss == loss_ref                                   # the same operations, in the same order
    assert list(grads) == list(grads_ref)                     # and the same order of names (the clip's sum)
    assert out["count"] == batch.targets.size and out["nats"] == pytest.approx(loss * out["count"])
    assert set(grads) == set(grads_ref)
    for name, g in grads_ref.items():
        assert np.array_equal(grads[name], g), name


# ---------------------------------------------------------------- the tasks

def test_registry():
    assert set(TASK_NAMES) == {"lm", "listops", "recall", "copying"}
    causal = {n: get_task(n, **SMALL[n]).causal for n in TASK_NAMES}
    assert causal == {"lm": True, "listops": False, "recall": True, "copying": True}
    with pytest.raises(ValueError, match="task: expected one of"):
        get_task("listop")


SMALL = {"lm": dict(context=16), "listops": dict(min_len=5, max_len=20, max_depth=4, max_args=4,
                                                  n_train=30, n_val=7, n_test=7),
         "recall": dict(seq_len=24, n_pairs=4, vocab_size=40, n_val=20, n_test=20),
         "copying": dict(region_len=12, n_tokens=3, vocab_size=8, n_val=20, n_test=20)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batches_have_the_contract_shapes_and_are_deterministic(name):
    task = get_task(name, **SMALL[name])
    a = task.sample_batch("train", 5, np.random.default_rng(7))
    b = task.sample_batch("train", 5, np.random.default_rng(7))
    assert isinstance(a, Batch)
    for x, y in zip(a, b):
        assert (x is None and y is None) or np.array_equal(x, y)
    tokens, targets, key_mask, loss_mask = a
    assert tokens.dtype == np.int64 and tokens.shape[0] == 5 and tokens.shape[1] <= task.seq_len
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size
    assert targets.shape == ((5,) if name == "listops" else tokens.shape)
    assert (key_mask is not None) == (name == "listops")
    assert (loss_mask is not None) == (name in ("recall", "copying"))
    again = get_task(name, **SMALL[name])
    for split in task.splits[1:]:
        for x, y in zip(task.eval_batches(split, 6), again.eval_batches(split, 6)):
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.targets, y.targets)
    with pytest.raises(ValueError, match="split"):
        task.sample_batch("dev", 2, np.random.default_rng(0))


def test_recall_targets_are_the_values_of_the_queried_keys():
    task = get_task("recall", seed=3, **SMALL["recall"])
    P, half = task.n_pairs, task.vocab_size // 2
    tokens, targets, _, mask = task.sample_batch("train", 50, np.random.default_rng(1))
    np.testing.assert_array_equal(targets, RC.answer(tokens, mask, P))
    assert np.all(mask.sum(axis=1) == P)
    keys, values = tokens[:, 0:2 * P:2], tokens[:, 1:2 * P:2]
    assert keys.min() >= 1 and keys.max() < half and values.min() >= half
    assert all(len(set(r)) == P for r in keys) and all(len(set(r)) == P for r in values)
    # every key is queried once, at an even offset of the query region
    for row, m, k in zip(tokens, mask, keys):
        pos = np.flatnonzero(m)
        assert sorted(row[pos]) == sorted(k) and np.all((pos - 2 * P) % 2 == 0) and pos.min() >= 2 * P
    # the power law: small gaps far more often than large ones
    gaps = (np.flatnonzero(mask.ravel()) % task.seq_len - 2 * P) // 2
    assert np.mean(gaps < task.space // 2) > 0.6


def test_copying_targets_are_the_scattered_tokens_in_order():
    task = get_task("copying", seed=3, **SMALL["copying"])
    L_, M = task.region_len, task.n_tokens
    tokens, targets, _, mask = task.sample_batch("train", 50, np.random.default_rng(1))
    assert np.all(mask[:, L_:]) and not mask[:, :L_].any()
    assert np.all(tokens[:, L_:] == CP.MARKER)
    for row, t in zip(tokens, targets):
        data = row[:L_][row[:L_] != CP.NOISE]
        np.testing.assert_array_equal(data, t[L_:])
        assert len(data) == M and data.min() >= CP.FIRST_DATA


@pytest.mark.parametrize("name", ["recall", "copying"])
def test_eval_sets_are_distinct_and_disjoint(name):
    task = get_task(name, **SMALL[name])
    keys = {}
    for split in ("val", "test"):
        rows = [b for b in task.eval_batches(split, 7)]
        keys[split] = [t.tobytes() + m.tobytes() for b in rows
                       for t, m in zip(b.tokens.astype(np.int32), b.loss_mask)]
        assert len(keys[split]) == SMALL[name][f"n_{split}"] == len(set(keys[split]))
    assert not set(keys["val"]) & set(keys["test"])


def test_training_rows_never_repeat_an_eval_row():
    # 3 distinct rows in all (the one data token 2 at one of 3 positions): one for
    # validation, one for test, so every training row must be the third
    task = get_task("copying", region_len=3, n_tokens=1, vocab_size=3, n_val=1, n_test=1)
    held = {next(task.eval_batches(s)).tokens[0].tobytes() for s in ("val", "test")}
    assert len(held) == 2
    rows = task.sample_batch("train", 40, np.random.default_rng(0)).tokens
    assert len({r.tobytes() for r in rows}) == 1 and rows[0].tobytes() not in held
    with pytest.raises(ValueError, match=r"gave only 1 distinct rows \(wanted 2\).*too few different rows"):
        get_task("copying", region_len=3, n_tokens=1, vocab_size=3, n_val=2, n_test=2)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_evaluate_sums_exactly_over_batches(name, rng):
    """evaluate() equals the metric computed by hand from every eval row, whatever the batch size."""
    task = get_task(name, **SMALL[name])
    D = 4
    cfg = ModelConfig(vocab_size=task.vocab_size, max_len=task.seq_len, d_model=D, dtype="float64")
    table = rng.standard_normal((task.vocab_size, D))
    params = {"wte": table, **task.init_head(cfg, rng)}
    body = lambda tokens, key_mask: table[tokens] + 0.1 * np.arange(tokens.shape[1])[None, :, None]
    split = task.splits[1]
    small = task.evaluate(split, body, params, cfg, batch_size=3, max_examples=11)
    large = task.evaluate(split, body, params, cfg, batch_size=64, max_examples=11)
    assert small["count"] == large["count"]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-12)
    assert small[task.metric_name] == pytest.approx(large[task.metric_name], rel=1e-12)
    nats, count, correct = 0.0, 0, 0
    for batch in task.eval_batches(split, 64, max_examples=11):
        h = body(batch.tokens, batch.key_mask)
        if name == "listops":
            logits = (h * batch.key_mask[..., None]).sum(1) / batch.key_mask.sum(1, keepdims=True)
            logits = logits @ params["cls.W"] + params["cls.b"]
            t, m = batch.targets, np.ones(len(batch.targets), bool)
        else:
            logits = h @ table.T
            t = batch.targets
            m = np.ones(t.shape, bool) if batch.loss_mask is None else batch.loss_mask
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= np.take_along_axis(logp, t[..., None], -1)[..., 0][m].sum()
        count += m.sum()
        correct += (logits.argmax(-1) == t)[m].sum()
    assert small["count"] == count
    assert small["loss"] == pytest.approx(nats / count, rel=1e-10)
    expected = nats / count / math.log(2) if name == "lm" else correct / count
    assert small[task.metric_name] == pytest.approx(expected, rel=1e-10)


def test_lm_windows_and_corpus_errors(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(bytes(range(32, 127)) * 3)
    task = get_task("lm", data=str(path), context=10, val_fraction=0.2)
    assert task.splits == ("train", "val") and task.metric_name == "bits_per_byte"
    val = task.corpus.val
    batches = list(task.eval_batches("val", 4))
    starts = np.arange((len(val) - 1) // 10) * 10
    np.testing.assert_array_equal(np.concatenate([b.tokens[:, 0] for b in batches]), val[starts])
    for b in batches:
        np.testing.assert_array_equal(b.tokens[:, 1:], b.targets[:, :-1])
    assert len(list(task.eval_batches("val", 4, max_examples=3))[0].tokens) == 3
    with pytest.raises(gma_np.data.DataError, match="fewer than context \\+ 2"):
        get_task("lm", data=str(path), context=100, val_fraction=0.2)
    with pytest.raises(gma_np.data.DataError, match="missing.*not found"):
        get_task("lm", data=str(tmp_path / "missing"))
    t2 = get_task("lm", dataset="text", dataset_params={"path": str(path), "val_fraction": 0.2},
                  context=10)
    np.testing.assert_array_equal(t2.corpus.val, val)


def test_check_model_and_parameter_errors():
    task = get_task("recall", **SMALL["recall"])
    task.check_model(ModelConfig(vocab_size=40, max_len=24))
    with pytest.raises(ValueError, match="vocab_size: task 'recall' needs 40"):
        task.check_model(ModelConfig(vocab_size=256, max_len=24))
    with pytest.raises(ValueError, match="max_len: task 'recall' has rows of up to 24"):
        task.check_model(ModelConfig(vocab_size=40, max_len=16))
    with pytest.raises(ValueError, match="n_pairs: expected at most seq_len / 4 = 6"):
        get_task("recall", seq_len=24, n_pairs=7)
    with pytest.raises(ValueError, match="seq_len: expected an even number"):
        get_task("recall", seq_len=25)
    with pytest.raises(ValueError, match="n_pairs: expected at most vocab_size / 2 - 1 = 3"):
        get_task("recall", seq_len=64, n_pairs=4, vocab_size=8)
    with pytest.raises(ValueError, match="n_tokens: expected an integer in \\[1, 4\\]"):
        get_task("copying", region_len=4, n_tokens=5)
    with pytest.raises(ValueError, match="'copying' draws its training rows afresh"):
        next(get_task("copying", **SMALL["copying"]).eval_batches("train"))


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from gma_np.tasks import default_cache_dir
    monkeypatch.setenv("GMA_NP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("GMA_NP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == str(tmp_path / "x" / "gma_np")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_is_what_build_makes_without_generating(name, monkeypatch):
    from gma_np.tasks import listops as LO
    from gma_np.tasks import task_spec
    task = get_task(name, **SMALL[name])

    def must_not_run(*a, **k):
        raise AssertionError("spec generated data")
    monkeypatch.setattr(LO, "generate_splits", must_not_run)
    spec = task_spec(name, **SMALL[name])
    assert (spec.vocab_size, spec.seq_len, spec.causal) == (task.vocab_size, task.seq_len, task.causal)
    assert spec.head.kind == task.head.kind
    shared = set(spec.params) & set(task.params)
    assert shared >= set(task.params) - {"seed"}
    assert all(spec.params[k] == task.params[k] for k in shared)
    assert task_spec(name, **spec.params).params == spec.params          # idempotent on its params
    with pytest.raises(ValueError, match=f"^bogus: task {name!r} has no such parameter"):
        task_spec(name, bogus=1)


# ---------------------------------------------------------------- a causal-only mixer on a bidirectional task

def test_causal_only_mixer_reads_listops_left_to_right(rng):
    """body_causal: listops runs bidirectionally, except under mamba (causal only), which
    reads a row left to right; a row's pooled logits then do not depend on the padding
    after it nor on the other rows of its batch, and a class-token pool is refused."""
    from gma_np.tasks import body_causal
    from gma_np.train.config import ConfigError, preset
    task = get_task("listops", **SMALL["listops"])
    assert not body_causal(task, "gma") and body_causal(task, "mamba")
    assert body_causal(get_task("recall", **SMALL["recall"]), "softmax")
    first = get_task("listops", pool="first", **SMALL["listops"])
    assert not first.causal_ok and not body_causal(first, "mamba")
    with pytest.raises(ConfigError, match="pool='first' needs a bidirectional body"):
        preset("test", task="listops", mixer="mamba", task_params={"pool": "first"})
    assert preset("test", task="listops", mixer="mamba").model.mixer == "mamba"
    cfg = ModelConfig(vocab_size=task.vocab_size, max_len=task.seq_len, d_model=8, n_layers=1,
                      n_heads=2, head_dim=3, value_dim=2, mixer="mamba", ssm_state=3,
                      mlp_ratio=2, dtype="float64")
    model = LanguageModel(cfg, seed=2, head=task.head)
    params = {n: v + 0.1 * rng.standard_normal(v.shape) for n, v in model.params.items()}
    batch = next(iter(task.eval_batches("val", 7)))
    assert not batch.key_mask.all()                           # some rows are padded

    def pooled(tokens, key_mask):
        h, _ = body_forward(params, tokens, cfg, causal=True, key_mask=key_mask)
        return Hd.pool_forward(h, key_mask, "mean")[0]                       # (B, D)
    full = pooled(batch.tokens, batch.key_mask)
    for i in range(len(batch.targets)):
        n = int(batch.key_mask[i].sum())
        alone = pooled(batch.tokens[i:i + 1, :n], batch.key_mask[i:i + 1, :n])
        np.testing.assert_allclose(alone[0], full[i], rtol=1e-12, atol=1e-12)
