"""Writing a Hugging Face checkpoint directory so that no moment leaves it half-written.

`write_checkpoint` writes every file into a staging directory beside `out_dir` (same filesystem,
so renaming it is atomic): the safetensors weights first, the index and JSON configs last. Only
then does the staging directory take `out_dir`'s place. On Linux that is one
`renameat2(RENAME_EXCHANGE)`, so at every moment `out_dir` holds either the complete old
checkpoint or the complete new one. Where the exchange is unavailable (another OS, or a
filesystem without it) it is two renames, old away then new in: for an instant `out_dir` does not
exist, but it never holds a mix, and a crash between the renames leaves the old checkpoint
complete in `.<name>.old-*` beside it. A crash before the swap leaves `out_dir` untouched (and, if
the process dies, a `.<name>.saving-<host>-<pid>-*` directory beside it, which the next save of
`out_dir` from the same host and PID namespace removes once that process is gone).

Because the new directory holds only what this save writes, stale checkpoint files disappear
with the old directory: a `model.safetensors` left by an earlier single-file save (which
transformers, and `load_pretrained` likewise, pick before an index, so it would load the old
weights), a `model.safetensors.index.json` left by an earlier sharded save (naming shards that no
longer exist, for tools that read it), old shards, a `quantize_config.json` of an earlier GPTQ
save. Every other entry of the old directory (tokenizer files, generation_config.json, a README,
subdirectories) is carried over as a hard link (a copy where the filesystem has none) unless this
save writes a file of that name (tokenizer.json when a tokenizer is given, the `extra_files`
copied from another directory). Every file is written with the mode open() gives a new file
(0o666 less the umask), weights included; the new directory takes the old one's mode only just
before the swap, so a read-only `out_dir` does not stop the save from filling it. Weights loaded
from the old files were copied into JAX arrays when read (`safe_open(..., framework="flax")`
copies), so saving over the directory a model came from is safe.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import logging
import numbers
import os
import re
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.flax import save_file

from jaxinfer.checkpoint.gptq_config import QUANTIZE_CONFIG_FILE
from jaxinfer.files import new_file_mode

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Written by a save, so never carried over from the directory it replaces.
CHECKPOINT_FILES = (CONFIG_FILE, INDEX_FILE, QUANTIZE_CONFIG_FILE)
WEIGHT_FILE_PATTERN = "model*.safetensors"  # model.safetensors, model-00001-of-00003.safetensors
TOKENIZER_FILE = "tokenizer.json"
# transformers refuses safetensors files without a format tag.
SAFETENSORS_METADATA = {"format": "pt"}


def is_checkpoint_file(name: str) -> bool:
    """Whether a file of this name in a checkpoint directory belongs to the weights/configs that a
    save replaces (as opposed to tokenizer files and anything else a user keeps there)."""
    return name in CHECKPOINT_FILES or fnmatch.fnmatchcase(name, WEIGHT_FILE_PATTERN)


def shard_tensors(tensors: dict[str, jax.Array | np.ndarray],
                  max_shard_bytes: int) -> list[dict[str, jax.Array | np.ndarray]]:
    """Tensors split in order into shards of at most max_shard_bytes each (a single tensor
    larger than that gets a shard of its own)."""
    shards: list[dict[str, jax.Array | np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def _save_weights(tensors: dict[str, jax.Array | np.ndarray], path: Path) -> None:
    """One safetensors file, with the mode the JSON files get (save_file makes it 0o600). A
    failed write (a full disk: safetensors raises its own SafetensorError) is an OSError naming
    the file."""
    try:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path,
                  metadata=SAFETENSORS_METADATA)
    except SafetensorError as e:
        raise OSError(f"could not write {path.name} of the checkpoint: {e}") from e
    os.chmod(path, new_file_mode())


def _write_files(staging: Path, tensors: dict[str, jax.Array | np.ndarray],
                 json_files: dict[str, dict], max_shard_bytes: int | None, tokenizer,
                 extra_files: Mapping[str, Path]) -> None:
    """All files of the new checkpoint into staging: weights, then index, tokenizer and extra
    files, then the JSON files (config.json last)."""
    def write_json(name: str, content: dict) -> None:
        (staging / name).write_text(json.dumps(content, indent=2) + "\n")

    if max_shard_bytes is None:
        _save_weights(tensors, staging / SINGLE_FILE)
    else:
        shards = shard_tensors(tensors, max_shard_bytes)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_weights(shard, staging / file)
            weight_map.update({name: file for name in shard})
        write_json(INDEX_FILE, {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                                "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save(str(staging / TOKENIZER_FILE))
    for name, src in extra_files.items():
        shutil.copyfile(src, staging / name)  # contents only: a new file, mode as open() gives
    for name, content in json_files.items():
        write_json(name, content)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link src to dst (free, and staging is on the same filesystem), or copy it where the
    filesystem has no hard links."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, staging: Path) -> None:
    """Every entry of old that is not a checkpoint file and that staging does not already hold."""
    for entry in old.iterdir():
        dst = staging / entry.name
        if is_checkpoint_file(entry.name) or dst.exists() or dst.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths a and b (Linux `renameat2` with RENAME_EXCHANGE); False where
    the OS, C library or filesystem does not offer it."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, or a libc without the wrapper
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h> and <linux/fs.h>
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Make staging's contents target's, removing the old target (see the module docstring)."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        old = staging  # it now holds the old checkpoint
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
    _remove_tree(old)  # the new checkpoint is in place: not worth failing
    if old.exists():
        log.warning("could not remove %s, which holds the replaced checkpoint", old)


def _remove_tree(path: Path) -> None:
    """rmtree that also empties directories given a read-only mode (an old checkpoint directory,
    a staging directory given its mode just before the swap, a read-only subdirectory carried
    over); errors are ignored."""
    def make_writable_and_retry(func, failed: str, _exc_info) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if func is os.rmdir and os.path.isdir(failed):
                os.chmod(failed, 0o700)
            func(failed)
        except OSError:
            pass

    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, onerror=make_writable_and_retry)


def _saver_tag() -> str:
    """This host and PID namespace, as staging names carry them: a pid says whether its save still
    runs only where it is seen from the same namespace (another container sharing the volume, or
    another host over NFS, has pids of its own)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{host}_{namespace}"


