"""`jaxinfer generate` hands the engine's options through: several prompts, n samples, stop
strings, min-p, repetition penalty, draft-model speculation; and refuses what it cannot honour."""

import argparse
import logging

import numpy as np
import pytest

import jaxinfer
from jaxinfer import cli, cli_flags


def _continuations(out: str, texts: list[str], n: int) -> list[list[str]]:
    """The CLI's stdout -> per prompt, its n continuations (the prompt text cut off)."""
    blocks = out.strip().split("--- prompt ")[1:]
    assert len(blocks) == len(texts) * n, out
    result = []
    for i, text in enumerate(texts):
        samples = []
        for j in range(n):
            header, body = blocks[i * n + j].split(" ---\n", 1)
            assert header == f"{i + 1}, sample {j + 1}"
            assert body.startswith(text)
            samples.append(body[len(text):].rstrip("\n"))
        result.append(samples)
    return result


def test_prompts_file_with_samples_and_filters_prints_what_the_engine_returns(tmp_path, capsys):
    texts = ["And God said", "In the beginning God"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(texts[0] + "\n\n" + texts[1] + "\n")  # blank lines are skipped
    assert cli.main(["generate", "--prompts-file", str(prompts_file), "--n", "2",
                     "--temperature", "0.9", "--top-p", "0.95", "--min-p", "0.02",
                     "--repetition-penalty", "1.3", "--stop", ",", "--seed", "5",
                     "--max-new-tokens", "10", "--max-batch", "8"]) == 0
    got = _continuations(capsys.readouterr().out, texts, n=2)

    model_dir = jaxinfer.default_model_dir()
    model, tok = jaxinfer.load_pretrained(model_dir), jaxinfer.load_tokenizer(model_dir)
    params = jaxinfer.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, min_p=0.02,
                                     repetition_penalty=1.3, stop=(",",), seed=5, n=2)
    engine = jaxinfer.Engine(model, max_batch=8, tokenizer=tok)
    outputs = engine.generate([tok.encode(t, add_special_tokens=False).ids for t in texts],
                              params)
    eos = model.config.eos_token_id
    expected = [[tok.decode([t for t in sample if t not in eos]) for sample in samples]
                for samples in outputs]
    assert got == expected
    # the stop string ends a sample: no "," before its last token, and it did end some
    samples = [sample for per_prompt in outputs for sample in per_prompt]
    assert all("," not in tok.decode(sample[:-1]) for sample in samples)
    assert any(tok.decode(sample).endswith(",") and len(sample) < 10 for sample in samples)


def test_draft_model_speculation_keeps_the_greedy_continuation(capsys):
    model_dir = jaxinfer.default_model_dir()
    model, tok = jaxinfer.load_pretrained(model_dir), jaxinfer.load_tokenizer(model_dir)
    ids = np.array([tok.encode("And God said").ids], dtype=np.int32)
    expected = tok.decode(np.asarray(jaxinfer.generate(model, ids, max_new_tokens=8))[0].tolist())
    # the model drafting for itself: a draft that agrees with the target wherever float
    # rounding allows, so nearly every drafted token is accepted
    assert cli.main(["generate", "And God said", "--max-new-tokens", "8", "--draft-model",
                     str(model_dir), "--speculative-tokens", "3", "--max-batch", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == expected.strip()
    accepted, drafted = (int(x) for x in
                         err.split("[speculative: ")[1].split(" drafted")[0].split(" of "))
    assert drafted > 0 and accepted >= drafted // 2, err


def _generate_args(*flags: str) -> argparse.Namespace:
    return cli._parser().parse_args(["generate", "x", *flags])


@pytest.mark.parametrize("flags", [["--n", "2"], ["--stop", "."], ["--speculative-tokens", "2"],
                                   ["--kv-cache-dtype", "int8"], ["--min-p", "0.1"],
                                   ["--max-batch", "8"], ["--page-size", "32"],
                                   ["--num-pages", "100"], ["--max-tokens-per-step", "64"]])
def test_engine_flags_are_refused_for_a_static_batch_model(flags):
    class Hyena:  # stands for a model without a paged KV cache; only its name is read
        pass
    with pytest.raises(ValueError, match=f"^{flags[0]} needs the serving engine.*Hyena"):
        cli._static_batch_runner(_generate_args(*flags), Hyena(), [[1, 2, 3]])


def test_several_engine_flags_are_refused_together_for_a_static_batch_model():
    class Hyena:
        pass
    with pytest.raises(ValueError, match="^--stop, --n need the serving engine"):
        cli._static_batch_runner(_generate_args("--n", "2", "--stop", "."), Hyena(), [[1, 2]])


def test_engine_sizes_left_at_their_defaults_pass_for_a_static_batch_model():
    class Hyena:
        pass
    default_sizes = ["--max-batch", "64", "--page-size", "16", "--max-tokens-per-step", "512"]
    assert callable(cli._static_batch_runner(_generate_args(*default_sizes), Hyena(), [[1, 2]]))


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--min-p", "1.5"], "--min-p must be a number in [0, 1]"),
    (["generate", "x", "--repetition-penalty", "0"], "--repetition-penalty must be a finite"),
    (["generate", "x", "--draft-model", "/nonexistent/draft", "--speculative-tokens", "2"],
     "does not exist"),
    (["generate", "x", "--prompts-file", "p.txt"], "not both"),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"],
     "error: --prompts-file /nonexistent/prompts.txt cannot be read (No such file or directory)"),
    (["generate", "--prompts-file", "/"],
     "error: --prompts-file / cannot be read (Is a directory)"),
], ids=["min-p", "repetition-penalty", "missing-draft", "prompt-and-file",
        "missing-prompts-file", "prompts-file-is-a-directory"])
