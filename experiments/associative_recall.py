"""Associative recall in miniature: a tiny Hyena and a tiny Llama (attention) of similar size
trained on the same synthetic key-value sequences at several lengths.

    python -m experiments.associative_recall           # lengths 63/127, 700 steps (~12 min, 2 CPUs)
    python -m experiments.associative_recall --quick    # seconds: one length, a few steps

The task (Hyena paper, Sec. 4.1; Zoology's multi-query form): each sequence draws a random
mapping key -> value, then lists m pairs "k v" with keys drawn with replacement (so keys repeat
and keep their value) and ends with a query key q that appeared; the model must emit mapping[q].
Keys and values use disjoint token ranges. Both models train with the shared next-token step
(``jaxinfer.train.step.train_step``, AdamW), so the loss covers every position; only values whose
key occurred earlier are predictable. Reported per model and length on held-out sequences:
``query_acc`` (the final query's value, the paper's metric) and ``recall_acc`` (every predictable
value position). Chance is 1 / num_values. The query accuracy is also recorded every
--eval-every steps: recall is learned in a sudden jump, which the PNG's curves show.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common import (RESULTS, environment, parse_experiment_args, plot_curves,
                                print_table, write_json)
from jaxinfer.config import HyenaConfig, LlamaConfig
from jaxinfer.models.hyena import HyenaForCausalLM
from jaxinfer.models.llama import LlamaForCausalLM
from jaxinfer.train.optimizer import make_optimizer
from jaxinfer.train.step import train_step


def make_batch(rng: np.random.Generator, batch: int, length: int, num_keys: int,
               num_values: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [batch, length + 1] (length odd: m pairs, then the query and its answer) and
    predictable bool [batch, length]: True where the next token is the value of a key seen
    before (the target of input position i is tokens[i + 1])."""
    pairs = (length - 1) // 2
    mapping = rng.integers(0, num_values, (batch, num_keys)) + num_keys  # values after keys
    keys = rng.integers(0, num_keys, (batch, pairs))
    query = keys[np.arange(batch), rng.integers(0, pairs, batch)]  # [batch], a key that appeared
    keys = np.concatenate([keys, query[:, None]], axis=1)  # [batch, pairs + 1]
    values = np.take_along_axis(mapping, keys, axis=1)
    tokens = np.stack([keys, values], axis=2).reshape(batch, 2 * pairs + 2).astype(np.int32)
    seen = np.zeros((batch, pairs + 1), bool)
    for j in range(1, pairs + 1):
        seen[:, j] = (keys[:, :j] == keys[:, j:j + 1]).any(axis=1)
    predictable = np.zeros((batch, length), bool)
    predictable[:, 0::2] = seen  # input position 2j holds key j; its target is value j
    return tokens, predictable


def build_model(kind: str, args, length: int, seed: int) -> nnx.Module:
    vocab = args.num_keys + args.num_values
    common = dict(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, max_position_embeddings=length)
    if kind == "hyena":
        config = HyenaConfig(**common, filter_hidden_size=32, filter_emb_dim=5,
                             fftconv_backend="auto")
        return HyenaForCausalLM(config, rngs=nnx.Rngs(seed))
    config = LlamaConfig(**common, num_attention_heads=args.heads, num_key_value_heads=args.heads)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def accuracy(logits_fn, params, tokens: np.ndarray, predictable: np.ndarray) -> tuple[float, float]:
    """(query accuracy, recall accuracy) of greedy predictions on held-out tokens
    [eval, length + 1] with their predictable mask [eval, length]."""
    pred = np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(tokens[:, :-1])), -1))
    correct = pred == tokens[:, 1:]  # [eval, length]
    return float(correct[:, -1].mean()), float(correct[predictable].mean())


