"""Where a decode step's GPU time goes: trace `generate` (or the serving engine's decode) with the
JAX profiler and sum the GPU kernels of the trace by name.

    python benchmarks/profile_decode.py --model gpt2 --batch 1 --impl xla --out /tmp/prof
    python benchmarks/profile_decode.py --model gpt2-medium --batch 64 --slots   # SlotEngine.decode
    python benchmarks/profile_decode.py --model gpt2-medium --batch 64 --prefill # SlotEngine prefills

Prints, per kernel name: launches per decode step, microseconds per step, share of the GPU time;
then the GPU-busy time per step against the wall time per step (the gap is launch and host time).
Random weights at real shapes (benchmarks/decode.py), bf16.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def gpu_kernels(trace_path: str) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel on a GPU stream track of a perfetto/Chrome trace. The
    device's "XLA Ops" / "XLA Modules" tracks repeat the same time by op: only "Stream" tracks count."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"].get("name", "") for e in meta if e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in procs.items() if "GPU" in name}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in meta if e.get("name") == "thread_name"}
    streams = {key for key, name in threads.items() if key[0] in gpu_pids and "Stream" in name}
    keep = (lambda e: (e.get("pid"), e.get("tid")) in streams) if streams else (lambda e: e.get("pid") in gpu_pids)
    print(f"# trace tracks: GPU processes {sorted(procs[p] for p in gpu_pids)}; "
          f"threads {sorted({threads[k] for k in threads if k[0] in gpu_pids})[:12]}")
    return [(e["name"], float(e["dur"])) for e in events if e.get("ph") == "X" and "dur" in e and keep(e)]


def summarise(kernels: list[tuple[str, float]], steps: int, wall_s: float, top: int = 25) -> dict:
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, us in kernels:
        by_name[name].append(us)
    busy = sum(us for _, us in kernels)
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    print(f"{'kernel':70s} {'per step':>9s} {'us/step':>9s} {'share':>6s}")
    for name, durs in rows[:top]:
        print(f"{name[:70]:70s} {len(durs) / steps:9.1f} {sum(durs) / steps:9.1f} {100 * sum(durs) / busy:5.1f}%")
    out = {"kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy / steps,
           "wall_us_per_step": 1e6 * wall_s / steps, "distinct_kernels": len(by_name)}
    print(json.dumps(out))
    return out


def trace_kernels(fn, out_dir: str) -> list[tuple[str, float]]:
    import jax

    jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
    fn()
    jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out_dir, "**", "*perfetto_trace.json*"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise SystemExit(f"no perfetto trace under {out_dir}")
    return gpu_kernels(traces[-1])


def profile_prefill(args) -> None:
    """The serving engine's prefill of a burst (grouped into compiled (rows, bucket) programs, each
    prompt's K/V written into its slot) against offline generate's one padded prefill."""
    import jax
    import numpy as np

    from decode import random_model
    from energon_jax.engine.slots import SlotEngine

    model = random_model(args.model, 1024, args.impl)
    rng = np.random.default_rng(0)
    lengths = rng.integers(32, 513, args.batch)
    prompts = [rng.integers(0, 50257, n).tolist() for n in lengths]
    engine = SlotEngine(model, args.batch, decode_steps=1)
    groups = engine.group_prefills([len(p) for p in prompts])
    launch_s = []

    def run():
        t = time.perf_counter()
        firsts = [engine.prefill_batch(rows, [prompts[i] for i in rows], temperature=[0.0] * len(rows),
                                       top_k=[0] * len(rows), top_p=[1.0] * len(rows), seed=[0] * len(rows))
                  for rows in groups]
        launch_s.append(time.perf_counter() - t)
        jax.block_until_ready((firsts, engine.state))

    def offline():
        model.generate(prompts, max_new_tokens=1)

    for fn in (run, run, offline, offline):
        fn()
    walls = {}
    for name, fn in (("slots", run), ("offline", offline)):
        t = time.perf_counter()
        fn()
        walls[name] = time.perf_counter() - t
    print(f"# {jax.devices()[0].device_kind}: {args.model}, {args.batch} prompts of {int(lengths.sum())} tokens, "
          f"{len(groups)} prefill dispatches {[len(g) for g in groups]}: slot prefills {1e3 * walls['slots']:.1f} ms "
          f"(host launches {1e3 * launch_s[-1]:.1f} ms), offline generate(1) {1e3 * walls['offline']:.1f} ms")
    for name, fn in (("slots", run), ("offline", offline)):
        print(f"## {name} (per step = the whole prefill)")
        summarise(trace_kernels(fn, os.path.join(args.out, name)), 1, walls[name], args.top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--impl", default="xla", help="attention: xla, triton or auto")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="decode steps traced")
    ap.add_argument("--slots", action="store_true", help="trace SlotEngine.decode (serving) instead of generate")
    ap.add_argument("--prefill", action="store_true",
                    help="trace the serving engine's batched prefills of --batch prompts of U[32, 512] tokens "
                         "(benchmarks/serve.py's prompts) against one offline generate(max_new_tokens=1)")
    ap.add_argument("--out", default="/tmp/energon_profile")
    ap.add_argument("--top", type=int, default=25, help="kernel names listed, by total time")
    ap.add_argument("--decode-tiles", default=None, metavar="BLOCK_S,CHUNK,WARPS,STAGES[,mma]",
                    help="override the Triton decode kernel's default tiles (kernels/decode_attention.DecodeTiles)")
    args = ap.parse_args()
    if args.decode_tiles:
        from decode import set_decode_tiles
        set_decode_tiles(args.decode_tiles)
    if args.prefill:
        return profile_prefill(args)

    import jax
    import numpy as np

    from decode import random_model

    model = random_model(args.model, 1024, args.impl)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 50000, args.prompt).tolist() for _ in range(args.batch)]
    if args.slots:
        from energon_jax.engine.slots import SlotEngine

        engine = SlotEngine(model, args.batch, decode_steps=args.steps)
        for rows in engine.group_prefills([len(p) for p in prompts]):  # the compiled (rows, bucket) shapes
            engine.prefill_batch(rows, [prompts[i] for i in rows], temperature=[0.0] * len(rows),
                                 top_k=[0] * len(rows), top_p=[1.0] * len(rows), seed=[0] * len(rows))
        active = np.ones(args.batch, bool)
        jax.block_until_ready(engine.decode(args.steps, active))  # compile

        def run():
            return jax.block_until_ready(engine.decode(args.steps, active))
        extra = 0
    else:
        def run():
            return model.generate(prompts, max_new_tokens=args.steps + 1)
        run()
        model.generate(prompts, max_new_tokens=1)
        t = time.perf_counter()
        model.generate(prompts, max_new_tokens=1)
        extra = time.perf_counter() - t  # the prefill, taken off the wall time below
    run()
    t = time.perf_counter()
    run()
    wall = time.perf_counter() - t - extra
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}: {args.model} batch {args.batch} attention "
          f"{args.impl} {'slot decode' if args.slots else 'generate'}: {1e3 * wall / args.steps:.3f} ms/step untraced")
    kernels = trace_kernels(run, args.out)  # generate's trace also holds its one prefill (~1 step's worth)
    summarise(kernels, args.steps, wall, args.top)


if __name__ == "__main__":
    main()
