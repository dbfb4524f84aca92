"""A Server's warm-up time: its programs compiled one after another against at once on threads
(`SlotEngine.warmup` / `BertModel.warmup`, workers=).

    python3 -P benchmarks/warmup.py [--kinds gpt,bert] [--workers 1,0]

Each (kind, workers) runs in its own process with the persistent compilation cache off, so every
program compiles cold, as on a fresh machine, and no process reuses another's autotuning.
- gpt: GPT-2 medium shapes with random bf16 weights and the slots of benchmarks/serve.py --decode-steps 16
  (64 slots, cache 1,024, the Server's prefill defaults): 14 prefill and 5 decode programs.
- bert: bert-base shapes with random bf16 weights, a Server's view of 64 sequences (`fixed_shapes(64)`),
  mean and cls pooling.
workers 0 is the default (steps.default_compile_workers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(kind: str, workers: int, layers: int) -> dict:
    sys.path.insert(0, HERE)
    import jax

    from energon_jax.engine.steps import default_compile_workers

    if kind == "gpt":
        from serve import random_gpt2

        from energon_jax.engine.slots import SlotEngine

        model = random_gpt2(1024, layers, 16, 50257, 1024, "bfloat16")
        engine = SlotEngine(model, 64, decode_steps=16)
        programs = len(engine.prefill_shapes) + len(engine.step_options)
        seconds = engine.warmup(workers=workers or None)
    else:
        from encode import make_checkpoint

        import energon_jax as ej

        folder = tempfile.mkdtemp(prefix="bert-base-")
        make_checkpoint(folder)
        view = ej.load_sharded_model(folder, dtype="bfloat16").fixed_shapes(64)
        programs = 2 * len(view.token_buckets())
        t0 = time.perf_counter()
        view.warmup(["mean", "cls"], workers=workers or None)
        seconds = time.perf_counter() - t0
    threads = workers or default_compile_workers(programs)
    return {"kind": kind, "threads": threads, "programs": programs, "seconds": round(seconds, 1),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="gpt,bert")
    ap.add_argument("--workers", default="1,0", help="comma-separated; 0 = the default")
    ap.add_argument("--gpt-layers", type=int, default=24, help="gpt: layers (fewer for a quick check)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.gpt_layers)), flush=True)
        return
    env = dict(os.environ, ENERGON_JAX_CACHE_DIR="off")
    rows = []
    for kind in args.kinds.split(","):
        for workers in args.workers.split(","):
            proc = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", kind, workers, "--gpt-layers", str(args.gpt_layers)],
                                  env=env, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{kind} workers={workers} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(lines[0][7:]))
            print(rows[-1], flush=True)
    print("\n| model | programs | threads | warm-up s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['programs']} | {r['threads']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
