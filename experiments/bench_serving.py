"""Serving benchmark in vLLM's manner: Poisson arrivals into `jaxinfer.Engine`; latency, throughput.

    python -m experiments.bench_serving            # 64 requests at 4, 16 and inf requests/s
    python -m experiments.bench_serving --quick    # seconds on a CPU
    python -m experiments.bench_serving --random-model 2048 16 --dtype bfloat16   # ~1B, on a GPU

Workload: prompts cut from the sample corpus with lengths uniform in [--prompt-len], outputs of
lengths uniform in [--output-len], generated exactly (ignore_eos, as vLLM's benchmarks do), greedy.
Gaps between arrivals are exponential (Poisson, vLLM's burstiness 1); rate inf submits all at once.
The engine is warmed up over every token bucket first, so no compilation is timed, and each rate
runs on a fresh engine: the workload repeats, and a warm prefix cache would serve later rates'
prompts from earlier runs' pages (the cached_tokens column counts prompt tokens taken that way).
--random-model HIDDEN LAYERS serves a randomly initialised Llama of that width and depth with the
embedded model's tokenizer (heads of 128, 4 query heads per KV head, SwiGLU width 8/3 x hidden),
saved to a temporary directory that the peer loads too: a model large enough for the decode
roofline to mean something on a GPU, which cannot download one.

Metrics per rate (vLLM's definitions): TTFT (arrival to first token), TPOT ((last - first token
time) / (tokens - 1)), ITL (gaps between streamed tokens), p50 and p99 of each; output tokens/s
and requests/s over the run. The peer is `transformers` `generate` on the same requests, its
weights in the engine's --dtype, on PyTorch's CUDA device when there is one, in static batches of
--peer-batch (left-padded, each batch decoding to its longest output; only the requested tokens
count), run offline. The ratio compares it with the engine's offline (rate inf) throughput:
--peer-repeats rounds, each an offline run on a fresh engine then a peer run, so that load from
other processes falls on both alike; the ratio is of the medians, and the spread is reported.

Decode roofline (serving.md §4): a decode step must read the weights W and every sequence's KV,
bytes = W + sum_i c_i * KV bytes per token; t_roofline = bytes / bandwidth, with the bandwidth
measured here (a large on-device copy). Percent of roofline = sum t_roofline / sum t_measured over
the decode-only steps of the rate-inf run. The JSON is rewritten after every rate, the roofline and
the peer, so a run killed by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxinfer
from experiments.common import (RESULTS, copy_bandwidth, environment, init_model,
                                parse_experiment_args, plot_curves, print_table, write_json)
from jaxinfer.generate.engine_step import PAGED_ATTENTION
from jaxinfer.models.paged_kv import page_bytes


def make_workload(stream: np.ndarray, args, rng: np.random.Generator) -> list[tuple[list, int]]:
    """(prompt ids, output length) per request."""
    work = []
    for _ in range(args.num_requests):
        length = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        start = int(rng.integers(0, len(stream) - length))
        work.append((stream[start:start + length].tolist(),
                     int(rng.integers(args.output_len[0], args.output_len[1] + 1))))
    return work


def random_model_dir(hidden: int, layers: int, out_dir: str) -> Path:
    """A randomly initialised Llama (seed 0) of `hidden` width and `layers` layers with the
    embedded model's vocabulary, saved with its tokenizer as an HF directory in out_dir."""
    base = jaxinfer.default_model_dir()
    heads = max(1, hidden // 128)
    config = jaxinfer.LlamaConfig.from_json_file(base / "config.json").replace(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads,
        intermediate_size=-(-8 * hidden // 3 // 64) * 64, max_position_embeddings=4096)
    return jaxinfer.save_pretrained(init_model(config), out_dir,
                                    tokenizer=jaxinfer.load_tokenizer(base))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def corpus_stream(tokenizer) -> np.ndarray:
    """Token ids [T] of the start of the embedded corpus sample, the text workloads are cut from."""
    text = Path(jaxinfer.assets.corpus_sample_path()).read_text()
    return np.array(tokenizer.encode(text[:200000]).ids, dtype=np.int32)


def serve(engine: jaxinfer.Engine, work, rate: float, rng: np.random.Generator) -> dict:
    """Run the workload with Poisson arrivals at `rate` requests/s; per-request token times and
    generated token ids (by request id)."""
    gaps = rng.exponential(1.0 / rate, len(work)) if np.isfinite(rate) else np.zeros(len(work))
    arrivals = np.cumsum(gaps) - gaps[0]
    token_times: dict[int, list[float]] = {}
    outputs: dict[int, list[int]] = {}
    arrival_of: dict[int, float] = {}
    steps = []  # (seconds, StepStats)
    next_request, t0 = 0, time.perf_counter()
    while next_request < len(work) or engine.num_unfinished:
        now = time.perf_counter() - t0
        while next_request < len(work) and arrivals[next_request] <= now:
            prompt, out_len = work[next_request]
            rid = engine.submit(prompt, jaxinfer.SamplingParams(
                max_tokens=out_len, temperature=0.0, ignore_eos=True))
            arrival_of[rid] = t0 + arrivals[next_request]
            token_times[rid], outputs[rid] = [], []
            next_request += 1
        if not engine.num_unfinished:  # idle until the next arrival
            time.sleep(max(0.0, arrivals[next_request] - (time.perf_counter() - t0)))
            continue
        s0 = time.perf_counter()
        events = engine.step()
        s1 = time.perf_counter()
        steps.append((s1 - s0, engine.last_step))
        for event in events:
            token_times[event.request_id].extend([s1] * len(event.token_ids))
            outputs[event.request_id].extend(event.token_ids)
    elapsed = time.perf_counter() - t0
    engine.run_until_done()
    ttft = [times[0] - arrival_of[rid] for rid, times in token_times.items()]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times.values() if len(t) > 1]
    itl = [b - a for t in token_times.values() for a, b in zip(t, t[1:])]
    out_tokens = sum(len(t) for t in token_times.values())
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "steps": steps,
            "ttft": ttft, "tpot": tpot, "itl": itl, "outputs": outputs}


def latency_row(run: dict, num_requests: int) -> dict:
    """Throughput and vLLM's latency percentiles (ms) of one `serve` run, as table columns."""
    return {
        "tok_s": run["output_tokens"] / run["elapsed_s"],
        "req_s": num_requests / run["elapsed_s"],
        "ttft_p50_ms": 1e3 * percentile(run["ttft"], 50),
        "ttft_p99_ms": 1e3 * percentile(run["ttft"], 99),
        "tpot_p50_ms": 1e3 * percentile(run["tpot"], 50),
        "tpot_p99_ms": 1e3 * percentile(run["tpot"], 99),
        "itl_p50_ms": 1e3 * percentile(run["itl"], 50),
        "itl_p99_ms": 1e3 * percentile(run["itl"], 99),
        "steps": len(run["steps"]),
    }


def measure_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes/s of a large on-device copy (read + write counted)."""
    return copy_bandwidth([jnp.ones(nbytes // 4, jnp.float32)], 5)


def decode_roofline(steps, weight_bytes: int, kv_token_bytes: int, bandwidth: float) -> dict:
    decode = [(t, s) for t, s in steps if s.decode_only]
    if not decode:
        return {"decode_steps": 0}
    t_measured = sum(t for t, _ in decode)
    t_roof = sum((weight_bytes + s.kv_tokens * kv_token_bytes) / bandwidth for _, s in decode)
    return {"decode_steps": len(decode), "decode_seconds": t_measured,
            "roofline_seconds": t_roof, "percent_of_roofline": 100.0 * t_roof / t_measured,
            "mean_decode_batch": statistics.mean(s.sampled for _, s in decode)}


def run_peer(args, work, torch_device: str) -> dict:
    """transformers generate over the same requests in static batches (offline)."""
    import torch
    import transformers

    # the engine's dtype: a float32 peer would move twice the bytes of a bfloat16 engine
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model,
                                                           dtype=getattr(torch, args.dtype))
    hf.to(torch_device).eval()

    def run_batch(batch):
        width = max(len(p) for p, _ in batch)
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros_like(ids)
        for i, (prompt, _) in enumerate(batch):
            ids[i, width - len(prompt):] = prompt
            mask[i, width - len(prompt):] = 1
        new = max(n for _, n in batch)
        with torch.no_grad():
            hf.generate(torch.from_numpy(ids).to(torch_device),
                        attention_mask=torch.from_numpy(mask).to(torch_device), do_sample=False,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    batches = [work[i:i + args.peer_batch] for i in range(0, len(work), args.peer_batch)]
    run_batch(batches[0])  # warm-up: allocator and thread pools
    t0 = time.perf_counter()
    for batch in batches:
        run_batch(batch)
    elapsed = time.perf_counter() - t0
    tokens = sum(n for _, n in work)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed,
            "req_s": len(work) / elapsed, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "torch_device": str(hf.device),
            "torch_dtype": str(hf.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=str(jaxinfer.default_model_dir()))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, float("inf")])
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--random-model", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                        help="serve a random Llama of this width and depth (see above)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int)
    parser.add_argument("--max-tokens-per-step", type=int, default=256)
    parser.add_argument("--paged-attention", choices=PAGED_ATTENTION, default="auto",
                        help="Engine(paged_attention=): ragged, per_token or auto (by bucket)")
    parser.add_argument("--peer-batch", type=int, default=8)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="interleaved engine-offline / peer rounds for the ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "bench_serving.json"))
    args = parse_experiment_args(parser)
    if args.quick:
        # one finite rate: the latency plot's point, and the run the roofline and the peer use
        args.num_requests, args.rates = 8, [32.0]
        args.prompt_len, args.output_len = [8, 24], [4, 8]
        args.max_batch, args.max_tokens_per_step, args.peer_batch = 8, 16, 4
        args.peer_repeats = 1

    import torch

    if args.random_model:
        args.model = str(random_model_dir(*args.random_model, tempfile.mkdtemp()))
    model = jaxinfer.load_pretrained(args.model, dtype=args.dtype)
    config = model.config
    tokenizer = jaxinfer.load_tokenizer(args.model)
    stream = corpus_stream(tokenizer)
    rng = np.random.default_rng(args.seed)
    work = make_workload(stream, args, rng)

    def fresh_engine() -> jaxinfer.Engine:
        """An engine with an empty prefix cache, so that no rate is served from the pages of the
        workload's earlier runs; its compiled steps are shared with the first engine's."""
        engine = jaxinfer.Engine(model, max_batch=args.max_batch, page_size=args.page_size,
                                 num_pages=args.num_pages,
                                 max_tokens_per_step=args.max_tokens_per_step,
                                 paged_attention=args.paged_attention)
        engine.warmup()
        return engine

    t0 = time.perf_counter()
    engine = fresh_engine()
    compile_s = time.perf_counter() - t0

    out = Path(args.out)
    settings = {k: (v if not isinstance(v, float) or np.isfinite(v) else "inf")
                for k, v in vars(args).items()}
    settings["rates"] = [r if np.isfinite(r) else "inf" for r in args.rates]
    record = {"experiment": "bench_serving", "quick": args.quick, **environment(),
              "model": Path(args.model).name, "settings": settings,
              "num_pages": engine.num_pages, "compile_s": compile_s, "rows": [],
              "roofline": None, "peer": None, "png": None}
    rows, runs = [], {}
    for i, rate in enumerate(args.rates):
        engine = engine if i == 0 else fresh_engine()
        run = serve(engine, work, rate, np.random.default_rng(args.seed + 1))
        runs[rate] = run
        rows.append({"rate_req_s": rate, **latency_row(run, len(work)),
                     "cached_tokens": engine.num_cached_tokens})
        record["rows"] = [{**r, "rate_req_s": r["rate_req_s"] if np.isfinite(r["rate_req_s"])
                           else "inf"} for r in rows]
        write_json(record, out)  # after every rate: a killed run keeps what it measured
    print_table(rows, list(rows[0]))

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    kv_token_bytes = page_bytes(config.num_hidden_layers, 1, config.num_key_value_heads,
                                config.head_dim, config.dtype)
    bandwidth = measure_bandwidth(1 << 24 if args.quick else 1 << 28)  # quick: 0.2 s, not 2 s
    offline = runs.get(float("inf"), runs[args.rates[-1]])
    roofline = decode_roofline(offline["steps"], weight_bytes, kv_token_bytes, bandwidth)
    print(f"\ndecode roofline: W = {weight_bytes / 2**20:.1f} MiB, KV {kv_token_bytes} B/token, "
          f"measured bandwidth {bandwidth / 1e9:.1f} GB/s -> "
          f"{roofline.get('percent_of_roofline', float('nan')):.1f}% of roofline over "
          f"{roofline['decode_steps']} decode steps")
    record["roofline"] = {**roofline, "weight_bytes": weight_bytes,
                          "kv_bytes_per_token": kv_token_bytes,
                          "measured_bandwidth_bytes_s": bandwidth}
    write_json(record, out)

    peer = None
    if not args.no_peer:
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        engine_runs, peer_runs = [], []
        for i in range(args.peer_repeats):
            run = offline if i == 0 else serve(fresh_engine(), work, float("inf"),
                                               np.random.default_rng(args.seed + 1))
            engine_runs.append(run["output_tokens"] / run["elapsed_s"])
            peer_runs.append(run_peer(args, work, torch_device))
        peer = peer_runs[0] | {"tok_s": statistics.median(r["tok_s"] for r in peer_runs),
                               "tok_s_runs": [r["tok_s"] for r in peer_runs],
                               "engine_tok_s": statistics.median(engine_runs),
                               "engine_tok_s_runs": engine_runs}
        del peer["elapsed_s"], peer["req_s"]
        peer["engine_over_peer"] = peer["engine_tok_s"] / peer["tok_s"]
        print(f"peer transformers.generate (static batches of {args.peer_batch}, "
              f"{torch_device}), median of {args.peer_repeats}: {peer['tok_s']:.1f} tok/s "
              f"({min(peer['tok_s_runs']):.0f}-{max(peer['tok_s_runs']):.0f}); engine offline "
              f"{peer['engine_tok_s']:.1f} tok/s ({min(engine_runs):.0f}-{max(engine_runs):.0f}) "
              f"= {peer['engine_over_peer']:.2f}x")
        record["peer"] = peer
        write_json(record, out)

    finite = [r for r in rows if np.isfinite(r["rate_req_s"])]
    png = None
    if finite:
        rates = [r["rate_req_s"] for r in finite]
        png = plot_curves({"TTFT p50": (rates, [r["ttft_p50_ms"] for r in finite]),
                           "TTFT p99": (rates, [r["ttft_p99_ms"] for r in finite]),
                           "TPOT p50": (rates, [r["tpot_p50_ms"] for r in finite]),
                           "ITL p99": (rates, [r["itl_p99_ms"] for r in finite])},
                          xlabel="request rate (req/s)", ylabel="ms",
                          title=f"jaxinfer.Engine latency, {Path(args.model).name}",
                          out=out.with_suffix(".png"))
        print(f"wrote {png}")
    record["png"] = None if png is None else str(png)
    print(f"wrote {write_json(record, out)}")


if __name__ == "__main__":
    main()