def test_bad_generate_options_exit_2_with_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "error: --top-p must be a number in (0, 1]; got 1.5"),
    (["--seed", str(2**32)], "error: --seed must be an integer in [0, 4294967295]"),
    (["--num-pages", "1"], "plus --max-new-tokens 48 needs 3 KV pages of 16 tokens; the pool has 1"),
    (["--snapkv-budget", "1"], "error: --snapkv-budget must be at least 8: SnapKV keeps"),
    (["--snapkv-budget", "64", "--max-tokens-per-step", "4"],
     "error: --max-tokens-per-step must be at least 8 with --snapkv-budget"),
], ids=["SamplingParams-field", "SamplingParams-seed", "max-tokens", "snapkv-budget",
        "snapkv-step"])
def test_library_errors_name_the_flags_not_the_parameters(flags, message, capsys):
    assert cli.main(["generate", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not any(name in err for name in ("SamplingParams", "max_tokens", "snapkv_"))


@pytest.mark.parametrize("argv", [
    ["generate", "x", "--speculative-tokens", "-1"],
    ["generate", "x", "--seed", "-1"],
])
def test_negative_counts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "must be an integer >= 0; got -1" in capsys.readouterr().err


def test_a_binary_prompts_file_is_refused_naming_it(tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"In the beginning \xd0\x28 not UTF-8")
    assert cli.main(["generate", "--prompts-file", str(binary)]) == 2
    assert f"error: --prompts-file {binary} is not UTF-8 text: 'utf-8' codec" in (
        capsys.readouterr().err)


def test_max_tokens_is_max_new_tokens_and_no_flag_is_abbreviated(capsys):
    """vLLM's --max-tokens sets --max-new-tokens; it once set --max-tokens-per-step silently, as
    argparse took it for an abbreviation of that flag."""
    args = cli._parser().parse_args(["generate", "x", "--max-tokens", "100"])
    assert (args.max_new_tokens, args.max_tokens_per_step) == (100, 512)
    for argv in (["generate", "x", "--max-tokens-per", "64"], ["generate", "x", "--temp", "1"],
                 ["train", "--out", "r", "--corp", "c.txt"], ["convert", "a", "b", "--shard", "2"],
                 ["quantize", "a", "b", "--group", "16"]):
        with pytest.raises(SystemExit) as exit_info:
            cli._parser().parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"jaxinfer {argv[0]}: error: unrecognized arguments: {argv[-2]}" in err
        assert err.startswith(f"usage: jaxinfer {argv[0]} "), err  # the subcommand's usage


def test_an_unknown_argument_before_the_command_is_the_top_levels_to_refuse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli._parser().parse_args(["--foo", "generate", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "jaxinfer: error: unrecognized arguments: --foo" in err
    assert err.startswith("usage: jaxinfer [-h]"), err


@pytest.mark.parametrize("message,want", [
    ("SamplingParams.top_p must be None or a float; got 2", "--top-p must be a float; got 2"),
    ("max_tokens=48 leaves no room", "--max-new-tokens 48 leaves no room"),
    ("seed must be >= 0", "--seed must be >= 0"),
    ("got other values for top_k.", "got other values for --top-k."),
    # paths, file names and flags keep their names
    ("--prompts-file /tmp/seed=1/p.txt cannot be read", None),
    ("/data/top_k.txt and runs/max_tokens are missing", None),
    ("--stop must be non-empty; use --seed=3", None),
])
def test_flag_terms_leave_paths_and_flags_alone_and_translate_once(message, want):
    """A name is a flag only where it is one word of prose: never part of a path or file name,
    and a translated message translates to itself."""
    once = cli_flags.in_flag_terms(message, cli.GENERATE_FLAG_NAMES)
    assert once == (message if want is None else want)
    assert cli_flags.in_flag_terms(once, cli.GENERATE_FLAG_NAMES) == once


def test_the_kv_pool_is_sized_and_logged_once_in_the_clis_format(capsys):
    """Two engines serve a generate (an untimed call that compiles, then the timed one): the
    second takes the first's pool, so the sizing is logged once; the root logger's handlers are
    the caller's again after the command."""
    handlers = logging.getLogger().handlers[:]
    assert cli.main(["generate", "And God said", "--max-new-tokens", "2", "--max-batch",
                     "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("INFO jaxinfer.generate.paged_cache: KV pool: ") == 1, err
    assert "(engine, 1 request, " in err
    assert logging.getLogger().handlers == handlers


def test_an_empty_prompts_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert cli.main(["generate", "--prompts-file", str(empty)]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_a_top_k_beyond_int32_samples_as_no_top_k(capsys):
    """A top_k at or above the vocabulary is no filter, also one int32 cannot hold (it once
    ended the command with an OverflowError from inside the engine's step)."""
    argv = ["generate", "And God said", "--temperature", "0.9", "--seed", "5",
            "--max-new-tokens", "4", "--max-batch", "2", "--num-pages", "8"]
    assert cli.main(argv + ["--top-k", "3000000000"]) == 0
    huge_top_k = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert huge_top_k == capsys.readouterr().out


def _refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--top-p", "2"], "error: --top-p must be a number in (0, 1]; got 2.0"),
    (["generate", "x", "--temperature", "-1"], "error: --temperature must be"),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"],
     "error: --prompts-file /nonexistent/prompts.txt cannot be read (No such file or directory)"),
    (["generate", "x", "--first-finish"], "error: --first-finish needs --n >= 2"),
    (["generate", "x", "--first-finish", "--n", "1"], "error: --first-finish needs --n >= 2"),
    (["generate", "x", "--draft-model", "draft_dir"],
     "error: --draft-model needs --speculative-tokens >= 1"),
], ids=["top-p", "temperature", "missing-prompts-file", "first-finish", "first-finish-n-1",
        "draft-model-without-speculation"])
def test_model_independent_errors_come_before_the_model_is_loaded(argv, message, monkeypatch,
                                                                  capsys):
    """A big checkpoint takes long to load: what the flags alone refuse is refused first."""
    monkeypatch.setattr(jaxinfer, "load_pretrained", _refuse_loading)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not any(name in err for name in ("SamplingParams", "draft_model", "Errno"))


def test_a_draft_model_of_another_vocabulary_is_refused_naming_the_flag(tmp_path, capsys):
    from flax import nnx

    config = jaxinfer.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)
    draft = jaxinfer.save_pretrained(jaxinfer.LlamaForCausalLM(config, rngs=nnx.Rngs(0)),
                                     tmp_path / "draft")
    assert cli.main(["generate", "x", "--draft-model", str(draft), "--speculative-tokens",
                     "2"]) == 2
    err = capsys.readouterr().err
    assert "error: --draft-model must share the model's vocabulary" in err
    assert "draft_model" not in err