def _staging_name(target: Path) -> str:
    return f".{target.name}.saving-{_saver_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def _remove_stale_staging(target: Path) -> None:
    """Staging directories of target left by killed saves of this host and PID namespace, whose
    process no longer runs (a running one may be saving now). Any other (another machine's or
    container's, whose pids cannot be checked from here) is left alone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.saving-{re.escape(_saver_tag())}-(\d+)-"
                         rf"[0-9a-f]{{8}}")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_alive(pid):
            continue
        log.info("removing %s, left by a save that did not finish", entry)
        _remove_tree(entry)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """out_dir resolved, after checking that a checkpoint can be saved there: not a file, not a
    mount point, and its parent (or the nearest existing ancestor, which the save creates it in)
    writable, since the save builds the new directory beside out_dir. Raises ValueError or
    PermissionError naming out_dir; cheap, so callers check before long work."""
    target = Path(out_dir).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"out_dir must be a directory; {out_dir} is a file")
    if target.is_dir() and os.path.ismount(target):
        raise ValueError(f"out_dir {out_dir} is a mount point, which cannot be replaced as a "
                         "whole; save into a directory inside it")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create {out_dir}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out_dir}: the directory {ancestor} is not "
                              "writable (a save builds the new checkpoint beside out_dir)")
    return target


def _check_extra_files(extra_files: Mapping[str, os.PathLike], tokenizer) -> dict[str, Path]:
    files = {}
    for name, src in extra_files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or (
                os.sep in name) or is_checkpoint_file(name) or (
                tokenizer is not None and name == TOKENIZER_FILE):
            raise ValueError(f"extra_files names must be plain file names other than the "
                             f"checkpoint's own files; got {name!r}")
        if not Path(src).is_file():
            raise ValueError(f"extra_files[{name!r}] must be a regular file; got {src}")
        files[name] = Path(src)
    return files


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, jax.Array | np.ndarray],
                     json_files: dict[str, dict], *, max_shard_bytes: int | None = None,
                     tokenizer=None, extra_files: Mapping[str, os.PathLike] | None = None) -> Path:
    """Replace out_dir's checkpoint with `tensors` (HF names, on-disk layout) and `json_files`
    ({file name: content}, config.json among them), keeping out_dir's other files.

    The weights go to one model.safetensors, or with `max_shard_bytes` to shards of at most that
    many bytes (a larger tensor gets its own) plus model.safetensors.index.json. A
    `tokenizers.Tokenizer` given as `tokenizer` is saved as tokenizer.json. `extra_files`
    ({file name in out_dir: source file}, e.g. another model directory's tokenizer files) are
    copied in with the checkpoint, so they replace out_dir's files of those names in the same
    swap. The directory is replaced as a whole (module docstring), so a symlink out_dir keeps
    pointing at it, and a process whose working directory was out_dir is left in the removed
    old one (`cd` in again). Returns out_dir as a Path."""
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool)
                                        or not isinstance(max_shard_bytes, numbers.Integral)
                                        or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive int or None; got {max_shard_bytes!r}")
    extra = _check_extra_files(extra_files or {}, tokenizer)
    target = check_out_dir(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = target.with_name(_staging_name(target))
    staging.mkdir()  # mode 0o777 less the umask, like any new directory
    try:
        _write_files(staging, tensors, json_files, max_shard_bytes, tokenizer, extra)
        if target.is_dir():
            _carry_over(target, staging)
            # only now: a read-only mode would have stopped the writes above
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
        _swap_into_place(staging, target)
    except BaseException:
        _remove_tree(staging)
        raise
    return Path(out_dir)
