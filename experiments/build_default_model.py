"""Rebuild the embedded default model: a small Llama trained by `jaxinfer train` on the KJV Bible.

    python -m experiments.build_default_model            # full build, replaces jaxinfer/assets/default_model
    python -m experiments.build_default_model --quick    # seconds: tiny model, nothing replaced

The corpus is the King James Version (public domain) from Debian's `bible-kjv` package
(`apt-get install bible-kjv`), one verse per line with the references stripped. The last 5% of the
token stream (the end of Revelation and the epistles before it) is held out for perplexity.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from experiments.common import (RESULTS, environment, parse_experiment_args, plot_curves,
                                print_table, write_json)
from jaxinfer import cli
from jaxinfer.assets import ASSETS, corpus_sample_path

MODEL_CONFIG = {  # ~4M parameters, 16 MB in float32 (the issue caps the asset at ~25 MB)
    "model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
}
QUICK_CONFIG = {**MODEL_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300}
FULL = dict(steps=900, batch_size=16, seq_len=128, lr=3e-3, warmup=50, eval_every=100,
            checkpoint_every=100, vocab_size=4096)
QUICK = dict(steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_every=2,
             checkpoint_every=2, vocab_size=300)
VERSE_REFERENCE = re.compile(r"^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ ")


def kjv_text() -> str:
    """The whole KJV, one verse per line, from the `bible` program of Debian's bible-kjv."""
    if shutil.which("bible") is None:
        raise SystemExit("the KJV corpus needs Debian's bible-kjv: apt-get install bible-kjv")
    raw = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    return "".join(VERSE_REFERENCE.sub("", line) + "\n" for line in raw.splitlines() if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "build_default_model.json"))
    parser.add_argument("--run-dir", help="where the training run lives (default: runs/default_model)")
    args = parse_experiment_args(parser)

    work = Path(tempfile.mkdtemp()) if args.quick else Path(args.run_dir or "runs/default_model")
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if args.quick:
        corpus.write_text(corpus_sample_path().read_text())
    elif not corpus.exists():
        corpus.write_text(kjv_text())
    settings, model_config = (QUICK, QUICK_CONFIG) if args.quick else (FULL, MODEL_CONFIG)
    config_file = work / "model_config.json"
    config_file.write_text(json.dumps(model_config, indent=2))

    run = work / "run"
    argv = ["train", "--corpus", str(corpus), "--config", str(config_file), "--out", str(run),
            "--vocab-size", str(settings["vocab_size"]), "--steps", str(settings["steps"]),
            "--batch-size", str(settings["batch_size"]), "--seq-len", str(settings["seq_len"]),
            "--lr", str(settings["lr"]), "--warmup", str(settings["warmup"]),
            "--eval-every", str(settings["eval_every"]),
            "--checkpoint-every", str(settings["checkpoint_every"])]
    if (run / "train_config.json").exists():
        argv = ["train", "--out", str(run), "--resume"]
    if cli.main(argv) != 0:
        raise SystemExit("training failed")
    summary = json.loads((run / "summary.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    record = {"experiment": "build_default_model", "quick": args.quick, **environment(),
              "corpus": "King James Bible (Debian bible-kjv), one verse per line",
              "corpus_bytes": corpus.stat().st_size, "model_config": model_config,
              "train_settings": settings,
              **{k: v for k, v in summary.items() if k != "wall_seconds_this_invocation"},
              "wall_seconds_total": sum(r.get("seconds", 0) for r in history) or None,
              "eval_curve": [{k: r[k] for k in ("step", "loss", "eval_loss", "eval_perplexity")}
                             for r in history if "eval_loss" in r]}
    print_table(record["eval_curve"], ["step", "loss", "eval_loss", "eval_perplexity"])
    if not args.quick:
        target = ASSETS / "default_model"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run / "model", target)
    evals = record["eval_curve"]
    png = plot_curves({"train (per step)": ([r["step"] for r in history], [r["loss"] for r in history]),
                       "held-out": ([r["step"] for r in evals], [r["eval_loss"] for r in evals])},
                      xlabel="step", ylabel="cross-entropy (nats/token)",
                      title="embedded default model on the KJV Bible",
                      out=Path(args.out).with_suffix(".png"))
    print(f"wrote {write_json(record, args.out)} and {png}")


if __name__ == "__main__":
    main()
