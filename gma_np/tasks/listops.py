"""ListOps (Nangia and Bowman 2018) as the Long Range Arena defines it, generated locally.

An example is a nested expression over the digits 0-9 and four operators,

    [ MAX 2 9 [ MIN 4 7 ] 0 ]          -> 9
    [ SM [ MED 3 8 1 6 ] 5 9 ]         -> (4 + 5 + 9) % 10 = 8   (MED of 1 3 6 8 = floor(4.5) = 4)

    MIN, MAX   the smallest / largest argument
    MED        the median, rounded down (the mean of the middle two when the count is even)
    SM         the sum modulo 10

and the label (10 classes) is its value. The generator of the LRA: a node at depth
d < max_depth is an operator with probability OPERATOR_P = 0.25, else a digit (a node
at max_depth is always a digit); an operator has 2..max_args arguments (uniform);
the root is at depth 1, so brackets nest at most max_depth - 1 deep. An expression is
kept only when its length in tokens is in [min_len, max_len] (LRA: 500 to 2000;
a CPU preset uses shorter ones).

Tokens. Every bracket is a token: "[" and "]" around "OP arg ... arg". The original
LRA pipeline let a text tokenizer drop the closing brackets (a known pitfall): then
"[MAX 1 [MIN 2 3 ] 4 ]" and "[MAX 1 [MIN 2 3 4 ] ]" read alike and the label is not a
function of the input. Ids: 0 padding, 1..10 the digits 0..9, 11 "[", 12 "]", 13..16
MIN MAX MED SM; with pool="first" a class token (17) is put first. The LRA writes "["
and the operator as one token ("[MAX"), so an LRA length counts one token fewer per
operator than the length here, which is the number of tokens the model reads.

Splits. One stream of expressions, deterministic from the seed (Python's
random.Random, whose sequence is fixed across versions and platforms), with every
repeat dropped; the first n_train distinct ones are the training split, the next
n_val validation, the next n_test test: no duplicates within or across splits.
Generated splits are stored in a cache folder as .npz keyed by the parameters, with
a sha256 file beside them that is verified on load (a mismatch regenerates, with a
warning).

Evaluator: `evaluate_tokens` parses a token sequence with a stack and recomputes its
value, independently of the generator; the tests run it on every generated example.

    python -m gma_np.tasks.listops --stats --preset cpu     # label, operator, depth, length tables
"""

import argparse
import hashlib
import json
import os
import random
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from gma_np.nn.heads import PooledClassifierHead
from gma_np.tasks.base import (EVAL_BATCH, Batch, Task, TaskSpec, accuracy, check_int, fill_params,
                               pad_rows)

NAME = "listops"

# The LRA generator's probability that a node above max_depth is an operator.
OPERATOR_P = 0.25
OPERATORS = ("MIN", "MAX", "MED", "SM")
N_CLASSES = 10

PAD, OPEN, CLOSE = 0, 11, 12
DIGIT0 = 1                                   # digit v is token DIGIT0 + v
OP0 = 13                                     # operator OPERATORS[i] is token OP0 + i
CLS = 17                                     # the class token of pool="first"
TOKEN_NAMES = (["<pad>"] + [str(v) for v in range(10)] + ["[", "]"] + list(OPERATORS) + ["<cls>"])

# Bump when the generator changes what it produces: the cache key includes it.
GENERATOR_VERSION = 1

# Attempts allowed per requested example before the generator gives up: the
# acceptance rate of the CPU and LRA ranges is a few per cent (docs/tasks.md), so
# a range that accepts less than 1 in 10^4 is almost surely impossible or exhausted.
MAX_ATTEMPTS_PER_EXAMPLE = 10_000


