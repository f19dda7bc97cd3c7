"""Token categories: what a model could route by without any meaning, for every task.

Dimension legend: N bytes of a window; B rows, N tokens of a sample of rows.

Bytes (the language model) first, then the categories of the other tasks' tokens
(`task_categories`, below the byte functions).

Binary attributes (a byte can have several; ASCII only: a byte >= 0x80 is part of a
multi-byte UTF-8 character and belongs to none of the letter, digit, whitespace or
punctuation attributes):

    letter        A-Z a-z
    vowel         a e i o u, either case
    digit         0-9
    whitespace    space, \\t, \\n, \\r, \\f, \\v
    punctuation   the 32 ASCII punctuation characters of string.punctuation
    upper case    A-Z
    start of word a letter or digit whose preceding byte is neither (the first byte of
                  a text with no preceding byte counts as preceded by a space)

and one partition into exclusive classes (each byte exactly one), which is what an
argmax component can be compared with as a clustering:

    whitespace, digit, vowel, consonant, punctuation, other

`show_byte` is how a report draws a byte (a visible mark for blanks and unprintables).
"""

import string
from dataclasses import dataclass

import numpy as np

ATTRIBUTES = ("letter", "vowel", "digit", "whitespace", "punctuation", "upper case",
              "start of word")
CLASSES = ("whitespace", "digit", "vowel", "consonant", "punctuation", "other")


def _table(chars):
    t = np.zeros(256, dtype=bool)
    t[list(chars.encode("ascii"))] = True
    return t


_LETTER = _table(string.ascii_letters)
_VOWEL = _table("aeiouAEIOU")
_DIGIT = _table(string.digits)
_SPACE = _table(" \t\n\r\f\v")
_PUNCT = _table(string.punctuation)
_UPPER = _table(string.ascii_uppercase)
_WORD = _LETTER | _DIGIT


def _as_bytes(data, name):
    a = np.asarray(data)
    if isinstance(data, (bytes, bytearray)):
        a = np.frombuffer(bytes(data), dtype=np.uint8)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise TypeError(f"{name}: expected bytes or a 1-d integer array of byte values, "
                        f"got {a.dtype} of shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"{name}: expected byte values in [0, 255], got range "
                         f"[{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def byte_attributes(data, previous=None):
    """{attribute: bool array (N,)} of the bytes `data` (module docstring).

    previous : the byte before data[0] (for "start of word"), or None for a text start.
    """
    b = _as_bytes(data, "data")
    prev = np.empty_like(b)
    prev[1:] = b[:-1]
    prev[:1] = ord(" ") if previous is None else previous
    return {"letter": _LETTER[b], "vowel": _VOWEL[b], "digit": _DIGIT[b],
            "whitespace": _SPACE[b], "punctuation": _PUNCT[b], "upper case": _UPPER[b],
            "start of word": _WORD[b] & ~_WORD[prev]}


def byte_classes(data):
    """The exclusive class of every byte: int array (N,) indexing CLASSES."""
    b = _as_bytes(data, "data")
    out = np.full(b.shape, CLASSES.index("other"), dtype=np.int64)
    out[_PUNCT[b]] = CLASSES.index("punctuation")
    out[_LETTER[b] & ~_VOWEL[b]] = CLASSES.index("consonant")
    out[_VOWEL[b]] = CLASSES.index("vowel")
    out[_DIGIT[b]] = CLASSES.index("digit")
    out[_SPACE[b]] = CLASSES.index("whitespace")
    return out


# How a byte is drawn in a report: visible stand-ins for blanks, "¦" for "|" (which
# would end a Markdown table cell), "·" for bytes outside printable ASCII.
_SHOWN = {ord(" "): "␣", ord("\n"): "⏎", ord("\t"): "⇥", ord("|"): "¦"}


def show_byte(byte):
    """One printable character standing for the byte value `byte` (0..255)."""
    return _SHOWN.get(byte, chr(byte) if 32 < byte < 127 else "·")


# ---------------------------------------------------------------- every task's tokens
#
# A sample of rows (B, N) of any task gets a TaskCategories: exclusive partitions (each
# real token exactly one class; the first is the one the report leads with) and binary
# attributes. Padding (key_mask False) is label -1 in every partition and False in
# every attribute; the statistics select the real tokens before they count anything.
#
#   lm        "byte classes" (CLASSES above), the binary ATTRIBUTES, "token id"
#   listops   "tokens": digit, MIN, MAX, MED, SM, [, ] (and <cls> with pool="first");
#             "groups": digit, operator, bracket (<cls>); "depth": how many brackets
#             are open at the token (a "[" and its "]" count their own: the digits and
#             operator of a node at depth d have depth d), "token id";
#             attributes: digit, each operator, open bracket, close bracket, operator, bracket
#   recall    "roles": pair key, pair value, query (the positions the loss is scored at),
#             noise; "vocabulary": the id's range, key ids 1..V/2-1, value ids V/2..V-1,
#             0 (noise draws from the whole vocabulary, so a noise token may be either);
#             "token id"; attributes: each role
#   copying   "roles": noise, data, marker; "token id"; attributes: each role
#   another   "token id" only
#
# "token id" (every id its own class) asks how far a head's routing is a function of
# the token alone; its NMI is biased upward by the many classes, which the shuffled
# baseline shows.


@dataclass
class TaskCategories:
    """The categories of a sample's tokens (B, N)."""
    partitions: dict          # {name: (labels (B, N) int64, -1 at padding; class names)}
    attributes: dict          # {name: bool (B, N)}, False at padding
    token_names: tuple = None  # id -> how a report shows the token (None: show_byte)

    def show(self, token):
        """A short printable name of a token id."""
        token = int(token)
        if self.token_names is None:
            return show_byte(token)
        return self.token_names[token] if 0 <= token < len(self.token_names) else str(token)


def _real(tokens, key_mask):
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens: expected integer token ids of shape (B, N), got "
                         f"{tokens.dtype} of shape {tokens.shape}")
    if key_mask is None:
        return tokens.astype(np.int64), np.ones(tokens.shape, dtype=bool)
    key_mask = np.asarray(key_mask)
    if key_mask.dtype != np.bool_ or key_mask.shape != tokens.shape:
        raise ValueError(f"key_mask: expected a bool array of shape {tokens.shape}, got "
                         f"{key_mask.dtype} of shape {key_mask.shape}")
    return tokens.astype(np.int64), key_mask


