"""Byte corpora (gma_np.data): the splits each dataset module gives, memory-mapping, the errors."""

import tracemalloc

import numpy as np
import pytest

import gma_np.data as D
from gma_np.data import corpus as corpus_mod
from gma_np.data import embedded, enwik8


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def test_embedded_is_the_pydoc_text_split_at_the_end():
    c = D.get_dataset("embedded", val_fraction=0.25)
    text = embedded.default_text()
    assert bytes(c.train) + bytes(c.val) == text
    assert len(c.val) == round(len(text) * 0.25)
    assert c.test is None and c.vocab_size == 256
    assert D.resolve("").name == c.name


def test_text_file_is_memory_mapped_and_split_at_its_end(tmp_path):
    data = ("héllo wörld, " * 40).encode("utf-8")
    path = _write(tmp_path / "a.txt", data)
    c = D.get_dataset("text", path=path, val_fraction=0.2)
    assert isinstance(c.train, np.memmap) and isinstance(c.val, np.memmap)
    assert bytes(c.train) + bytes(c.val) == data
    assert len(c.val) == round(len(data) * 0.2)
    assert c.split("val") is c.val
    with pytest.raises(D.DataError, match="no test split"):
        c.split("test")
    assert D.spec_to_dataset(path) == ("text", {"path": path, "val_fraction": 0.1})


@pytest.mark.parametrize("chunk", [3, 1 << 22], ids=["chunk3", "chunk4M"])
def test_invalid_utf8_names_the_path_and_the_byte(tmp_path, monkeypatch, chunk):
    # a small chunk puts the bad byte, and a character split across reads, in a later read
    monkeypatch.setattr(corpus_mod, "UTF8_CHECK_CHUNK", chunk)
    good = "aé€b".encode("utf-8")                           # 1 + 2 + 3 + 1 bytes
    path = _write(tmp_path / "bad.txt", good * 3 + b"\xff" + good)
    with pytest.raises(D.DataError, match=rf"bad\.txt.*invalid UTF-8 at byte {3 * len(good)}"):
        D.get_dataset("text", path=path)
    assert D.get_dataset("text", path=_write(tmp_path / "ok.txt", good * 5)).val is not None


def test_missing_and_empty_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(D.DataError, match="nope.txt.*found nothing"):
        D.get_dataset("text", path=missing)
    with pytest.raises(D.DataError, match="nope.txt.*not found"):
        D.resolve(missing)
    empty = _write(tmp_path / "empty.txt", b"")
    with pytest.raises(D.DataError, match="empty.txt.*empty file"):
        D.get_dataset("text", path=empty)
    with pytest.raises(D.DataError, match="too few"):
        D.get_dataset("text", path=_write(tmp_path / "tiny.txt", b"abc"))


def _fake_wikitext(tmp_path, variant, test=True, valid=True):
    d = tmp_path / f"wt-{variant}"
    d.mkdir()
    texts = {"train": " = Train = \n the cat sat .\n", "valid": " = Valid = \n a dog ran .\n",
             "test": " = Test = \n né .\n"}
    for stem, text in texts.items():
        if (stem == "test" and not test) or (stem == "valid" and not valid):
            continue
        (d / f"wiki.{stem}.{variant}").write_bytes(text.encode("utf-8"))
    return d, texts


@pytest.mark.parametrize("variant", ["tokens", "raw"])
def test_wikitext_directory_gives_its_three_files_as_splits(tmp_path, variant):
    d, texts = _fake_wikitext(tmp_path, variant)
    for spec in (str(d), str(d / f"wiki.valid.{variant}")):
        assert D.spec_to_dataset(spec)[0] == "wikitext"
        c = D.resolve(spec)
        assert f".{variant}" in c.name
        for split, stem in (("train", "train"), ("val", "valid"), ("test", "test")):
            assert isinstance(c.split(split), np.memmap)
            assert bytes(c.split(split)) == texts[stem].encode("utf-8"), split


def test_wikitext_prefers_tokens_and_test_is_optional(tmp_path):
    d, _ = _fake_wikitext(tmp_path, "tokens", test=False)
    for stem in ("train", "valid"):
        (d / f"wiki.{stem}.raw").write_bytes(b"raw text\n")
    c = D.get_dataset("wikitext", path=str(d))
    assert ".tokens" in c.name and c.test is None
    assert bytes(D.get_dataset("wikitext", path=str(d), variant="raw").train) == b"raw text\n"