@dataclass(frozen=True)
class ListOpsParams:
    """What is generated. Every default is the Long Range Arena's."""
    min_len: int = 500        # shortest expression kept, in tokens (inclusive)
    max_len: int = 2000       # longest expression kept, in tokens (inclusive)
    max_depth: int = 10       # a node at this depth is always a digit (the root is depth 1)
    max_args: int = 10        # arguments per operator: uniform in 2..max_args
    n_train: int = 96_000     # training examples
    n_val: int = 2_000        # validation examples
    n_test: int = 2_000       # test examples

    def __post_init__(self):
        check_int("min_len", self.min_len, 1)
        check_int("max_len", self.max_len, self.min_len)
        check_int("max_depth", self.max_depth, 1)
        check_int("max_args", self.max_args, 2)
        check_int("n_train", self.n_train, 1)
        check_int("n_val", self.n_val, 1)
        check_int("n_test", self.n_test, 1)
        longest = _longest(self.max_depth, self.max_args)
        if self.min_len > longest:
            raise ValueError(f"min_len: expected at most {longest}, the longest expression of "
                             f"max_depth={self.max_depth}, max_args={self.max_args}; got {self.min_len}")


def _longest(max_depth, max_args):
    """Tokens of the largest expression: every node above max_depth an operator with max_args."""
    length = 1                                   # a digit at max_depth
    for _ in range(max_depth - 1):
        length = 3 + max_args * length           # "[", op, the arguments, "]"
    return length


# The preset for CPU runs (lengths a 2-core machine trains on in minutes) and the LRA's.
CPU_PARAMS = ListOpsParams(min_len=50, max_len=200, n_train=20_000, n_val=1_000, n_test=1_000)
LRA_PARAMS = ListOpsParams()
PRESETS = {"cpu": CPU_PARAMS, "lra": LRA_PARAMS}


# ---------------------------------------------------------------- the operators