def _partition(values, names, real):
    """values (B, N) ints in [0, len(names)) as a partition, -1 at padding."""
    return np.where(real, values, -1).astype(np.int64), tuple(names)


def _token_ids(tokens, real):
    ids = np.unique(tokens[real])
    codes = np.searchsorted(ids, tokens).clip(0, max(ids.size - 1, 0))
    return ids, _partition(codes, [str(int(i)) for i in ids], real)


def byte_categories(tokens, previous=None, key_mask=None):
    """TaskCategories of windows of bytes (B, N); previous (B,) the byte before each
    window (-1 or None at a text start)."""
    tokens, real = _real(tokens, key_mask)
    prev = [None] * len(tokens) if previous is None else [None if p < 0 else int(p) for p in previous]
    attrs = [byte_attributes(t, p) for t, p in zip(tokens, prev)]
    ids, by_id = _token_ids(tokens, real)
    return TaskCategories(
        partitions={"byte classes": _partition(np.stack([byte_classes(t) for t in tokens]),
                                               CLASSES, real),
                    "token id": (by_id[0], tuple(show_byte(int(i)) for i in ids))},
        attributes={name: np.stack([a[name] for a in attrs]) & real for name in ATTRIBUTES})


def listops_categories(tokens, key_mask=None):
    """TaskCategories of ListOps rows (ids of gma_np.tasks.listops)."""
    from gma_np.tasks import listops as LO
    tokens, real = _real(tokens, key_mask)
    digit = (tokens >= LO.DIGIT0) & (tokens < LO.DIGIT0 + 10)
    op = (tokens >= LO.OP0) & (tokens < LO.OP0 + len(LO.OPERATORS))
    opening, closing, cls = tokens == LO.OPEN, tokens == LO.CLOSE, tokens == LO.CLS
    names = ["digit"] + list(LO.OPERATORS) + ["[", "]"]
    fine = np.zeros(tokens.shape, dtype=np.int64)                 # digit
    for i in range(len(LO.OPERATORS)):
        fine[tokens == LO.OP0 + i] = 1 + i
    fine[opening], fine[closing] = len(names) - 2, len(names) - 1
    groups = np.where(op, 1, np.where(opening | closing, 2, 0))
    group_names = ["digit", "operator", "bracket"]
    if (cls & real).any():
        fine[cls], groups = len(names), np.where(cls, 3, groups)
        names, group_names = names + ["<cls>"], group_names + ["<cls>"]
    # depth: the "[" at or before the token, less the "]" strictly before it
    opened = np.cumsum(opening & real, axis=1)
    closed = np.cumsum(closing & real, axis=1) - (closing & real)
    depth = np.where(real, opened - closed, 0)
    low = int(depth[real].min()) if real.any() else 0               # 0 only for a class token
    _, by_id = _token_ids(tokens, real)
    ids = np.unique(tokens[real])
    attributes = {"digit": digit}
    attributes.update({name: tokens == LO.OP0 + i for i, name in enumerate(LO.OPERATORS)})
    attributes.update({"open bracket": opening, "close bracket": closing, "operator": op,
                       "bracket": opening | closing})
    return TaskCategories(
        partitions={"tokens": _partition(fine, names, real),
                    "groups": _partition(groups, group_names, real),
                    "depth": _partition(depth - low,
                                        [str(d) for d in range(low, int(depth.max()) + 1)], real),
                    "token id": (by_id[0], tuple(LO.TOKEN_NAMES[int(i)] for i in ids))},
        attributes={name: a & real for name, a in attributes.items()},
        token_names=tuple(LO.TOKEN_NAMES))


