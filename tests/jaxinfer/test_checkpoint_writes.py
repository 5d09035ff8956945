"""save_pretrained replaces a directory's checkpoint as a whole: re-saving single-file over sharded
(and back) loads the new weights here and in transformers, a save that fails midway leaves the
old checkpoint unchanged, saving over the directory a model came from works, unrelated files
survive; Mixtral and Hyena save sharded too, and a misshapen Mixtral tensor is reported with its
real shapes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxinfer
from jaxinfer.checkpoint import hf_write
from jaxinfer.config import HyenaConfig
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.mixtral import MixtralForCausalLM
from jaxinfer.models.mixtral_config import MixtralConfig

LLAMA = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=32)
MIXTRAL = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        num_local_experts=4, num_experts_per_tok=2)
HYENA = HyenaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    max_position_embeddings=64, filter_hidden_size=16, filter_emb_dim=5,
                    fftconv_backend="xla")
# Each tiny model is ~30-120 kB of float32: 8 kB shards give several shards each.
SHARD_BYTES = 8_000
SHARDED, SINGLE = SHARD_BYTES, None


def llama(seed: int) -> jaxinfer.LlamaForCausalLM:
    return jaxinfer.LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(seed))


def params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(var.value)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(got: nnx.Module, want: nnx.Module) -> None:
    got, want = params(got), params(want)
    assert got.keys() == want.keys()
    for path in want:  # exact: saving and loading copy float32 bits
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory (relative path: contents)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    """Staging or backup directories a save left beside directory."""
    prefix = f".{directory.name}."
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(prefix))


def add_user_files(directory: Path) -> None:
    (directory / "tokenizer.json").write_text('{"user": "tokenizer"}')
    (directory / "notes").mkdir()
    (directory / "notes" / "README.md").write_text("kept")


@pytest.mark.parametrize("first, second", [(SHARDED, SINGLE), (SINGLE, SHARDED)],
                         ids=["single-over-sharded", "sharded-over-single"])
def test_resave_in_other_layout_loads_new_weights_here_and_in_transformers(tmp_path, first,
                                                                           second):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out, max_shard_bytes=first)
    add_user_files(out)
    new = llama(1)
    jaxinfer.save_pretrained(new, out, max_shard_bytes=second)

    weights = sorted(p.name for p in out.glob("model*"))
    if second is SINGLE:
        assert weights == ["model.safetensors"]
    else:
        assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and sorted(shards | {"model.safetensors.index.json"}) == weights
    assert snapshot(out)["tokenizer.json"] == b'{"user": "tokenizer"}'
    assert snapshot(out)["notes/README.md"] == b"kept"
    assert leftovers(out) == []
    assert_same_params(jaxinfer.load_pretrained(out), new)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().numpy(),
                                  np.asarray(new.embed_tokens.embedding.value))
    np.testing.assert_array_equal(hf.model.layers[1].mlp.down_proj.weight.detach().numpy().T,
                                  np.asarray(new.layers[1].mlp.down_proj.kernel.value))


@pytest.mark.parametrize("previous", [SINGLE, SHARDED], ids=["over-single", "over-sharded"])
def test_save_failing_after_first_file_leaves_previous_checkpoint_unchanged(tmp_path,
                                                                             monkeypatch,
                                                                             previous):
    out = tmp_path / "ckpt"
    old = llama(0)
    jaxinfer.save_pretrained(old, out, max_shard_bytes=previous)
    add_user_files(out)
    before = snapshot(out)
    real_save_file, calls = hf_write.save_file, []

    def save_file_then_crash(*args, **kwargs):
        real_save_file(*args, **kwargs)
        calls.append(args[1])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hf_write, "save_file", save_file_then_crash)
    with pytest.raises(OSError, match="simulated"):
        jaxinfer.save_pretrained(llama(1), out, max_shard_bytes=SHARDED)
    assert len(calls) == 1
    assert snapshot(out) == before
    assert leftovers(out) == []
    assert_same_params(jaxinfer.load_pretrained(out), old)


def test_without_atomic_exchange_the_rename_fallback_replaces_the_checkpoint(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(hf_write, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out, max_shard_bytes=SHARDED)
    add_user_files(out)
    new = llama(1)
    jaxinfer.save_pretrained(new, out)
    assert not (out / "model.safetensors.index.json").exists()
    assert snapshot(out)["notes/README.md"] == b"kept"
    assert leftovers(out) == []
    assert_same_params(jaxinfer.load_pretrained(out), new)


def test_exchange_swaps_two_directories_where_supported(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not hf_write._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: saves use the rename fallback")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_saving_over_the_directory_the_model_came_from(tmp_path):
    """In-place conversion (`jaxinfer convert d d`): the loaded arrays are copies, not views of
    the files being replaced."""
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out, max_shard_bytes=SHARDED)
    add_user_files(out)
    bf16 = jaxinfer.load_pretrained(out, dtype="bfloat16")
    jaxinfer.save_pretrained(bf16, out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert_same_params(jaxinfer.load_pretrained(out, dtype="bfloat16"), bf16)
    assert snapshot(out)["tokenizer.json"] == b'{"user": "tokenizer"}'


def test_float_resave_drops_a_stale_quantize_config(tmp_path):
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out)
    (out / "quantize_config.json").write_text('{"bits": 4, "group_size": 32}')
    jaxinfer.save_pretrained(llama(1), out)
    assert not (out / "quantize_config.json").exists()


@pytest.mark.parametrize("make", [
    lambda: MixtralForCausalLM(MIXTRAL, rngs=nnx.Rngs(0)),
    lambda: HyenaForCausalLM(HYENA, rngs=nnx.Rngs(0)),
], ids=["mixtral", "hyena"])
def test_mixtral_and_hyena_round_trip_sharded(tmp_path, make):
    model = make()
    out = jaxinfer.save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=SHARD_BYTES)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    loaded = jaxinfer.load_pretrained(out)
    assert type(loaded) is type(model)
    assert_same_params(loaded, model)


def test_mixtral_misshapen_embedding_error_names_on_disk_and_expected_shapes(tmp_path):
    out = jaxinfer.save_pretrained(MixtralForCausalLM(MIXTRAL, rngs=nnx.Rngs(0)), tmp_path)
    tensors = load_file(out / "model.safetensors")
    name = "model.embed_tokens.weight"
    tensors[name] = np.zeros((MIXTRAL.vocab_size + 4, MIXTRAL.hidden_size), np.float32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    on_disk = [MIXTRAL.vocab_size + 4, MIXTRAL.hidden_size]
    expected = [MIXTRAL.vocab_size, MIXTRAL.hidden_size]
    message = f"{name!r} in model.safetensors has shape {on_disk}; config.json implies {expected}"
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxinfer.load_pretrained(out)


def test_quantized_hyena_checkpoint_is_refused_naming_the_method(tmp_path):
    """Hyena loads float weights only; a quantization_config is refused before any tensor is
    read rather than ignored."""
    out = jaxinfer.save_pretrained(HyenaForCausalLM(HYENA, rngs=nnx.Rngs(0)), tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    message = "quant_method 'awq' is not supported for hyena checkpoints (only float weights)"
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxinfer.load_pretrained(out)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int.*got 0"):
        jaxinfer.save_pretrained(llama(0), tmp_path / "a", max_shard_bytes=0)
    with pytest.raises(ValueError, match="checkpoint_format.*HyenaForCausalLM"):
        jaxinfer.save_pretrained(HyenaForCausalLM(HYENA, rngs=nnx.Rngs(0)), tmp_path / "b",
                                 checkpoint_format="gptq")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out_dir must be a directory"):
        jaxinfer.save_pretrained(llama(0), tmp_path / "file")
    with pytest.raises(TypeError, match="model must be a jaxinfer LlamaForCausalLM.*got str"):
        jaxinfer.save_pretrained(str(tmp_path), tmp_path / "c")  # arguments swapped


def test_extra_files_replace_the_outs_in_the_same_swap_and_never_write_through_symlinks(
        tmp_path, monkeypatch):
    """`jaxinfer convert src out` hands src's tokenizer files to the save: they are in the new
    directory before it is swapped in, so no moment (and no crash) pairs new weights with the
    old tokenizer files, and a symlinked file in out is replaced, not written through."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text('{"marker": "NEW"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out)
    shared = tmp_path / "shared.json"
    shared.write_text('{"marker": "SHARED"}')
    (out / "tokenizer_config.json").symlink_to(shared)
    (out / "notes.txt").write_text("kept")
    seen = {}
    real_swap = hf_write._swap_into_place

    def spy_swap(staging, target):
        seen.update(snapshot(staging))
        real_swap(staging, target)
    monkeypatch.setattr(hf_write, "_swap_into_place", spy_swap)
    extra = {p.name: p for p in src.iterdir()}
    jaxinfer.save_pretrained(llama(1), out, extra_files=extra)
    assert seen["tokenizer_config.json"] == b'{"marker": "NEW"}'
    assert seen["chat_template.jinja"] == b"{{ messages }}"
    assert not (out / "tokenizer_config.json").is_symlink()
    assert (out / "tokenizer_config.json").read_text() == '{"marker": "NEW"}'
    assert shared.read_text() == '{"marker": "SHARED"}'
    assert (out / "notes.txt").read_text() == "kept"
    with pytest.raises(ValueError, match="extra_files names.*'config.json'"):
        jaxinfer.save_pretrained(llama(1), out, extra_files={"config.json": shared})