def apply_operator(op, args):
    """The value of operator name `op` on the digit list `args`."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        s = sorted(args)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"op: expected one of {OPERATORS}, got {op!r}")


# ---------------------------------------------------------------- the generator

class _TooLong(Exception):
    """Raised inside the recursion once an expression passes max_len (it is rejected)."""


def generate_expression(rnd, p):
    """One expression drawn from the LRA distribution: (tokens list, value), or None when
    it is longer than p.max_len (abandoned as soon as it passes: a stopping time, so the
    kept expressions have the same distribution as with a full draw)."""
    out = []

    def node(depth):
        if depth < p.max_depth and rnd.random() < OPERATOR_P:
            op = rnd.randrange(len(OPERATORS))
            n_args = rnd.randint(2, p.max_args)
            out.append(OPEN)
            out.append(OP0 + op)
            args = [node(depth + 1) for _ in range(n_args)]
            out.append(CLOSE)
            if len(out) > p.max_len:
                raise _TooLong
            return apply_operator(OPERATORS[op], args)
        value = rnd.randrange(10)
        out.append(DIGIT0 + value)
        if len(out) > p.max_len:
            raise _TooLong
        return value

    try:
        value = node(1)
    except _TooLong:
        return None
    return out, value


def generate_splits(params, seed):
    """{split: (tokens (T,) uint8, offsets (n + 1,) int64, labels (n,) uint8)}: the ragged
    splits (example i of a split is tokens[offsets[i]:offsets[i + 1]]), no repeats."""
    p = params
    rnd = random.Random(f"gma_np.listops/{check_int('seed', seed, 0)}")
    wanted = (("train", p.n_train), ("val", p.n_val), ("test", p.n_test))
    total = p.n_train + p.n_val + p.n_test
    seen, rows, labels = set(), [], []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > MAX_ATTEMPTS_PER_EXAMPLE * total:
            raise ValueError(f"listops: {attempts - 1} draws gave only {len(rows)} distinct "
                             f"expressions of {p.min_len}..{p.max_len} tokens (wanted {total}); "
                             f"widen the length range or ask for fewer examples")
        drawn = generate_expression(rnd, p)
        if drawn is None or len(drawn[0]) < p.min_len:
            continue
        key = bytes(drawn[0])
        if key in seen:
            continue
        seen.add(key)
        rows.append(drawn[0])
        labels.append(drawn[1])
    splits, start = {}, 0
    for split, n in wanted:
        part = rows[start:start + n]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in part])
        splits[split] = (np.fromiter((t for r in part for t in r), dtype=np.uint8, count=offsets[-1]),
                         offsets, np.array(labels[start:start + n], dtype=np.uint8))
        start += n
    return splits


# ---------------------------------------------------------------- the evaluator

@dataclass
class Parsed:
    """What evaluate_tokens finds in one expression."""
    value: int            # the label
    depth: int            # of the deepest node, the root at depth 1
    operators: list       # (operator name, number of arguments) of every operator, in order


def evaluate_tokens(tokens):
    """Parse one expression (token ids, padding stripped) and recompute its value.

    A stack of open operators: "[" must be followed by an operator; a digit or a
    closed operator is an argument of the operator on top; "]" applies it. Raises
    ValueError on anything that is not one well-formed expression."""
    toks = [int(t) for t in tokens]
    stack, operators = [], []         # stack frames: [operator name, argument list]
    result, depth, i = None, 0, 0
    while i < len(toks):
        t = toks[i]
        if result is not None:
            raise ValueError(f"tokens: the expression ends at token {i - 1}, got more after it")
        depth = max(depth, len(stack) + 1)
        if DIGIT0 <= t < DIGIT0 + 10:
            value = t - DIGIT0
        elif t == OPEN:
            if i + 1 >= len(toks) or not OP0 <= toks[i + 1] < OP0 + len(OPERATORS):
                raise ValueError(f"tokens: expected an operator after '[' at token {i}")
            stack.append([OPERATORS[toks[i + 1] - OP0], []])
            i += 2
            continue
        elif t == CLOSE:
            if not stack:
                raise ValueError(f"tokens: ']' at token {i} closes nothing")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"tokens: operator {op} closed at token {i} has no argument")
            operators.append((op, len(args)))
            value = apply_operator(op, args)
        else:
            raise ValueError(f"tokens: expected a digit, '[' or ']' at token {i}, got id {t}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
        i += 1
    if result is None:
        raise ValueError(f"tokens: the expression is not closed ({len(stack)} '[' left open)"
                         if stack else "tokens: empty expression")
    return Parsed(value=result, depth=depth, operators=operators)


def decode(tokens):
    """The expression as text: '[ MAX 2 9 ]'."""
    return " ".join(TOKEN_NAMES[int(t)] for t in tokens if int(t) != PAD)


# ---------------------------------------------------------------- the cache

def cache_key(params, seed):
    """The sha256 (first 16 hex digits) of what the splits depend on."""
    what = {"task": NAME, "generator": GENERATOR_VERSION, "seed": seed, **asdict(params)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def cache_paths(cache_dir, params, seed):
    """(the .npz, its .sha256) for these parameters in cache_dir."""
    base = os.path.join(os.fspath(cache_dir), f"listops-{params.min_len}-{params.max_len}-"
                                              f"{cache_key(params, seed)}.npz")
    return base, base + ".sha256"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_splits(path, sha_path, splits, params, seed):
    """Write the splits as .npz (no pickles), then the sha256 file of its bytes."""
    arrays = {"meta": np.array(json.dumps({"seed": seed, "generator": GENERATOR_VERSION,
                                           **asdict(params)}, sort_keys=True))}
    for split, (tokens, offsets, labels) in splits.items():
        arrays.update({f"{split}_tokens": tokens, f"{split}_offsets": offsets,
                       f"{split}_labels": labels})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    digest = file_sha256(path)
    _atomic_write(sha_path, lambda f: f.write(f"{digest}  {os.path.basename(path)}\n".encode()))


def load_splits(path, sha_path, params, seed):
    """The cached splits, or None (with a warning saying why) when they cannot be trusted."""
    if not os.path.exists(path):
        return None
    if not os.path.exists(sha_path):
        warnings.warn(f"listops cache: {path!r} has no checksum file {os.path.basename(sha_path)!r}; "
                      f"regenerating", stacklevel=3)
        return None
    with open(sha_path, "rb") as f:
        expected = f.read().split(b" ", 1)[0].decode(errors="replace")
    got = file_sha256(path)
    if got != expected:
        warnings.warn(f"listops cache: checksum mismatch for {path!r} (file sha256 {got[:12]}..., "
                      f"recorded {expected[:12]}...); regenerating", stacklevel=3)
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        want = {"seed": seed, "generator": GENERATOR_VERSION, **asdict(params)}
        if meta != want:
            warnings.warn(f"listops cache: {path!r} holds other parameters ({meta}); regenerating",
                          stacklevel=3)
            return None
        return {s: (z[f"{s}_tokens"], z[f"{s}_offsets"], z[f"{s}_labels"])
                for s in ("train", "val", "test")}


def get_splits(params, seed, cache_dir=None):
    """The splits of (params, seed): from the cache when it holds them intact, else generated
    (and stored when cache_dir is given)."""
    if cache_dir is None:
        return generate_splits(params, seed)
    path, sha_path = cache_paths(cache_dir, params, seed)
    splits = load_splits(path, sha_path, params, seed)
    if splits is None:
        splits = generate_splits(params, seed)
        save_splits(path, sha_path, splits, params, seed)
    return splits


# ---------------------------------------------------------------- the task

class ListOpsTask(Task):
    """Classification of ListOps expressions: bidirectional body, pooled classifier, accuracy."""

    name = NAME
    causal = False
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, splits, params, seed, pool="mean"):
        self.data = splits
        self.list_params = params
        self.pool = pool
        self.causal_ok = pool == "mean"       # a class token first would see only itself
        self.head = PooledClassifierHead(N_CLASSES, pool)
        self.vocab_size = CLS + 1 if pool == "first" else CLS
        self.seq_len = params.max_len + (pool == "first")
        self.params = {"seed": seed, "pool": pool, **asdict(params)}

    def _metric(self, totals):
        return accuracy(totals)

    def n_examples(self, split):
        self._check_split(split)
        return len(self.data[split][2])

    def example(self, split, i):
        """(tokens (n,) int64 without padding or class token, label) of example i."""
        tokens, offsets, labels = self.data[split]
        return tokens[offsets[i]:offsets[i + 1]].astype(np.int64), int(labels[i])

    def _batch(self, split, rows):
        tokens, offsets, labels = self.data[split]
        seqs = [tokens[offsets[i]:offsets[i + 1]] for i in rows]
        if self.pool == "first":
            seqs = [np.concatenate([[CLS], s]) for s in seqs]
        ids, key_mask = pad_rows(seqs, PAD)
        return Batch(ids, labels[rows].astype(np.int64), key_mask, None)

    def sample_batch(self, split, batch_size, rng):
        n = self.n_examples(split)
        return self._batch(split, rng.integers(0, n, size=check_int("batch_size", batch_size, 1)))

    def eval_batches(self, split, batch_size=EVAL_BATCH, max_examples=0):
        n = self.n_examples(split)
        n = min(n, max_examples) if max_examples else n
        for start in range(0, n, check_int("batch_size", batch_size, 1)):
            yield self._batch(split, np.arange(start, min(n, start + batch_size)))

    def majority_accuracy(self, split):
        """Accuracy of always answering the most frequent training label."""
        majority = np.bincount(self.data["train"][2], minlength=N_CLASSES).argmax()
        return float(np.mean(self.data[split][2] == majority))

    def baseline(self, split):
        return "majority class", self.majority_accuracy(split)

    def summary(self):
        p = self.list_params
        return (f"ListOps, lengths {p.min_len}..{p.max_len}, max_depth {p.max_depth}, max_args "
                f"{p.max_args}, seed {self.params['seed']}: "
                + " / ".join(f"{self.n_examples(s):,} {s}" for s in self.splits))


def spec(seed=0, pool="mean", **params):
    """The TaskSpec of build(seed, pool=pool, **params), checked without generating: the
    vocabulary (17, or 18 with the class token), the longest row (max_len, + 1 with the
    class token), bidirectional, the pooled classifier of 10 classes."""
    check_int("seed", seed, 0)
    if pool not in ("mean", "first"):
        raise ValueError(f"pool: expected 'mean' or 'first', got {pool!r}")
    given = fill_params(NAME, {"seed": seed, "pool": pool, **asdict(ListOpsParams())}, params)
    p = ListOpsParams(**{k: v for k, v in given.items() if k not in ("seed", "pool")})
    return TaskSpec(params={"seed": seed, "pool": pool, **asdict(p)},
                    vocab_size=CLS + 1 if pool == "first" else CLS,
                    seq_len=p.max_len + (pool == "first"), causal=False,
                    head=PooledClassifierHead(N_CLASSES, pool), causal_ok=pool == "mean")


def build(seed=0, cache_dir=None, pool="mean", **params):
    """The ListOps task of ListOpsParams(**params), its splits from `seed` (cached in
    cache_dir when given). pool: "mean" over the real tokens, or "first" (a class token)."""
    spec(seed, pool, **params)
    p = ListOpsParams(**params)
    return ListOpsTask(get_splits(p, seed, cache_dir), p, seed, pool)


TASK_CLASS = ListOpsTask


# ---------------------------------------------------------------- statistics

def split_stats(task, split):
    """Label counts, operator counts, depth and length histograms of one split."""
    labels = np.zeros(N_CLASSES, dtype=np.int64)
    ops = dict.fromkeys(OPERATORS, 0)
    depths, lengths, arities = {}, [], {}
    for i in range(task.n_examples(split)):
        tokens, label = task.example(split, i)
        parsed = evaluate_tokens(tokens)
        labels[label] += 1
        for op, n_args in parsed.operators:
            ops[op] += 1
            arities[n_args] = arities.get(n_args, 0) + 1
        depths[parsed.depth] = depths.get(parsed.depth, 0) + 1
        lengths.append(len(tokens))
    return {"n": task.n_examples(split), "labels": labels.tolist(), "operators": ops,
            "depths": dict(sorted(depths.items())), "arities": dict(sorted(arities.items())),
            "lengths": np.array(lengths)}


def format_stats(task, n_length_bins=6):
    """Markdown tables of the statistics of every split of `task`."""
    stats = {s: split_stats(task, s) for s in task.splits}
    p = task.list_params
    out = [f"ListOps, seed {task.params['seed']}: lengths {p.min_len}..{p.max_len} tokens, "
           f"max_depth {p.max_depth}, max_args {p.max_args}; "
           + ", ".join(f"{s} {stats[s]['n']}" for s in task.splits), ""]

    def table(title, keys, row):
        out.append(f"| {title} | " + " | ".join(str(k) for k in keys) + " |")
        out.append("| --- |" + " ---: |" * len(keys))
        for s in task.splits:
            out.append(f"| {s} | " + " | ".join(row(stats[s], k) for k in keys) + " |")
        out.append("")

    def pct(count, total):
        return f"{100.0 * count / total:.1f}%"

    table("label", range(N_CLASSES), lambda st, k: pct(st["labels"][k], st["n"]))
    out[-1:] = ["majority-class accuracy (always the most frequent training label): "
                + ", ".join(f"{s} {task.majority_accuracy(s):.3f}" for s in task.splits), ""]
    table("operator", OPERATORS,
          lambda st, k: pct(st["operators"][k], sum(st["operators"].values())))
    depth_keys = sorted({d for s in task.splits for d in stats[s]["depths"]})
    table("depth", depth_keys, lambda st, k: pct(st["depths"].get(k, 0), st["n"]))
    width = -(-(p.max_len - p.min_len + 1) // n_length_bins)       # ceil: the last bin may be shorter
    edges = np.minimum(p.min_len + width * np.arange(n_length_bins + 1), p.max_len + 1)
    bins = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    table("length", bins, lambda st, k: pct(
        np.histogram(st["lengths"], edges)[0][bins.index(k)], st["n"]))
    out.append("length (tokens): " + ", ".join(
        f"{s} mean {stats[s]['lengths'].mean():.1f}, median {np.median(stats[s]['lengths']):.0f}"
        for s in task.splits))
    arity = stats["train"]["arities"]
    total = sum(arity.values())
    out.append("arguments per operator (train): " + ", ".join(
        f"{k}: {pct(v, total)}" for k, v in arity.items()))
    return "\n".join(out)


def main(argv=None):
    """`python -m gma_np.tasks.listops --stats [--preset cpu] [--min-len ...]`"""
    ap = argparse.ArgumentParser(prog="python -m gma_np.tasks.listops",
                                 description="Generate ListOps splits and print their statistics.")
    ap.add_argument("--stats", action="store_true", help="print the statistics tables")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="folder of cached splits (default: none)")
    for field in ListOpsParams.__dataclass_fields__:
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=None, dest=field)
    args = ap.parse_args(argv)
    params = {**asdict(PRESETS[args.preset]),
              **{f: getattr(args, f) for f in ListOpsParams.__dataclass_fields__
                 if getattr(args, f) is not None}}
    try:
        task = build(seed=args.seed, cache_dir=args.cache_dir, **params)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stats:
        print(format_stats(task))
    else:
        print(", ".join(f"{s}: {task.n_examples(s)} examples" for s in task.splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
