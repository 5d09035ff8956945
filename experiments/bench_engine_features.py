"""`jaxinfer.Engine` features against the plain engine, in one run: prefix caching, Hydragen and
int8 KV on a shared-system-prompt workload, prompt-lookup and draft-model speculation on a copying
workload.

    python -m experiments.bench_engine_features            # 32 requests, 256-token shared prefix
    python -m experiments.bench_engine_features --quick    # seconds on a CPU (plus compilation)

Workloads, cut from the embedded corpus sample; greedy, exact output lengths (ignore_eos), served
with `bench_serving.serve` (all at once by default: --rate inf; a finite --rate is Poisson):
  shared  every prompt = the same --prefix-len-token system prompt + its own question, lengths
          uniform in [--question-len]; outputs uniform in [--output-len].
  copy    every prompt = a passage of --passage-len tokens followed by its first --cue-len tokens
          again, so that a model that copies continues with the passage (the case prompt lookup
          is for); outputs uniform in [--copy-output-len].
Rows, each run on a fresh engine (an empty prefix cache) with the same max_batch, page size, pool
and step budget, after its warm-up (compilation, not timed); every configuration runs --repeats
times, in turn with the others, and the table gives the medians (and tok/s's min and max):
  shared  no_prefix_cache (prefix_caching=False, the peer), prefix_cache (the default engine),
          hydragen (+ hydragen=True), int8_kv (+ kv_dtype="int8"); the last two keep prefix
          caching on (Hydragen needs its shared pages), so compare them with prefix_cache
  copy    no_speculation (the peer), lookup (speculative_tokens=--spec-tokens,
          lookup_ngram=--lookup-ngram), draft_model (speculative_tokens=--spec-tokens with
          the target's first --draft-layers layers as the draft: bench_speculative's
          `truncated_draft`, untrained)
Columns: bench_serving's throughput and latency (`latency_row`); `speedup` = tok/s over the peer
of the same workload; `cached_tokens` = prompt tokens taken from the prefix cache
(`num_cached_tokens`); `kv_bytes_per_token` (K and V of one token in all layers, int8 with its
float32 scales) and `kv_pool_MiB`; `acceptance` = num_accepted_tokens / num_draft_tokens;
`same_outputs` = share of requests whose tokens equal the peer's (1 for the exact features;
int8 KV may change some). The model is `jaxinfer.default_model_dir()` unless --model.

A second table times single engine steps of fixed mixes (`STEP_MIXES`: decodes at a context plus
one prompt chunk, placed on shuffled pages) under paged_attention="ragged" and "per_token",
interleaved, the median of --step-reps steps each: `per_token_over_ragged` > 1 where ragged is
faster, and `auto` the path "auto" takes for that bucket (`engine_step.attends_ragged`).
--step-reps 0 skips it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxinfer
from experiments.bench_serving import corpus_stream, latency_row, serve
from experiments.bench_speculative import truncated_draft
from experiments.common import (RESULTS, environment, parse_experiment_args, print_table,
                                time_interleaved, write_json)
from jaxinfer.generate.engine_step import PAGED_ATTENTION, attends_ragged
from jaxinfer.generate.scheduler import Chunk, Request
from jaxinfer.models.paged_kv import page_bytes

# (workload, row name, Engine keywords); the first row of each workload is its peer
CONFIGS = (
    ("shared", "no_prefix_cache", dict(prefix_caching=False)),
    ("shared", "prefix_cache", dict()),
    ("shared", "hydragen", dict(hydragen=True)),
    ("shared", "int8_kv", dict(kv_dtype="int8")),
    ("copy", "no_speculation", dict()),
    ("copy", "lookup", "lookup"),  # speculative_tokens and lookup_ngram from the command line
    ("copy", "draft_model", "draft"),  # speculative_tokens and a draft model from the command line
)
# (decodes, their context, prompt-chunk tokens after that context) of one step each, for
# max_batch 32 and a 256-token budget (quick: 8 and 8); mixes a geometry cannot serve are skipped
STEP_MIXES = ((8, 128, 0), (32, 128, 0), (16, 384, 16), (24, 128, 40), (0, 0, 64),
              (24, 128, 104), (0, 0, 128), (8, 128, 248), (31, 256, 225))
QUICK_STEP_MIXES = ((8, 32, 0), (2, 32, 6))
COLUMNS = ["workload", "config", "tok_s", "tok_s_min", "tok_s_max", "speedup", "ttft_p50_ms",
           "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "steps", "cached_tokens",
           "kv_bytes_per_token", "kv_pool_MiB", "acceptance", "same_outputs", "warmup_s"]


def uniform(rng: np.random.Generator, bounds: list[int]) -> int:
    """An integer uniform in [bounds[0], bounds[1]], both included."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def shared_prefix_workload(stream: np.ndarray, args, rng: np.random.Generator
                           ) -> list[tuple[list, int]]:
    """(prompt ids, output length) per request: one system prompt + a question of each's own."""
    prefix = stream[:args.prefix_len].tolist()
    work = []
    for _ in range(args.num_requests):
        length = uniform(rng, args.question_len)
        start = int(rng.integers(args.prefix_len, len(stream) - length))
        work.append((prefix + stream[start:start + length].tolist(), uniform(rng, args.output_len)))
    return work