def test_read_only_out_dir_gets_its_mode_back_only_after_the_save_filled_the_new_one(
        tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    jaxinfer.save_pretrained(llama(0), out)
    (out / "tokenizer.json").write_text('{"user": "tokenizer"}')
    out.chmod(0o555)
    modes = []
    real_carry_over = hf_write._carry_over

    def spy_carry_over(old, staging):
        modes.append(staging.stat().st_mode & 0o777)
        real_carry_over(old, staging)
    monkeypatch.setattr(hf_write, "_carry_over", spy_carry_over)
    new = llama(1)
    try:
        jaxinfer.save_pretrained(new, out)
        assert modes and modes[0] & 0o200, "the staging directory was read-only while filled"
        assert out.stat().st_mode & 0o777 == 0o555
        assert (out / "tokenizer.json").read_text() == '{"user": "tokenizer"}'
        assert leftovers(out) == []
        assert_same_params(jaxinfer.load_pretrained(out), new)
    finally:
        out.chmod(0o755)


def test_unwritable_parent_is_refused_up_front_naming_out_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_write.os, "access", lambda path, mode: False)
    out = tmp_path / "ckpt"
    with pytest.raises(PermissionError, match=re.escape(f"cannot write {out}")):
        jaxinfer.save_pretrained(llama(0), out)
    assert not out.exists() and leftovers(out) == []