def test_wikitext_errors_name_the_path(tmp_path):
    d, _ = _fake_wikitext(tmp_path, "tokens", valid=False)
    with pytest.raises(D.DataError, match=rf"wiki.valid.tokens.*{d.name}"):
        D.get_dataset("wikitext", path=str(d))
    with pytest.raises(D.DataError, match=rf"{d.name}.*neither"):
        D.resolve(str(d))
    (d / "wiki.valid.tokens").write_bytes(b"ok \xc3\x28 no\n")           # an invalid 2-byte sequence
    with pytest.raises(D.DataError, match=r"wiki.valid.tokens.*invalid UTF-8 at byte 3"):
        D.get_dataset("wikitext", path=str(d))
    with pytest.raises(D.DataError, match="found nothing"):
        D.get_dataset("wikitext", path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="variant"):
        D.get_dataset("wikitext", path=str(d), variant="txt")


SMALL_SPLIT = dict(train_bytes=90, valid_bytes=5, test_bytes=5)


def test_enwik8_split_rule_on_a_small_file(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, 100, dtype=np.uint8).tobytes()
    path = _write(tmp_path / "enwik8", data)
    for spec in (path, str(tmp_path)):
        c = D.get_dataset("enwik8", path=spec, **SMALL_SPLIT)
        assert all(isinstance(s, np.memmap) for s in (c.train, c.val, c.test))
        assert (bytes(c.train), bytes(c.val), bytes(c.test)) == (data[:90], data[90:95], data[95:])
    assert D.spec_to_dataset(path) == ("enwik8", {"path": path})
    assert D.spec_to_dataset(str(tmp_path)) == ("enwik8", {"path": path})


def test_enwik8_wrong_size_or_zip_names_the_path(tmp_path):
    path = _write(tmp_path / "enwik8", b"x" * 99)
    with pytest.raises(D.DataError, match=r"enwik8.*100 bytes \(90 \+ 5 \+ 5\), found 99"):
        D.get_dataset("enwik8", path=path, **SMALL_SPLIT)
    with pytest.raises(D.DataError, match=r"100000000 bytes"):
        D.resolve(path)
    _write(tmp_path / "enwik8", b"PK\x03\x04" + b"\0" * 96)
    with pytest.raises(D.DataError, match="zip archive"):
        D.get_dataset("enwik8", path=path, **SMALL_SPLIT)


def test_a_full_size_enwik8_costs_no_memory(tmp_path):
    # a sparse file of the real size with the standard 90M / 5M / 5M rule
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:
        f.truncate(enwik8.TRAIN_BYTES + enwik8.VALID_BYTES + enwik8.TEST_BYTES)
    tracemalloc.start()
    c = D.resolve(str(path))
    window = c.val[np.arange(7) + 12_345]                   # a batch gathers only what it reads
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert c.sizes() == {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}
    assert window.shape == (7,)
    assert peak < 1_000_000, f"loading a 100 MB corpus allocated {peak} bytes"
    del c, window


def test_registry_errors_name_what_is_known():
    with pytest.raises(ValueError, match="expected one of .*'embedded'"):
        D.get_dataset("wikitext2000")
    with pytest.raises(ValueError, match=r"expected parameters among .*got \['context'\]"):
        D.get_dataset("embedded", context=5)
    with pytest.raises(TypeError, match="path string"):
        D.resolve(3)
    with pytest.raises(ValueError, match="val_fraction"):
        D.get_dataset("embedded", val_fraction=1.5)


def test_an_unreadable_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    path = _write(tmp_path / "locked.txt", b"some text\n" * 50)

    def no_permission(p, *a, **k):
        raise PermissionError(13, "Permission denied", p)
    # as root a chmod 000 file stays readable, so the open itself is made to fail
    monkeypatch.setattr(corpus_mod, "open", no_permission, raising=False)
    for load in (lambda: D.get_dataset("text", path=path), lambda: D.resolve(path)):
        with pytest.raises(D.DataError, match=r"cannot read .*locked\.txt.*Permission denied"):
            load()