def run(kind: str, length: int, args) -> dict:
    """Train one model at one length; returns the result row with its loss curve and the
    held-out query accuracy every `args.eval_every` steps (the curve shows the jump)."""
    rng = np.random.default_rng(args.seed)
    model = build_model(kind, args, length, args.seed)
    graphdef, params = nnx.split(model)
    lr = args.lr if kind == "hyena" else args.attention_lr
    tx = make_optimizer(learning_rate=lr, total_steps=args.steps,
                        warmup_steps=int(args.steps * args.warmup), weight_decay=0.0,
                        clip_norm=1.0)
    opt_state = tx.init(params)
    eval_tokens, eval_mask = make_batch(np.random.default_rng(args.seed + 1), args.eval_size,
                                        length, args.num_keys, args.num_values)
    logits_fn = jax.jit(lambda p, ids: nnx.merge(graphdef, p).forward(ids)[0])
    began, losses, curve = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        tokens, _ = make_batch(rng, args.batch, length, args.num_keys, args.num_values)
        params, opt_state, loss, _ = train_step(graphdef, tx, params, opt_state,
                                                jnp.asarray(tokens)[None])
        losses.append(float(loss))
        if step % args.eval_every == 0 and step < args.steps:
            curve.append([step, accuracy(logits_fn, params, eval_tokens, eval_mask)[0]])
    query_acc, recall_acc = accuracy(logits_fn, params, eval_tokens, eval_mask)
    train_seconds = time.perf_counter() - began  # the periodic evaluations included
    curve.append([args.steps, query_acc])
    return {"model": kind, "seq_len": length, "params": count_params(model),
            "final_loss": float(np.mean(losses[-10:])), "query_acc": query_acc,
            "recall_acc": recall_acc, "train_s": train_seconds, "chance": 1.0 / args.num_values,
            "losses": losses, "query_acc_curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[63, 127],
                        help="input lengths (odd: pairs plus the query)")
    parser.add_argument("--models", nargs="+", default=["hyena", "llama"])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1,
                        help="the attention model's heads (same parameters for any count); at "
                             "this budget one head of width --hidden learns the task, 4 of 16 "
                             "stayed near 0.36 for 2000 steps")
    parser.add_argument("--num-keys", type=int, default=8)
    parser.add_argument("--num-values", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="the Hyena model's peak rate")
    parser.add_argument("--attention-lr", type=float, default=1e-3,
                        help="the attention model's peak rate; probes at L = 63: attention "
                             "learned at 1e-3 but not at 5e-3, Hyena learned fastest at 5e-3")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="linear warmup, as a fraction of --steps (then cosine decay)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="steps between held-out query-accuracy points of the curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "associative_recall.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        args.lengths, args.steps, args.batch, args.eval_size, args.eval_every = [31], 10, 8, 32, 5
        args.hidden, args.layers = 32, 1
    bad = [n for n in args.lengths if n < 3 or n % 2 == 0]
    if bad:
        parser.error(f"--lengths must be odd and >= 3 (pairs plus a query); got {bad}")
    if args.eval_every < 1:
        parser.error(f"--eval-every must be a positive number of steps; got {args.eval_every}")
    if not 0.0 <= args.warmup < 1.0:
        parser.error(f"--warmup must be a fraction of --steps in [0, 1); got {args.warmup}")

    out = Path(args.out)
    rows: list[dict] = []
    record = {**environment(), "quick": args.quick, "settings": vars(args), "rows": rows}
    for length in args.lengths:
        for kind in args.models:
            rows.append(run(kind, length, args))
            write_json(record, out)  # a long run killed midway keeps what it finished
            print(f"{kind} L={length}: query_acc {rows[-1]['query_acc']:.3f} "
                  f"({rows[-1]['train_s']:.0f} s)", flush=True)
    print_table(rows, ["model", "seq_len", "params", "final_loss", "query_acc", "recall_acc",
                       "chance", "train_s"])
    curves = {f"{r['model']} L={r['seq_len']}": tuple(zip(*r["query_acc_curve"])) for r in rows}
    title = f"associative recall, batch {args.batch}, chance {1 / args.num_values:.3g}"
    png = plot_curves(curves, xlabel="training step", ylabel="query accuracy (held out)",
                      title=title, out=out.with_suffix(".png"))
    record["png"] = str(png)
    print(f"wrote {write_json(record, out)} and {png}")


if __name__ == "__main__":
    main()
