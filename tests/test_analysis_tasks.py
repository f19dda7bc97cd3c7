"""gma_np.analysis on every task: the tasks' token categories, the per-class statistics of a
classification run on constructed cases with known answers, padding left out of every
statistic, the gradients of a bidirectional masked run, and `gma-np analyze` end to end on
tiny runs of ListOps (beside a softmax run), recall and copying trained in the test."""

import math
import os

import numpy as np
import pytest

import gma_np
from gma_np.analysis import alignment as al
from gma_np.analysis import collect as co
from gma_np.analysis import report as rp
from gma_np.analysis.categories import (copying_categories, listops_categories,
                                        recall_categories, task_categories)
from gma_np.analysis.usage import usage_stats
from gma_np.tasks import listops as LO

RTOL = 1e-12
# Small ListOps splits: rows of 20 to 40 tokens, generated in a fraction of a second.
LISTOPS = dict(min_len=20, max_len=40, max_depth=5, max_args=5, n_train=200, n_val=40, n_test=10)


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    """Generated splits go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("GMA_NP_CACHE", str(tmp_path_factory.getbasetemp() / "task-cache"))


def _ids(text):
    names = {name: i for i, name in enumerate(LO.TOKEN_NAMES)}
    return [names[w] for w in text.split()]


# ---------------------------------------------------------------- the tasks' categories

def test_listops_categories_hand_case():
    rows = [_ids("[ MAX 2 [ MIN 4 7 ] 0 ]"), _ids("[ SM 3 1 ]")]
    tokens = np.zeros((2, 10), dtype=np.int64)
    mask = np.zeros((2, 10), dtype=bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    c = listops_categories(tokens, mask)
    fine, names = c.partitions["tokens"]
    assert names == ("digit", "MIN", "MAX", "MED", "SM", "[", "]")
    np.testing.assert_array_equal(fine[0], [5, 2, 0, 5, 1, 0, 0, 6, 0, 6])
    np.testing.assert_array_equal(fine[1], [5, 4, 0, 0, 6, -1, -1, -1, -1, -1])   # padding: -1
    groups, gnames = c.partitions["groups"]
    assert gnames == ("digit", "operator", "bracket")
    np.testing.assert_array_equal(groups[1, :5], [2, 1, 0, 0, 2])
    depth, dnames = c.partitions["depth"]
    assert dnames == ("1", "2")
    # "[ MAX 2" at depth 1, "[ MIN 4 7 ]" at depth 2, "0 ]" back at 1
    np.testing.assert_array_equal(depth[0], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    assert c.attributes["close bracket"].sum() == 3 and c.attributes["SM"].sum() == 1
    assert not any(a[~mask].any() for a in c.attributes.values())
    assert c.show(LO.OP0 + 1) == "MAX"
    with_cls = listops_categories(np.array([[LO.CLS] + rows[1]]), None)
    assert with_cls.partitions["tokens"][1][-1] == "<cls>"
    assert with_cls.partitions["depth"][1] == ("0", "1")


def test_recall_and_copying_categories_follow_the_tasks():
    from gma_np.tasks import get_task
    recall = get_task("recall", seq_len=24, n_pairs=4, vocab_size=40, n_val=5, n_test=5)
    batch = next(iter(recall.eval_batches("val")))
    c = task_categories(recall, batch.tokens, loss_mask=batch.loss_mask)
    roles, names = c.partitions["roles"]
    assert names == ("pair key", "pair value", "query", "noise")
    counts = np.stack([np.bincount(r, minlength=4) for r in roles])
    np.testing.assert_array_equal(counts[:, :3], 4)                       # 4 pairs, 4 queries
    for b in range(len(roles)):                     # every query is one of the row's keys
        assert set(batch.tokens[b][roles[b] == 2]) == set(batch.tokens[b, 0:8:2])
    vocab = c.partitions["vocabulary"][0]
    assert (vocab[roles == 1] == 1).all() and (vocab[roles == 0] == 0).all()
    with pytest.raises(ValueError, match="loss_mask"):
        task_categories(recall, batch.tokens)
    copying = get_task("copying", region_len=12, n_tokens=3, vocab_size=8, n_val=5, n_test=5)
    batch = next(iter(copying.eval_batches("val")))
    c = copying_categories(batch.tokens)
    roles, names = c.partitions["roles"]
    assert names == ("noise", "data", "marker")
    np.testing.assert_array_equal((roles == 2).sum(1), 3)
    np.testing.assert_array_equal(roles[:, 12:], 2)
    assert ((roles == 1) == (batch.tokens >= 2)).all()
    with pytest.raises(ValueError, match="loss_mask"):
        recall_categories(batch.tokens, batch.tokens[:, :3] > 0, 2, 8)


# ---------------------------------------------------------------- per-class statistics

def test_class_information_hand_case():
    """Class 0 routes (1, 0), class 1 (1/2, 1/2), as many tokens each: u = (3/4, 1/4),
    I = H(u) - (0 + log 2) / 2."""
    r = np.array([[1.0, 0.0]] * 3 + [[0.5, 0.5]] * 3)
    labels = np.array([0, 0, 0, 1, 1, 1])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - 0.5 * math.log(2.0)
    assert al.class_information(r, labels) == pytest.approx(expected, rel=RTOL)
    same = np.tile([[0.2, 0.3, 0.5]], (6, 1))               # every class routes alike: 0
    assert al.class_information(same, labels) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="r: expected shape"):
        al.class_information(r[:4], labels)


def test_row_permutation_keeps_each_row_under_one_label():
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(6), [3, 1, 4, 2, 5, 2])                  # the row of each token
    labels = np.array([0, 1, 0, 2, 1, 2])[rows]
    draw = al._shuffler(labels, rng, rows)
    for _ in range(5):
        shuffled = draw()
        for g in range(6):                                           # one label per row
            assert len(set(shuffled[rows == g])) == 1
        assert sorted(shuffled[np.searchsorted(rows, np.arange(6))]) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="one label per group"):
        al.shuffled_baseline(np.arange(rows.size) % 2, rows, rng, groups=rows)


def _one_hot_sample(row_labels, n_tokens, K, rng):
    """A Sample whose every token's responsibilities are one-hot on its row's class."""
    B, N = len(row_labels), n_tokens
    r = np.zeros((B, 1, N, K))
    r[np.arange(B), 0, :, row_labels] = 1.0
    layer = co.LayerSample(h=None, q=None, k=None, v=None, rq=r, rk=r.copy())
    tokens = rng.integers(1, 11, (B, N))
    return co.Sample(tokens=tokens, layers=[layer], mixer="gma", row_labels=np.asarray(row_labels))


def test_a_router_whose_components_are_the_classes_gives_per_class_nmi_one():
    rng = np.random.default_rng(1)
    row_labels = np.tile(np.arange(4), 10)                              # 40 rows, 4 classes
    sample = _one_hot_sample(row_labels, 7, 6, rng)
    cats = listops_categories(sample.tokens)
    out = rp._per_class(sample, cats, ("a", "b", "c", "d"), rng)
    for r in out["heads"]:
        assert r["nmi"][0] == pytest.approx(1.0, rel=RTOL)
        assert r["purity"][0] == pytest.approx(1.0, rel=RTOL)
        assert r["information"][0] == pytest.approx(math.log(4.0), rel=RTOL)   # H(class)
        assert r["nmi"][1] < 0.5 and r["information"][1] < 0.5 * math.log(4.0)   # row-permuted
        np.testing.assert_allclose(r["effective"], 1.0, rtol=RTOL)       # one component a class
        np.testing.assert_allclose(r["usage"][:, :4], np.eye(4), rtol=RTOL)
    # a router that ignores the class: NMI 0 and no class information
    sample.layers[0].rq[:] = sample.layers[0].rk[:] = 1.0 / 6
    out = rp._per_class(sample, cats, ("a", "b", "c", "d"), rng)
    for r in out["heads"]:
        assert r["nmi"][0] == 0.0 and r["information"][0] == pytest.approx(0.0, abs=1e-15)
        np.testing.assert_allclose(r["effective"], 6.0, rtol=RTOL)


# ---------------------------------------------------------------- padding and gradients

def _listops_model(seed=0):
    """An untrained bidirectional GMA classifier on small ListOps rows, its task, a batch."""
    from gma_np.nn.heads import PooledClassifierHead
    from gma_np.nn.model import LanguageModel, ModelConfig
    task = LO.build(seed=0, **LISTOPS)
    cfg = ModelConfig(vocab_size=task.vocab_size, max_len=48, d_model=16, n_layers=2, n_heads=2,
                      head_dim=4, value_dim=4, n_components=5, dtype="float64")
    model = LanguageModel(cfg, seed=seed, head=PooledClassifierHead(LO.N_CLASSES))
    batch = co.sample_task_rows(task, "val", 9, np.random.default_rng(seed))
    model.init_from_data(batch.tokens, np.random.default_rng(seed), causal=False,
                         key_mask=batch.key_mask)
    return model, task, batch


def _analysis(model, task, tokens, batch):
    sample = co.collect(model, tokens, batch.targets, causal=False, key_mask=batch.key_mask)
    cats = task_categories(task, tokens, key_mask=batch.key_mask)
    info = {"norm": model.cfg.norm}
    return sample, rp.analyze(sample, cats, rng=np.random.default_rng(3), info=info,
                              class_names=tuple(map(str, range(10))))


def test_padding_is_left_out_of_every_statistic():
    """Altering the padding tokens, and padding every row with 5 more columns of random
    tokens, changes no statistic: usage, alignment, per class, affinity, stability and
    gradients count the real tokens only."""
    model, task, batch = _listops_model()
    assert batch.key_mask is not None and (~batch.key_mask).sum() > 20
    _, base = _analysis(model, task, batch.tokens, batch)
    rng = np.random.default_rng(7)
    altered = np.where(batch.key_mask, batch.tokens, rng.integers(1, 17, batch.tokens.shape))
    B, N = batch.tokens.shape
    wider = np.concatenate([altered, rng.integers(1, 17, (B, 5))], axis=1)
    mask = np.concatenate([batch.key_mask, np.zeros((B, 5), dtype=bool)], axis=1)
    wide = batch._replace(tokens=wider, key_mask=mask)
    for tokens, b in ((altered, batch), (wider, wide)):
        _, other = _analysis(model, task, tokens, b)
        for key in ("usage", "alignment", "stability", "gradients"):
            for x, y in zip(base[key], other[key]):
                _assert_close(x, y, key)
        for x, y in zip(base["per_class"]["heads"], other["per_class"]["heads"]):
            _assert_close(x, y, "per_class")
        for x, y in zip(base["affinity"], other["affinity"]):
            _assert_close(x, y, "affinity")
        assert base["affinity_window"] == other["affinity_window"]
    # the same rows with padding counted would not agree: padding is what was left out
    sample, _ = _analysis(model, task, batch.tokens, batch)
    r = sample.layers[1].rk[:, 0]
    assert not np.allclose(usage_stats(r.reshape(-1, 5))["usage"],
                           usage_stats(r[batch.key_mask])["usage"], rtol=1e-6)
    # the run log's summary too
    a = co.usage_summary(model, batch.tokens, causal=False, key_mask=batch.key_mask)
    b = co.usage_summary(model, wider, causal=False, key_mask=mask)
    assert a == pytest.approx(b, rel=1e-9)


def _assert_close(x, y, where):
    if isinstance(x, dict):
        assert set(x) == set(y), where
        for k in x:
            _assert_close(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (tuple, list)) or isinstance(x, np.ndarray):
        np.testing.assert_allclose(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                   rtol=1e-9, atol=1e-12, err_msg=where)
    elif isinstance(x, (float, int, np.floating, np.integer)) and not isinstance(x, bool):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12, nan_ok=True), where
    else:
        assert x == y, where


def test_collect_gradients_of_a_masked_bidirectional_run_are_the_trainers():
    """do recorded in the classifier's backward, pushed through gma_backward (bidirectional,
    the key mask) and the query and key projections, gives the trainer's dW_q and dW_k;
    the per-token gradients of gradients.py are those of the real tokens, within the gate."""
    from gma_np.analysis import gradients as gr
    from gma_np.mixers.attention import merge_heads
    from gma_np.train.loop import loss_and_grads
    model, task, batch = _listops_model(seed=2)
    sample = co.collect(model, batch.tokens, batch.targets, causal=False, key_mask=batch.key_mask)
    loss, grads = loss_and_grads(model, task, batch)
    assert sample.loss == pytest.approx(loss, rel=RTOL)
    np.testing.assert_array_equal(sample.row_labels, batch.targets)
    assert sample.outputs["correct"] == int((sample.predicted == batch.targets).sum())
    for l, layer in enumerate(sample.layers):
        mix = layer.mixture
        _, cache = gma_np.gma_forward(layer.q, layer.k, layer.v, mix["means"], mix["log_var"],
                                      mix["logits"], causal=False, norm=model.cfg.norm,
                                      temperature=mix["temperature"], key_mask=batch.key_mask)
        g = gma_np.gma_backward(layer.do, cache)
        for name, d in (("Wq", g["q"]), ("Wk", g["k"])):
            dW = np.einsum("bnD,bnc->Dc", layer.h, merge_heads(d))
            np.testing.assert_allclose(dW, grads[f"h{l}.gma.{name}"], rtol=1e-9, atol=1e-14)
        tg = gr.token_gradients(layer.q, layer.k, layer.v, layer.do, mix["means"], mix["log_var"],
                                mix["logits"], mix["temperature"], causal=False,
                                norm=model.cfg.norm, key_mask=batch.key_mask)
        T = int(batch.key_mask.sum())
        assert tg["grad_k"].shape == (model.cfg.n_heads, T)
        np.testing.assert_allclose(tg["grad_q"][0], np.linalg.norm(g["q"][:, 0][batch.key_mask], axis=-1),
                                   rtol=1e-9)
        assert not tg["drk"].transpose(0, 2, 1, 3)[~batch.key_mask].any()    # padding keys: 0
        for h in range(model.cfg.n_heads):
            assert gr.gradient_summary(tg, h, "k")["gate_ok"] == 1.0


# ---------------------------------------------------------------- gma-np analyze on every task

def _train(run_dir, task, params, mixer="gma", steps=6):
    from gma_np.train import preset, train
    cfg = preset("test", task=task, task_params=params, steps=steps, eval_interval=steps,
                 checkpoint_interval=steps, model=dict(mixer=mixer))
    train(cfg, str(run_dir), quiet=True, print_fn=lambda *a, **k: None)
    return str(run_dir)


def _parse(argv):
    from gma_np.analysis.commands import add_subcommand
    from gma_np.cli import Parser
    parser = Parser(prog="gma-np")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_analyze_a_listops_run_beside_a_softmax_run(tmp_path, capsys):
    run = _train(tmp_path / "gma", "listops", LISTOPS)
    softmax = _train(tmp_path / "sm", "listops", LISTOPS, mixer="softmax", steps=3)
    out = tmp_path / "report"
    args = _parse(["analyze", run, "--out", str(out), "--windows", "30", "--compare", softmax])
    assert args.run(args) == 0
    assert "warning" not in capsys.readouterr().err
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "Task listops, bidirectional body" in text and "30 validation rows" in text
    for section in ("## Summary", "## Usage", "## Responsibilities over a row",
                    "## Alignment with token categories", "## Per class", "## Affinity",
                    "## Routing stability", "## Gradient structure"):
        assert section in text
    assert "| NMI tokens | NMI groups | NMI depth | NMI token id |" in text
    assert "(softmax, step 3)" in text and "(bidirectional)" in text
    assert "| class | rows | tokens |" in text
    per_class = text.split("## Per class")[1].split("## Affinity")[0]
    row = [line for line in per_class.splitlines() if line.startswith("| 0 | 0 | k |")][0]
    nmi, baseline = row.split("|")[4].replace("(", " ").replace(")", " ").split()
    assert 0.0 <= float(nmi) <= 1.0 and 0.0 <= float(baseline) <= 1.0   # value (baseline)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert 'pip install "gma_np[plot]"' in text
    else:
        for name in ("classes.png", "categories.png", "affinity.png", "heatmap_layer0.png"):
            assert (out / name).stat().st_size > 0 and f"]({name})" in text
    # the compared run must read the same tokens
    lm_run = _train(tmp_path / "lm", "lm", {}, steps=2)
    args = _parse(["analyze", run, "--windows", "4", "--compare", lm_run])
    assert args.run(args) == 1
    assert "not the same task" in capsys.readouterr().err


@pytest.mark.parametrize("task, params", [
    ("recall", dict(seq_len=24, n_pairs=4, vocab_size=40, n_val=20, n_test=20)),
    ("copying", dict(region_len=12, n_tokens=3, vocab_size=8, n_val=20, n_test=20)),
])
def test_analyze_a_causal_token_task_run(task, params, tmp_path):
    from gma_np.analysis import figures
    run = _train(tmp_path / "run", task, params, steps=2)
    args = _parse(["analyze", run, "--windows", "6"])
    orig = figures._pyplot
    try:
        figures._pyplot = lambda: None                    # the tables are the point here
        assert args.run(args) == 0
    finally:
        figures._pyplot = orig
    text = open(os.path.join(run, "analysis", "report.md"), encoding="utf-8").read()
    assert f"Task {task}, causal body" in text and "## Per class" not in text
    assert "| NMI roles |" in text and "the causal affinity" in text
