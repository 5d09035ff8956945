"""`jaxinfer generate` hands the engine's options through: several prompts, n samples, stop
strings, min-p, repetition penalty, draft-model speculation; and refuses what it cannot honour."""

import argparse

import numpy as np
import pytest

import jaxinfer
from jaxinfer import cli


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
    with pytest.raises(ValueError, match=f"{flags[0]} need the serving engine.*Hyena"):
        cli._static_batch_runner(_generate_args(*flags), Hyena(), [[1, 2, 3]])


def test_engine_sizes_left_at_their_defaults_pass_for_a_static_batch_model():
    class Hyena:
        pass
    default_sizes = ["--max-batch", "64", "--page-size", "16", "--max-tokens-per-step", "512"]
    assert callable(cli._static_batch_runner(_generate_args(*default_sizes), Hyena(), [[1, 2]]))


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--min-p", "1.5"], "min_p"),
    (["generate", "x", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "x", "--speculative-tokens", "-1"], "speculative_tokens"),
    (["generate", "x", "--draft-model", "/nonexistent/draft", "--speculative-tokens", "2"],
     "does not exist"),
    (["generate", "x", "--prompts-file", "p.txt"], "not both"),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"], "No such file"),
    (["generate", "--prompts-file", "/"], "Is a directory"),
], ids=["min-p", "repetition-penalty", "speculative-tokens", "missing-draft", "prompt-and-file",
        "missing-prompts-file", "prompts-file-is-a-directory"])
def test_bad_generate_options_exit_2_with_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


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
