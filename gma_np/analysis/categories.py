"""Surface-form categories of bytes: what a byte-level model could route by without any meaning.

Dimension legend: N bytes of a window.

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