def test_safetensors_write_failure_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """A full disk: safetensors raises SafetensorError, a plain Exception the CLI would show as a
    traceback."""
    from safetensors import SafetensorError

    def full_disk(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(hf_write, "save_file", full_disk)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="model-00001-of-.*No space left"):
        jaxinfer.save_pretrained(llama(0), out, max_shard_bytes=SHARDED)
    assert not out.exists() and leftovers(out) == []


def test_weight_files_get_the_mode_of_the_json_files(tmp_path):
    mask = os.umask(0o022)
    try:
        out = jaxinfer.save_pretrained(llama(0), tmp_path / "ckpt", max_shard_bytes=SHARDED)
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["config.json"] == 0o644
    assert set(modes.values()) == {0o644}, modes


def test_stale_staging_directories_of_finished_processes_are_removed(tmp_path):
    out = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = hf_write._saver_tag()  # this host and PID namespace
    stale = [f".ckpt.saving-{tag}-{dead.pid}-0123abcd"]
    kept = [f".ckpt.saving-{tag}-{os.getppid()}-0123abcd",  # a running process may be saving now
            # another host's or container's save: its pid cannot be checked from here
            f".ckpt.saving-otherhost_{tag.rsplit('_', 1)[1]}-{dead.pid}-0123abcd",
            f".ckpt.saving-{tag.rsplit('_', 1)[0]}_1-{dead.pid}-0123abcd",
            ".ckpt.saving-89abcdef",  # an earlier version's, naming no process: left alone
            ".other.saving-0123abcd", ".ckpt.old-0123abcd", ".ckpt.saving-notmine"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    jaxinfer.save_pretrained(llama(0), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["ckpt"])