def recall_categories(tokens, loss_mask, n_pairs, vocab_size, key_mask=None):
    """TaskCategories of associative-recall rows (gma_np.tasks.recall): the first 2 n_pairs
    positions are key, value, key, value, ...; loss_mask (B, N) marks the queries."""
    tokens, real = _real(tokens, key_mask)
    loss_mask = np.asarray(loss_mask, dtype=bool)
    if loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask: expected shape {tokens.shape}, got {loss_mask.shape}")
    pos = np.arange(tokens.shape[1])[None, :]
    pairs = pos < 2 * n_pairs
    roles = np.full(tokens.shape, 3, dtype=np.int64)              # noise
    roles[np.broadcast_to(pairs & (pos % 2 == 0), tokens.shape)] = 0
    roles[np.broadcast_to(pairs & (pos % 2 == 1), tokens.shape)] = 1
    roles[loss_mask & ~np.broadcast_to(pairs, tokens.shape)] = 2
    half = vocab_size // 2
    vocab = np.where(tokens == 0, 2, np.where(tokens < half, 0, 1))
    _, by_id = _token_ids(tokens, real)
    role_names = ("pair key", "pair value", "query", "noise")
    return TaskCategories(
        partitions={"roles": _partition(roles, role_names, real),
                    "vocabulary": _partition(vocab, ("key id", "value id", "0"), real),
                    "token id": by_id},
        attributes={name: (roles == i) & real for i, name in enumerate(role_names)},
        token_names=tuple(str(i) for i in range(vocab_size)))


def copying_categories(tokens, key_mask=None):
    """TaskCategories of selective-copying rows (gma_np.tasks.copying's ids)."""
    from gma_np.tasks import copying as CP
    tokens, real = _real(tokens, key_mask)
    roles = np.where(tokens == CP.NOISE, 0, np.where(tokens == CP.MARKER, 2, 1))
    _, by_id = _token_ids(tokens, real)
    role_names = ("noise", "data", "marker")
    top = int(tokens.max()) + 1 if tokens.size else CP.FIRST_DATA
    return TaskCategories(
        partitions={"roles": _partition(roles, role_names, real), "token id": by_id},
        attributes={name: (roles == i) & real for i, name in enumerate(role_names)},
        token_names=(".", ">") + tuple(str(i) for i in range(CP.FIRST_DATA, max(top, CP.FIRST_DATA))))


def task_categories(task, tokens, *, key_mask=None, loss_mask=None, previous=None):
    """The TaskCategories of a sample of `task`'s rows (a gma_np.tasks Task; module
    section above): the task's own categories, read from its public constants."""
    name = getattr(task, "name", None)
    if name == "lm":
        return byte_categories(tokens, previous, key_mask)
    if name == "listops":
        return listops_categories(tokens, key_mask)
    if name == "recall":
        if loss_mask is None:
            raise ValueError("loss_mask: the recall task's queries are where the loss is "
                             "scored; expected its (B, N) mask, got None")
        return recall_categories(tokens, loss_mask, task.n_pairs, task.vocab_size, key_mask)
    if name == "copying":
        return copying_categories(tokens, key_mask)
    tokens, real = _real(tokens, key_mask)
    return TaskCategories(partitions={"token id": _token_ids(tokens, real)[1]}, attributes={},
                          token_names=tuple(str(i) for i in range(int(tokens.max()) + 1)))
