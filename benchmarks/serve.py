"""Serving benchmark: GPT-2 medium shapes (random weights, bf16) behind the HTTP server, N concurrent
streaming clients (in --client-procs separate processes, all starting at one instant), prompts of U[32, 512] tokens, 128 new tokens each, greedy;
then the same prompts through one offline batched `generate` call at the same batch size.

    python benchmarks/serve.py [--clients 64] [--new-tokens 128] [--decode-steps 8] [--max-prefill-batch 8]
        [--client-procs 4[,8,16]] [--rounds N] [--no-overlap] [--warm-connections]

Prints requests/s, tokens/s, time to first token p50/p99, time per output token p50/p99, and the
served/offline tokens/s ratio (target >= 0.70). Random weights: no EOS, so every request runs to
its full length in both modes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np


# ------------------------------------------------------------------ client
async def _one(client, url, prompt, new_tokens):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            got = len(chunk["choices"][0]["token_ids"])
            if got:
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                n += got
    return {"ttft": first - t0, "tpot": (last - first) / max(1, n - 1), "tokens": n, "end": last}


async def _clients(url, prompts, new_tokens, warm_all=False, start_at=None):
    """All clients send their request at once (at perf_counter() == start_at when given). warm_all:
    each first opens its connection with a short request (kept alive), so the measured requests skip
    TCP set-up and reach the server sooner."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        if warm_all:
            await asyncio.gather(*(_one(client, url, p[:8], 2) for p in prompts))
        else:  # httpx's first request in a process pays its lazy set-up: not the server's time
            (await client.get(url + "/health")).raise_for_status()
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, p, new_tokens) for p in prompts))
        return results, time.perf_counter() - t0, t0


def client_main(url: str, prompts_file: str, new_tokens: int, warm_all: bool, start_at: float | None) -> None:
    with open(prompts_file) as f:
        prompts = json.load(f)
    results, wall, t0 = asyncio.run(_clients(url, prompts, new_tokens, warm_all, start_at))
    print(json.dumps({"results": results, "wall": wall, "t0": t0}))  # perf_counter is system-wide monotonic


