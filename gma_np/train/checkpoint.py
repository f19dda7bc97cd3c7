"""Checkpoints that lose nothing, written atomically, read without pickle.

A run directory holds `checkpoint.npz` and its human-readable twin
`checkpoint.json`. The .npz (plain arrays, loaded with allow_pickle=False) has

    param/<name>        every model parameter, in its dtype
    opt/m/<name>, opt/v/<name>, opt/t       the AdamW state
    meta                the JSON below, as uint8 bytes

and `meta` (also the content of checkpoint.json) is

    {"format": "gma_np.checkpoint/1", "step": s, "config": {TrainConfig.to_dict(): nested "model"},
     "rng": {the numpy PCG64 bit-generator state: the batch order from step s on},
     "params": {name: [shape, dtype]}, "val_bpb": last validation or null}

Atomic: each file is written to a temporary name in the same directory,
flushed and fsync'ed, then renamed over the old one (os.replace is atomic on
POSIX and Windows), and the directory is fsync'ed. A run killed at any moment
leaves the previous checkpoint or the new one, never half of one. The .npz is
written first; the .json is only a copy for people, never read back. Files
get the mode a plain open() would give them (0o666 less the umask).

Reading checks everything before anything is used: a truncated or corrupt file
(zip CRC), missing arrays, shapes or dtypes that do not match the recorded
config all raise CheckpointError naming the file and the problem.
"""

import json
import os
import secrets
import zipfile

import numpy as np

FORMAT = "gma_np.checkpoint/1"
NPZ_NAME = "checkpoint.npz"
JSON_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or not matching."""


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:          # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(path):
    """(fd, name) of a new file beside `path`, opened for writing with mode 0o666 less the
    umask, as open() would create it (tempfile.mkstemp makes 0o600 whatever the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f"{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:       # another writer's temporary of the same name: draw again
            continue


def atomic_write(path, write):
    """Call write(file object) on a temporary file beside `path`, fsync it, rename it over `path`.
    The file gets the mode a plain open() would give it (0o666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_stale_temporaries(run_dir):
    """Delete the temporary files a run killed in the middle of atomic_write left behind."""
    for name in os.listdir(run_dir):
        if name.endswith(".tmp") and name.split(".")[0] in ("checkpoint", "log", "config"):
            os.unlink(os.path.join(run_dir, name))


def checkpoint_path(run_dir):
    return os.path.join(run_dir, NPZ_NAME)


def save_checkpoint(run_dir, params, opt_arrays, meta):
    """Write run_dir/checkpoint.npz (+ .json) atomically. meta: step, config, rng, val_bpb."""
    os.makedirs(run_dir, exist_ok=True)
    meta = dict(meta, format=FORMAT,
                params={n: [list(p.shape), str(p.dtype)] for n, p in params.items()})
    text = json.dumps(meta, indent=1, sort_keys=True)
    arrays = {f"param/{n}": p for n, p in params.items()}
    arrays.update({f"opt/{n}": a for n, a in opt_arrays.items()})
    arrays["meta"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    atomic_write(checkpoint_path(run_dir), lambda f: np.savez(f, **arrays))
    atomic_write(os.path.join(run_dir, JSON_NAME), lambda f: f.write(text.encode("utf-8")))
    return checkpoint_path(run_dir)


def load_checkpoint(run_dir):
    """(params dict, optimizer arrays dict, meta dict) of run_dir/checkpoint.npz, all verified."""
    path = checkpoint_path(run_dir) if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint: no {NPZ_NAME} in {run_dir!r} (is it the --out "
                              f"directory of a training run?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}   # reads every member: CRC-checked
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint: {path!r} is truncated or corrupt and cannot be "
                              f"read ({type(err).__name__}: {err}); resume from an intact copy "
                              f"or start a new run") from None
    if "meta" not in arrays:
        raise CheckpointError(f"checkpoint: {path!r} has no 'meta' record; not a gma_np checkpoint")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path!r} has an unreadable 'meta' record ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path!r} has format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}")
    for key in ("step", "config", "rng", "params"):
        if key not in meta:
            raise CheckpointError(f"checkpoint: {path!r} meta lacks {key!r}")
    params = {}
    for name, (shape, dtype) in meta["params"].items():
        key = f"param/{name}"
        if key not in arrays:
            raise CheckpointError(f"checkpoint: {path!r} lacks parameter {name!r}")
        a = arrays[key]
        if list(a.shape) != list(shape) or str(a.dtype) != dtype:
            raise CheckpointError(f"checkpoint: {path!r} parameter {name!r} has shape {a.shape} "
                                  f"dtype {a.dtype}, the record says {tuple(shape)} {dtype}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint: {path!r} parameter {name!r} holds NaN or inf")
        params[name] = a
    opt = {key[4:]: a for key, a in arrays.items() if key.startswith("opt/")}
    return params, opt, meta