def copy_workload(stream: np.ndarray, args, rng: np.random.Generator) -> list[tuple[list, int]]:
    """(prompt ids, output length) per request: a passage, then its beginning again as a cue."""
    work = []
    for _ in range(args.num_requests):
        start = int(rng.integers(0, len(stream) - args.passage_len))
        passage = stream[start:start + args.passage_len].tolist()
        work.append((passage + passage[:args.cue_len], uniform(rng, args.copy_output_len)))
    return work


def kv_bytes_per_token(config, kv_dtype: str | None) -> int:
    """Pool bytes one token's K and V take in all layers (int8: values plus float32 scales)."""
    return page_bytes(config.num_hidden_layers, 1, config.num_key_value_heads, config.head_dim,
                      jnp.dtype(config.dtype if kv_dtype is None else kv_dtype))


def measure(model, work, options: dict, args) -> tuple[dict, dict]:
    """A fresh engine with `options`, warmed up, serving `work`: (table row, serve's run)."""
    engine = jaxinfer.Engine(model, max_batch=args.max_batch, page_size=args.page_size,
                             num_pages=args.num_pages,
                             max_tokens_per_step=args.max_tokens_per_step,
                             paged_attention=args.paged_attention, **options)
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    run = serve(engine, work, args.rate, np.random.default_rng(args.seed + 1))
    per_token = kv_bytes_per_token(model.config, options.get("kv_dtype"))
    row = {**latency_row(run, len(work)), "cached_tokens": engine.num_cached_tokens,
           "kv_bytes_per_token": per_token,
           "kv_pool_MiB": engine.num_pages * args.page_size * per_token / 2**20,
           "warmup_s": warmup_s}
    if engine.num_draft_tokens:
        row.update(acceptance=engine.num_accepted_tokens / engine.num_draft_tokens,
                   draft_tokens=engine.num_draft_tokens,
                   accepted_tokens=engine.num_accepted_tokens)
    return row, run


def combine(measured: list[tuple[dict, dict]]) -> dict:
    """One configuration's row from its repeats: the median of every column, the spread of
    tok/s, and the first repeat's warm-up (the one that compiled)."""
    rows = [row for row, _ in measured]
    tok_s = [r["tok_s"] for r in rows]
    return {**{k: statistics.median(r[k] for r in rows) for k in rows[0]},
            "tok_s_min": min(tok_s), "tok_s_max": max(tok_s), "warmup_s": rows[0]["warmup_s"],
            "repeats": len(rows)}


def same_outputs(run: dict, peer: dict) -> float:
    """Share of requests (in submission order) whose generated tokens equal the peer run's."""
    mine, theirs = list(run["outputs"].values()), list(peer["outputs"].values())
    return sum(a == b for a, b in zip(mine, theirs)) / len(theirs)


