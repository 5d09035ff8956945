"""`jaxinfer convert` and `jaxinfer quantize`: rewrite a model directory as a new checkpoint (another
dtype or shard size; GPTQ/RTN-quantized), with the source's other files (tokenizer, generation
config, chat template, ...) written in the same atomic swap. Arguments that could only fail when
saving are checked before any work is done."""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
from pathlib import Path


# Weights in other formats (PyTorch, TensorFlow, GGUF, ...) or other safetensors files: copied
# beside a converted or quantized checkpoint they would be gigabytes of stale full-size weights.
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.gguf",
                         "*.msgpack", "*.h5", "*.onnx", "*.npz", "*.index.json")


def _source_files(src: Path, out: Path) -> dict[str, Path]:
    """The files of the source model directory other than weights (tokenizer files,
    generation_config.json, a chat template, a README, ...), which the save writes with the new
    checkpoint in one step; none when the model is rewritten in place (the save keeps them).
    Regular files (a symlink to one counts: a Hugging Face cache snapshot is made of them);
    subdirectories are left out."""
    from jaxinfer.checkpoint.hf_write import is_checkpoint_file

    if src.resolve() == out.resolve():
        return {}
    return {entry.name: entry for entry in sorted(src.iterdir())
            if entry.is_file() and not is_checkpoint_file(entry.name)
            and not any(fnmatch.fnmatchcase(entry.name, p) for p in OTHER_WEIGHT_PATTERNS)}


def convert(args: argparse.Namespace) -> int:
    import jaxinfer
    from jaxinfer.checkpoint.hf_write import check_out_dir

    check_out_dir(args.dst)
    model = jaxinfer.load_pretrained(args.src, dtype=args.dtype)
    # at least 1 byte: a tiny size still means "one tensor per shard", not an error
    shard = None if args.shard_size_mb is None else max(1, int(args.shard_size_mb * 2**20))
    out = jaxinfer.save_pretrained(model, args.dst, max_shard_bytes=shard,
                                   extra_files=_source_files(Path(args.src), Path(args.dst)))
    print(f"wrote {out}")
    return 0


def _check_layer_shapes(model_dir: str, bits: int, group_size: int) -> None:
    """Refuse, from config.json alone, a `group_size` that does not divide some layer's
    in_features (naming the ones that would) and `bits` that the GPTQ checkpoint cannot pack for
    some layer (gptq_format packs qweight along in_features and qzeros along out_features, each a
    whole number of 32-bit words): found when quantizing or saving, after loading the model and
    tokenizing the calibration text, that would waste the run."""
    import numpy as np
    from flax import nnx

    from jaxinfer.checkpoint.gptq_format import pack_cols, pack_rows
    from jaxinfer.checkpoint.hf import read_model_dir
    from jaxinfer.config import SUPPORTED_MODEL_TYPES, LlamaConfig
    from jaxinfer.models.llama import LlamaForCausalLM
    from jaxinfer.quant.model import linear_layers

    _, hf_config = read_model_dir(model_dir)
    if hf_config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return  # loading or jaxinfer.quantize refuses these, naming the type
    config = LlamaConfig.from_hf_config(hf_config)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    shapes = [(i, name, *layer.kernel.shape) for i, _, name, layer in linear_layers(abstract)]
    common = math.gcd(*(k for _, _, k, _ in shapes))
    for i, name, k, n in shapes:
        if group_size != -1 and k % group_size:
            divisors = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
            raise ValueError(f"--group-size {group_size} must divide every layer's in_features; "
                             f"layers[{i}].{name} [in={k}, out={n}] has {k}. Group sizes that "
                             f"divide them all: {divisors}; or -1 (one group per output channel)")
    for i, name, k, n in shapes:
        try:  # one-column stand-ins: the packing functions' own shape rule, at no real cost
            pack_rows(np.zeros((k, 1), np.int32), bits)  # qweight [K*bits/32, N]
            pack_cols(np.zeros((1, n), np.int32), bits)  # qzeros [groups, N*bits/32]
        except ValueError as e:
            raise ValueError(f"--bits {bits} cannot be written as a GPTQ checkpoint of this "
                             f"model: layers[{i}].{name} [in={k}, out={n}]: {e}") from None


def _check_quantize_args(args: argparse.Namespace) -> None:
    """What would otherwise fail only when saving, after all the quantization work."""
    from jaxinfer.checkpoint.hf_write import check_out_dir

    if not args.sym and args.checkpoint_format == "gptq":
        raise ValueError("--checkpoint-format gptq (v1) stores zero - 1 and cannot hold the zero "
                         "point 0 that an asymmetric grid (--no-sym) gives where a group's "
                         "weights are (nearly) all positive; use --checkpoint-format gptq_v2, "
                         "or leave it out (v1 where the zero points allow it, else v2)")
    check_out_dir(args.out)
    _check_layer_shapes(args.model, args.bits, args.group_size)


def _calibration_chunks(args: argparse.Namespace, tokenizer):
    """int32 [n, seq_len] calibration token ids from --calibration's text (its head: the tail
    fraction --held-out is never used), with errors and warnings that name the flags."""
    import jaxinfer
    from jaxinfer.quant import token_chunks
    from jaxinfer.train.data import split_held_out, tokenize_corpus

    text_file = Path(args.calibration or jaxinfer.assets.corpus_sample_path())
    if not text_file.is_file():
        raise FileNotFoundError(f"--calibration file {text_file} does not exist")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--calibration file {text_file} is not UTF-8 text: {e}") from None
    tokens, _ = split_held_out(tokenize_corpus(text, tokenizer), args.held_out)
    available = len(tokens) // args.seq_len
    if available == 0:
        raise ValueError(f"--calibration file {text_file} gives {len(tokens)} tokens (less the "
                         f"--held-out {args.held_out} tail), fewer than one chunk of --seq-len "
                         f"{args.seq_len}")
    if available < args.n_samples:
        print(f"jaxinfer quantize: warning: --n-samples {args.n_samples} asked for more chunks "
              f"of --seq-len {args.seq_len} tokens than {text_file} holds: calibrating on the "
              f"{available} available", file=sys.stderr)
    return token_chunks(tokens, args.seq_len, args.n_samples), text_file


def quantize(args: argparse.Namespace) -> int:
    import jaxinfer
    from jaxinfer.checkpoint.hf_write import is_checkpoint_file

    _check_quantize_args(args)
    model = jaxinfer.load_pretrained(args.model)
    calibration = None
    if args.method == "gptq":
        calibration, text_file = _calibration_chunks(args, jaxinfer.load_tokenizer(args.model))
        print(f"calibration: {calibration.shape[0]} x {args.seq_len} tokens from {text_file}")
    t0 = time.perf_counter()
    quantized = jaxinfer.quantize(model, method=args.method, bits=args.bits,
                                  group_size=args.group_size, act_order=args.act_order,
                                  sym=args.sym, calibration=calibration, damp=args.damp)
    seconds = time.perf_counter() - t0
    out = jaxinfer.save_pretrained(quantized, args.out, checkpoint_format=args.checkpoint_format,
                                   extra_files=_source_files(Path(args.model), Path(args.out)))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors") if is_checkpoint_file(f.name))
    print(f"{args.method} {args.bits}-bit (group size {args.group_size}) in {seconds:.1f} s; "
          f"wrote {out} ({size / 2**20:.2f} MiB of safetensors)")
    return 0