def run_clients(url: str, prompts: list, new_tokens: int, warm_all: bool, procs: int) -> dict:
    """The load: `procs` client processes (a share of the prompts each, like independent users), all
    starting at one instant, so the load generator's own Python time per request (httpx) is spread
    over cores instead of queueing every request behind one client's event loop. A single warm-up
    process first sends 4 short requests (each measured process opens fresh connections, unless
    warm_all)."""
    base = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve_bench_prompts_{os.getpid()}")
    files = []
    for i in range(procs + 1):  # file 0: the warm-up round's 4 prompts
        share = prompts[:4] if i == 0 else prompts[i - 1:: procs]
        files.append(f"{base}_{i}.json")
        with open(files[-1], "w") as f:
            json.dump(share, f)

    def launch(i, start_at, tokens=new_tokens):
        return subprocess.Popen([sys.executable, __file__, "--client", url, files[i], str(tokens),
                                 "1" if warm_all else "0", repr(start_at)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def wait(p):
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"client failed:\n{err[-4000:]}")
        return json.loads(out.strip().splitlines()[-1])

    try:
        if not warm_all:  # the server's first requests: 8 tokens each, from a client of their own
            wait(launch(0, 0.0, 8))
        start_at = time.perf_counter() + 3.0  # after every process has imported httpx (and warmed, if asked)
        got = [wait(p) for p in [launch(i, start_at) for i in range(1, procs + 1)]]
    finally:
        for f in files:
            os.remove(f)
    results = [r for g in got for r in g["results"]]
    t0 = min(g["t0"] for g in got)
    return {"results": results, "t0": t0, "wall": max(r["end"] for r in results) - t0}


# ------------------------------------------------------------------ server
def random_gpt2(n_embd: int, n_layer: int, n_head: int, vocab: int, positions: int, dtype: str):
    """A GPTModel with random weights at real shapes (no tokenizer: token-id mode, no EOS)."""
    import jax
    import jax.numpy as jnp

    import energon_jax as ej
    from energon_jax.loading import param_shardings
    from energon_jax.models.gpt2 import GPT2

    cfg = ej.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    mesh = ej.make_mesh(1, 1, 1)
    dt = jnp.dtype(dtype)
    module = GPT2(cfg, param_dtype=dt)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shardings = param_shardings(module, (tokens, tokens), mesh)
    import flax.linen as nn

    params = jax.jit(lambda k: nn.unbox(module.init(k, tokens, tokens))["params"], out_shardings=shardings)(
        jax.random.key(0))
    return ej.GPTModel(cfg, params, mesh, None, max_seq_len=positions, source="random-gpt2")


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def timeline_summary(timeline, t0: float, end: float) -> dict:
    """Where the served wall time went, from the engine loop's iterations (EngineLoop.timeline) and
    the client's start / last-token times (one clock: perf_counter is monotonic system-wide)."""
    its = [it for it in timeline if t0 - 1e-3 <= it[0] <= end]
    if not its:
        return {}
    # the loop keeps its last `maxlen` iterations: if the oldest kept one falls inside the round,
    # the round's first iterations are gone and the split below would describe only its tail
    truncated = timeline.maxlen is not None and len(timeline) == timeline.maxlen and its[0] is timeline[0]
    if truncated:
        print(f"# timeline_summary: the engine loop kept only its last {timeline.maxlen} iterations; the "
              "breakdown covers the end of the round only", file=sys.stderr)
    # a decode-only iteration's device time: from the previous iteration's tokens coming back to its
    # own (with the overlapped loop the host's schedule time hides behind the device's work)
    decode_only = [(it[2] - prev[2], it[5]) for prev, it in zip(its, its[1:]) if it[4] == 0 and it[5]]
    return {
        "iterations": len(its),
        "truncated": truncated,
        "before_first_iteration_ms": 1e3 * (its[0][0] - t0),
        "prefill_iterations_ms": [round(1e3 * (it[3] - it[0]), 1) for it in its if it[4]],
        "prompts_per_prefill_iteration": [it[4] for it in its if it[4]],
        "decode_ms_per_step_served": 1e3 * sum(d for d, _ in decode_only) / max(1, sum(k for _, k in decode_only)),
        "host_ms_per_iteration": 1e3 * sum((it[1] - it[0]) + (it[3] - it[2]) for it in its) / len(its),
        "after_last_iteration_ms": 1e3 * (end - its[-1][3]),
    }


def served_figures(rounds, server, arrivals, total_new, clients):
    """The median round's figures (served dict, printed) and its raw timeline and arrivals."""
    got = sorted(rounds, key=lambda g: g["wall"])[len(rounds) // 2]  # the median round (upper for even)
    results, wall = got["results"], got["wall"]
    breakdown = timeline_summary(server.loop.timeline, got["t0"], max(r["end"] for r in results))
    end = got["t0"] + wall
    arrived = sorted(1e3 * (a - got["t0"]) for a in arrivals if got["t0"] - 1e-3 <= a <= end)
    if arrived:
        breakdown["requests_reached_scheduler_ms"] = {q: round(float(np.percentile(arrived, q)), 1)
                                                      for q in (0, 25, 50, 75, 100)}
    served = {
        "seconds": wall, "requests_per_s": clients / wall, "tokens_per_s": total_new / wall,
        "ttft_p50_ms": 1e3 * percentile([r["ttft"] for r in results], 50),
        "ttft_p99_ms": 1e3 * percentile([r["ttft"] for r in results], 99),
        "tpot_p50_ms": 1e3 * percentile([r["tpot"] for r in results], 50),
        "tpot_p99_ms": 1e3 * percentile([r["tpot"] for r in results], 99),
        "rounds_tokens_per_s": [round(total_new / g["wall"]) for g in rounds],
        "where_the_time_went": breakdown, "warmup_s": server.warmup_seconds,
        "compiles": dict(server.engine.compile_counts),
    }
    print(f"served: {served}", flush=True)
    t0 = got["t0"]  # the raw iterations and arrivals, in ms from the clients' start
    raw = {"timeline_ms": [[round(1e3 * (x - t0), 2) for x in it[:4]] + list(it[4:])
                           for it in server.loop.timeline if t0 - 1e-3 <= it[0] <= end],
           "arrivals_ms": [round(a, 2) for a in arrived]}
    return served, raw


def main() -> None:
    if sys.argv[1:2] == ["--client"]:  # a load process (run_clients): httpx only, no jax import
        url, prompts_file, new_tokens, warm, start_at = sys.argv[2:7]
        return client_main(url, prompts_file, int(new_tokens), warm == "1", float(start_at) or None)
    from energon_jax.serving.cli_verbs import add_batching_args, batching_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    add_batching_args(ap)  # --decode-steps, prefill sizes, --batch-wait, --prefill-window, --no-overlap
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--positions", type=int, default=1024, help="context (= the decode cache length)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measured rounds of the whole client load on the one warm server; the median round is reported")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--switch-interval", type=float, default=0.0005,
                    help="Server(switch_interval=): the thread switch interval while serving (Python's is 0.005 s)")
    ap.add_argument("--warm-connections", action="store_true",
                    help="every client opens its keep-alive connection before the measured round")
    ap.add_argument("--client-procs", default="4",
                    help="client processes sharing the concurrent clients (1: one asyncio client for all); a "
                         "comma-separated list measures each setting in turn on the one warm server")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1")
    try:
        args.client_procs = [int(x) for x in args.client_procs.split(",")]
    except ValueError:
        ap.error(f"--client-procs {args.client_procs!r}: give comma-separated ints")
    if min(args.client_procs) < 1 or max(args.client_procs) > args.clients:
        ap.error(f"--client-procs {args.client_procs}: each must be in [1, --clients {args.clients}]")

    import jax
    import uvicorn

    from energon_jax.runtime.compile_cache import enable_compilation_cache
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; compile cache {enable_compilation_cache()}",
          flush=True)
    t0 = time.perf_counter()
    model = random_gpt2(args.embd, args.layers, args.heads, 50257, args.positions, args.dtype)
    print(f"model: {model} built in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.clients)
    prompts = [rng.integers(0, 50257, n).tolist() for n in lengths]
    total_new = args.clients * args.new_tokens

    # offline batched generate: one call, all prompts (compiled by a first call)
    t0 = time.perf_counter()
    ref = model.generate(prompts, max_new_tokens=args.new_tokens)
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=args.new_tokens)
        runs.append(time.perf_counter() - t0)
    assert sum(len(o.token_ids) for o in out) == total_new
    offline_s = min(runs)
    model.generate(prompts, max_new_tokens=1)
    t0 = time.perf_counter()
    model.generate(prompts, max_new_tokens=1)
    prefill_s = time.perf_counter() - t0
    offline = {"seconds": offline_s, "tokens_per_s": total_new / offline_s, "requests_per_s": args.clients / offline_s,
               "first_call_s": compile_s, "prefill_ms": 1e3 * prefill_s,
               "decode_ms_per_step": 1e3 * (offline_s - prefill_s) / max(1, args.new_tokens - 1)}
    print(f"offline generate: {offline}", flush=True)

    # served: in-process Server + uvicorn thread; clients in another process (no shared GIL)
    server = Server(model, max_batch_size=args.clients, max_queue=args.clients, name="gpt2-medium-random",
                    switch_interval=args.switch_interval, **batching_options(args))
    server.start()
    arrivals = []  # perf_counter when each request reached the scheduler (one clock with the clients')
    add_request = server.scheduler.add_request

    def timed_add_request(*a, **kw):
        arrivals.append(time.perf_counter())
        return add_request(*a, **kw)

    server.scheduler.add_request = timed_add_request
    print(f"server warm-up (every prefill bucket + decode programs): {server.warmup_seconds:.1f} s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    settings = []  # one per --client-procs value: (procs, served figures, the median round's raw data)
    for procs in args.client_procs:
        rounds = []
        for _ in range(args.rounds):
            got = run_clients(f"http://127.0.0.1:{port}", prompts, args.new_tokens, args.warm_connections, procs)
            assert sum(r["tokens"] for r in got["results"]) == total_new, "tokens lost"
            rounds.append(got)
            print(f"{procs} client processes, round {len(rounds)}: {total_new / got['wall']:.0f} tokens/s = "
                  f"{total_new / got['wall'] / offline['tokens_per_s']:.2f} of offline", flush=True)
        settings.append((procs, *served_figures(rounds, server, arrivals, total_new, args.clients)))
    web.should_exit = True
    thread.join(timeout=30)
    server.stop()
    print("\n| mode | clients | client processes | req/s | tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "served / offline (median round) |\n|---|---|---|---|---|---|---|---|")
    for procs, served, _ in settings:
        print(f"| HTTP streaming | {args.clients} | {procs} | {served['requests_per_s']:.2f} | "
              f"{served['tokens_per_s']:.0f} | {served['ttft_p50_ms']:.0f} / {served['ttft_p99_ms']:.0f} | "
              f"{served['tpot_p50_ms']:.2f} / {served['tpot_p99_ms']:.2f} | "
              f"{served['tokens_per_s'] / offline['tokens_per_s']:.2f} |")
    print(f"| offline generate | {args.clients} | - | {offline['requests_per_s']:.2f} | {offline['tokens_per_s']:.0f} "
          f"| - | - | 1 |\n(target: served / offline >= 0.70)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"offline": offline, "args": vars(args),
                       "settings": [{"client_procs": procs, "served": served,
                                     "ratio": served["tokens_per_s"] / offline["tokens_per_s"], "raw": raw}
                                    for procs, served, raw in settings]}, f, indent=1)


if __name__ == "__main__":
    main()