def plot_rows(rows: list[dict], out: Path) -> Path:
    """Bars of throughput and TTFT p50 per row (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['config']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "tok_s", "output tokens/s"),
                           (axes[1], "ttft_p50_ms", "TTFT p50 (ms)")):
        ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("jaxinfer.Engine features")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def step_mix(engine: jaxinfer.Engine, mix: tuple[int, int, int], pages: np.ndarray
             ) -> list[Chunk]:
    """The chunks of one step: `decodes` one-token chunks at `context`, then a prompt chunk of
    `chunk` tokens after `context`; each request gets its own run of the shuffled `pages`."""
    decodes, context, chunk = mix
    params = jaxinfer.SamplingParams(max_tokens=1, temperature=0.0)
    shapes = [(context, context - 1, 1)] * decodes  # (sequence length, chunk start, its tokens)
    if chunk:
        shapes.append((context + chunk, context, chunk))
    chunks, used = [], 0
    for slot, (length, start, count) in enumerate(shapes):
        request = Request(slot, 0, [1] * length, params, slot, slot=slot)
        request.pages = pages[used:used + -(-length // engine.page_size)].tolist()
        used += len(request.pages)
        chunks.append(Chunk(request, start, count))
    return chunks


def time_steps(model, args) -> list[dict]:
    """The step table (see the module docstring). Reaches into the engines' compiled step to run
    one hand-built step repeatedly (its K/V writes land on the same slots each time)."""
    mixes = [(decodes, context, chunk) for decodes, context, chunk in
             (QUICK_STEP_MIXES if args.quick else STEP_MIXES)  # those this geometry serves
             if decodes + (chunk > 0) <= args.max_batch
             and decodes + chunk <= args.max_tokens_per_step]
    engines = {mode: jaxinfer.Engine(model, max_batch=args.max_batch, page_size=args.page_size,
                                     num_pages=args.num_pages,
                                     max_tokens_per_step=args.max_tokens_per_step,
                                     paged_attention=mode) for mode in ("ragged", "per_token")}
    pages = np.random.default_rng(args.seed).permutation(engines["ragged"].num_pages)
    rows = []
    for mix in mixes:
        inputs = engines["ragged"]._build_inputs(step_mix(engines["ragged"], mix, pages))[0]
        # the warm-up round compiles; a step's sampled tokens are what it is waited on by
        times = time_interleaved({mode: lambda e=e: e._step(inputs)[0]
                                  for mode, e in engines.items()}, args.step_reps)
        ragged, per_token = (1e3 * statistics.median(times[m]) for m in ("ragged", "per_token"))
        bucket, seqs = len(inputs.valid), len(inputs.seq_slot)
        rows.append({"decodes": mix[0], "context": mix[1], "chunk": mix[2], "bucket": bucket,
                     "chunk_slots": seqs, "ragged_ms": ragged, "per_token_ms": per_token,
                     "per_token_over_ragged": per_token / ragged,
                     "auto": "ragged" if attends_ragged("auto", bucket, seqs) else "per_token"})
    return rows


def feature_rows(model, workloads: dict, args) -> list[dict]:
    """The feature table: every configuration --repeats times, in turn (module docstring)."""
    speculation = {
        "lookup": dict(speculative_tokens=args.spec_tokens, lookup_ngram=args.lookup_ngram),
        "draft": dict(speculative_tokens=args.spec_tokens,
                      draft_model=truncated_draft(model, args.draft_layers))}
    configs = [(workload, name, speculation[options] if isinstance(options, str) else options)
               for workload, name, options in CONFIGS]
    measured: dict[str, list[tuple[dict, dict]]] = {}
    for repeat in range(args.repeats):
        for workload, name, options in configs:
            row, run = measure(model, workloads[workload], options, args)
            measured.setdefault(name, []).append((row, run))
            print(f"repeat {repeat} {workload} {name}: {row['tok_s']:.1f} tok/s, TTFT p50 "
                  f"{row['ttft_p50_ms']:.1f} ms", flush=True)
    rows, peers = [], {}
    for workload, name, options in configs:
        row, run = combine(measured[name]), measured[name][0][1]
        peer_row, peer_run = peers.setdefault(workload, (row, run))
        shown = {k: v for k, v in options.items() if k != "draft_model"}  # JSON-able settings
        rows.append({"workload": workload, "config": name, **shown, **row,
                     "speedup": row["tok_s"] / peer_row["tok_s"],
                     "same_outputs": same_outputs(run, peer_run)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=str(jaxinfer.default_model_dir()))
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=float("inf"), help="requests/s")
    parser.add_argument("--prefix-len", type=int, default=256)
    parser.add_argument("--question-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--passage-len", type=int, default=128)
    parser.add_argument("--cue-len", type=int, default=32)
    parser.add_argument("--copy-output-len", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--spec-tokens", type=int, default=4)
    parser.add_argument("--lookup-ngram", type=int, default=3)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int)
    parser.add_argument("--max-tokens-per-step", type=int, default=256)
    parser.add_argument("--paged-attention", choices=PAGED_ATTENTION, default="auto",
                        help="Engine(paged_attention=): ragged, per_token or auto (by bucket)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every configuration, in turn (medians are reported; 0: "
                             "no feature table)")
    parser.add_argument("--step-reps", type=int, default=15,
                        help="timed steps per mix and path in the step table (0: no table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "bench_engine_features.json"))
    args = parse_experiment_args(parser)
    if args.quick:  # one token bucket (8) that max_batch rows fill: lookup compiles nothing new
        args.num_requests, args.prefix_len, args.question_len = 4, 32, [4, 8]
        args.output_len, args.passage_len, args.cue_len = [2, 4], 24, 8
        args.copy_output_len, args.spec_tokens = [4, 6], 2
        args.max_batch, args.max_tokens_per_step, args.repeats = 8, 8, 1
        args.step_reps = min(args.step_reps, 2)

    model = jaxinfer.load_pretrained(args.model)
    stream = corpus_stream(jaxinfer.load_tokenizer(args.model))
    rng = np.random.default_rng(args.seed)
    workloads = {"shared": shared_prefix_workload(stream, args, rng),
                 "copy": copy_workload(stream, args, rng)}
    rows = feature_rows(model, workloads, args) if args.repeats else []
    if rows:
        print_table(rows, COLUMNS)
    step_rows = time_steps(model, args) if args.step_reps else []
    if step_rows:
        print("\none engine step: ragged_paged_attention vs one decode per token")
        print_table(step_rows, list(step_rows[0]))

    out = Path(args.out)
    png = plot_rows(rows, out.with_suffix(".png")) if rows else None
    settings = {k: v if not isinstance(v, float) or np.isfinite(v) else "inf"
                for k, v in vars(args).items()}
    record = {"experiment": "bench_engine_features", "quick": args.quick, **environment(),
              "model": Path(args.model).name, "settings": settings,
              "workload_tokens": {name: {"prompt": sum(len(p) for p, _ in work),
                                         "output": sum(n for _, n in work)}
                                  for name, work in workloads.items()},
              "rows": rows, "step_rows": step_rows,
              "png": png and str(png)}
    print(f"wrote {write_json(record, out)} {png or ''}")


if __name__ == "__main__":
    main()
