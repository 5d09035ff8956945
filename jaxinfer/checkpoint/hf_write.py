"""Writing a Hugging Face checkpoint directory so that no moment leaves it half-written.

`write_checkpoint` writes every file into a staging directory beside `out_dir` (same filesystem,
so renaming it is atomic): the safetensors weights first, the index and JSON configs last. Only
then does the staging directory take `out_dir`'s place. On Linux that is one
`renameat2(RENAME_EXCHANGE)`, so at every moment `out_dir` holds either the complete old
checkpoint or the complete new one. Where the exchange is unavailable (another OS, or a
filesystem without it) it is two renames, old away then new in: for an instant `out_dir` does not
exist, but it never holds a mix, and a crash between the renames leaves the old checkpoint
complete in `.<name>.old-*` beside it. A crash before the swap leaves `out_dir` untouched (and, if
the process dies, a `.<name>.saving-*` directory beside it).

Because the new directory holds only what this save writes, stale checkpoint files disappear
with the old directory: a `model.safetensors` left by an earlier single-file save (which
transformers, and `load_pretrained` likewise, pick before an index, so it would load the old
weights), a `model.safetensors.index.json` left by an earlier sharded save (naming shards that no
longer exist, for tools that read it), old shards, a `quantize_config.json` of an earlier GPTQ
save. Every other entry of the old directory (tokenizer files, generation_config.json, a README,
subdirectories) is carried over as a hard link (a copy where the filesystem has none) unless this
save writes a file of that name (tokenizer.json when a tokenizer is given). Weights loaded from
the old files were copied into JAX arrays when read (`safe_open(..., framework="flax")` copies),
so saving over the directory a model came from is safe.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import logging
import numbers
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from jaxinfer.checkpoint.gptq_config import QUANTIZE_CONFIG_FILE

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


def _write_files(staging: Path, tensors: dict[str, jax.Array | np.ndarray],
                 json_files: dict[str, dict], max_shard_bytes: int | None, tokenizer) -> None:
    """All files of the new checkpoint into staging: weights, then index, then the JSON files."""
    def write_json(name: str, content: dict) -> None:
        (staging / name).write_text(json.dumps(content, indent=2) + "\n")

    if max_shard_bytes is None:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, staging / SINGLE_FILE,
                  metadata=SAFETENSORS_METADATA)
    else:
        shards = shard_tensors(tensors, max_shard_bytes)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: jnp.asarray(v) for k, v in shard.items()}, staging / file,
                      metadata=SAFETENSORS_METADATA)
            weight_map.update({name: file for name in shard})
        write_json(INDEX_FILE, {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                                "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save(str(staging / TOKENIZER_FILE))
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
    shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place: not worth failing
    if old.exists():
        log.warning("could not remove %s, which holds the replaced checkpoint", old)


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, jax.Array | np.ndarray],
                     json_files: dict[str, dict], *, max_shard_bytes: int | None = None,
                     tokenizer=None) -> Path:
    """Replace out_dir's checkpoint with `tensors` (HF names, on-disk layout) and `json_files`
    ({file name: content}, config.json among them), keeping out_dir's other files.

    The weights go to one model.safetensors, or with `max_shard_bytes` to shards of at most that
    many bytes (a larger tensor gets its own) plus model.safetensors.index.json. A
    `tokenizers.Tokenizer` given as `tokenizer` is saved as tokenizer.json. The directory is
    replaced as a whole (module docstring), so a symlink out_dir keeps pointing at it, and a
    process whose working directory was out_dir is left in the removed old one (`cd` in again).
    Returns out_dir as a Path."""
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool)
                                        or not isinstance(max_shard_bytes, numbers.Integral)
                                        or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive int or None; got {max_shard_bytes!r}")
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"out_dir must be a directory; {out_dir} is a file")
    if target.is_dir() and os.path.ismount(target):
        raise ValueError(f"out_dir {out_dir} is a mount point, which cannot be replaced as a "
                         "whole; save into a directory inside it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.saving-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # mode 0o777 less the umask, like any new directory
    try:
        _write_files(staging, tensors, json_files, max_shard_bytes, tokenizer)
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            _carry_over(target, staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
