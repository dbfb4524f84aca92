"""GPT-2 decode benchmark: energon-jax `generate` vs Hugging Face `generate`, same GPU, same run.

Random weights at real shapes (bf16), prompt 128 tokens, 256 new tokens, batch 1 and 32.
Reports ms per decode step, tokens/s, the fraction of the HBM roofline reached (weights + KV
cache bytes each step must read, over the measured copy bandwidth), and compile times: cold,
and from JAX's persistent compilation cache (a second process, `--warm-cache`).

    python benchmarks/decode.py --models gpt2,gpt2-medium,gpt2-xl --batches 1,32 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = {  # (n_layer, n_embd, n_head)
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


def set_decode_tiles(spec: str) -> None:
    """Make "BLOCK_S,CHUNK,WARPS,STAGES[,mma]" the Triton decode kernel's default tiles in this process."""
    from energon_jax.kernels import decode_attention as da

    fields = spec.split(",")
    if len(fields) not in (4, 5) or not all(f.isdigit() for f in fields[:4]) or fields[4:] not in ([], ["mma"]):
        raise SystemExit(f"--decode-tiles {spec!r}: expected BLOCK_S,CHUNK,WARPS,STAGES as integers, "
                         "then optionally ',mma' (e.g. 64,4096,4,3,mma)")
    bs, chunk, warps, stages = (int(f) for f in fields[:4])
    da.decode_attention.__kwdefaults__["tiles"] = da.DecodeTiles(bs, chunk, warps, stages, mma=fields[4:] == ["mma"])


def set_step_tiles(spec: str) -> None:
    """Make "BLOCK_S,WARPS,STAGES[,SPLITS]" the fused decode-step kernel's defaults
    (kernels/decode_append.py); SPLITS fixes the runs per row (default: chosen from the rows)."""
    from energon_jax.kernels import decode_append as dap

    fields = spec.split(",")
    if len(fields) not in (3, 4) or not all(f.isdigit() and int(f) > 0 for f in fields):
        raise SystemExit(f"--step-tiles {spec!r}: expected BLOCK_S,WARPS,STAGES[,SPLITS] as positive integers "
                         "(e.g. 64,4,3 or 32,4,3,2)")
    bs, warps, stages = (int(f) for f in fields[:3])
    splits = int(fields[3]) if len(fields) == 4 else None
    dap.decode_append_attention.__kwdefaults__.update(block_s=bs, num_warps=warps, num_stages=stages, splits=splits)


def set_filter_kernel(spec: str) -> None:
    """Make "BITS,BLOCK,WARPS,STAGES" the sampler's filter-kernel settings (kernels/sample_filter.py)."""
    from energon_jax.kernels import sample_filter as sf

    fields = spec.split(",")
    if len(fields) != 4 or not all(f.isdigit() and int(f) > 0 for f in fields):
        raise SystemExit(f"--filter-kernel {spec!r}: expected BITS,BLOCK,WARPS,STAGES as positive integers "
                         "(e.g. 2,2048,8,2)")
    sf.BITS, sf.BLOCK, sf.NUM_WARPS, sf.NUM_STAGES = (int(f) for f in fields)


def random_model(name: str, max_seq_len: int, attention_impl: str = "auto"):
    import jax
    import jax.numpy as jnp

    from energon_jax.config import GPT2Config
    from energon_jax.engine.gpt import GPTModel
    from energon_jax.runtime.mesh import make_mesh
    from energon_jax.models.gpt2 import GPT2

    n_layer, n_embd, n_head = SHAPES[name]
    # eos None: random weights must not stop early, every call decodes exactly the tokens asked for
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    mesh = make_mesh()
    module = GPT2(cfg, param_dtype=jnp.bfloat16)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda k: module.init(k, tokens, tokens))(jax.random.key(0))["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    return GPTModel(cfg, params, mesh, None, max_seq_len=max_seq_len, source=f"random {name}",
                    attention_impl=attention_impl)


# Device-copy ceilings (bytes read + written per second) measured on the lent machines: the H100
# through JAX (shared/DEVICE.md), the H200 through PyTorch (the device tool's KINDS.md). On the
# H200, copy_bandwidth() below read only 2.0-2.3 TB/s, less than XLA's own decode attention
# streamed (3.2 TB/s), so there the measured copy is no ceiling.
COPY_CEILINGS = {"H100": 2.99e12, "H200": 4.3e12}


def roofline_bandwidth(device_kind: str, measured: float) -> float:
    """The larger of the measured copy and the known ceiling of this device kind, so a slow
    copy measurement never flatters the fraction of the roofline reported."""
    known = [bw for name, bw in COPY_CEILINGS.items() if name in device_kind]
    return max([measured] + known)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 30) // 2, jnp.bfloat16)  # 1 GiB
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / sorted(ts)[len(ts) // 2]


def parse_sampling(spec: str | None) -> dict:
    """ "TEMPERATURE,TOP_K,TOP_P" -> generate's keyword arguments ({} for None: greedy)."""
    if not spec:
        return {}
    fields = spec.split(",")
    try:
        if len(fields) != 3:
            raise ValueError
        return {"temperature": float(fields[0]), "top_k": int(fields[1]), "top_p": float(fields[2])}
    except ValueError:
        raise SystemExit(f"--sampling {spec!r}: expected TEMPERATURE,TOP_K,TOP_P (a float, an integer, a float; "
                         "e.g. 0.8,50,0.9)") from None


def time_generate(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3, sampling=None):
    import numpy as np

    sampling = sampling or {}

    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 50000, prompt_len).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, **sampling)  # compile + run
    first = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in out)
    model.generate(prompts, max_new_tokens=1, **sampling)  # compile the 1-token program (prefill only)

    def best(n):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(prompts, max_new_tokens=n, **sampling)
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    full, prefill = best(new_tokens), best(1)
    return {"first_call_s": first, "total_s": full, "prefill_s": prefill,
            "ms_per_step": 1e3 * (full - prefill) / (new_tokens - 1), "compile_s": first - full}


def hf_generate(name: str, batch: int, prompt_len: int, new_tokens: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head = SHAPES[name]
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (batch, prompt_len), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    full, prefill = run(new_tokens), run(1)
    del model
    torch.cuda.empty_cache()
    return 1e3 * (full - prefill) / (new_tokens - 1)


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must read: all weights once + the live KV cache (mean context)."""
    c = model.config
    weights = sum(x.nbytes for x in __import__("jax").tree.leaves(model.params))
    kv = 2 * c.n_layer * batch * context * c.n_embd * 2
    return weights + kv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,gpt2-medium,gpt2-xl")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate in this run")
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--warm-cache", action="store_true",
                    help="internal: only measure compile time with an already-filled persistent cache")
    ap.add_argument("--skip-warm-cache", action="store_true", help="do not time compiles from the persistent cache")
    ap.add_argument("--impls", default="auto", help="attention implementations to time, e.g. xla,triton")
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode-tiles", default=None, metavar="BLOCK_S,CHUNK,WARPS,STAGES[,mma]",
                    help="override the Triton decode kernel's default tiles (kernels/decode_attention.DecodeTiles)")
    ap.add_argument("--filter-kernel", default=None, metavar="BITS,BLOCK,WARPS,STAGES",
                    help="the sampler's filter-kernel settings (kernels/sample_filter.py)")
    ap.add_argument("--step-tiles", default=None, metavar="BLOCK_S,WARPS,STAGES[,SPLITS]",
                    help="override the fused decode-step kernel's defaults (kernels/decode_append.py)")
    ap.add_argument("--min-rows", type=int, default=None,
                    help="override engine.gpt.min_decode_rows (rows a lone prompt decodes as)")
    ap.add_argument("--triton-rows", type=int, default=None,
                    help="override engine.gpt.MIN_TRITON_DECODE_ROWS and MIN_FUSED_STEP_ROWS (rows per device "
                         "from which 'auto' decodes through the Triton kernel and the fused Pallas step)")
    ap.add_argument("--sampling", default=None, metavar="TEMPERATURE,TOP_K,TOP_P",
                    help="sample every row with these settings (e.g. 0.8,50,0.9) instead of greedy decoding")
    args = ap.parse_args()
    sampling = parse_sampling(args.sampling)
    if args.decode_tiles:
        set_decode_tiles(args.decode_tiles)
    if args.step_tiles:
        set_step_tiles(args.step_tiles)
    if args.filter_kernel:
        set_filter_kernel(args.filter_kernel)
    if args.min_rows is not None:
        from energon_jax.engine import gpt as _gpt
        _gpt.min_decode_rows = lambda: args.min_rows
    if args.triton_rows is not None:
        from energon_jax.engine import gpt as _gpt
        _gpt.MIN_TRITON_DECODE_ROWS = _gpt.MIN_FUSED_STEP_ROWS = args.triton_rows  # read at trace time

    import jax

    from energon_jax.runtime.compile_cache import enable_compilation_cache

    cache_dir = enable_compilation_cache()
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if args.warm_cache:
        rows = []
        for name in models:
            model = random_model(name, 1024, args.impls.split(",")[0])
            for b in batches:
                r = time_generate(model, b, args.prompt, args.new_tokens, repeats=1, sampling=sampling)
                rows.append({"model": name, "batch": b, "compile_s_warm_cache": r["compile_s"]})
        print(json.dumps(rows))
        return

    measured = copy_bandwidth()
    bw = roofline_bandwidth(jax.devices()[0].device_kind, measured)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth measured {measured / 1e12:.2f} "
          f"TB/s, roofline uses {bw / 1e12:.2f} TB/s; compile cache {cache_dir}", flush=True)
    results = []
    for name in models:
        for impl in args.impls.split(","):
            model = random_model(name, 1024, impl)
            for b in batches:
                r = time_generate(model, b, args.prompt, args.new_tokens, sampling=sampling)
                ctx = args.prompt + args.new_tokens // 2
                r.update(model=name, impl=impl, batch=b, tokens_per_s=b * 1e3 / r["ms_per_step"],
                         roofline=step_bytes(model, b, ctx) / bw / (r["ms_per_step"] / 1e3))
                if args.hf and impl == args.impls.split(",")[0]:
                    r["hf_ms_per_step"] = hf_generate(name, b, args.prompt, args.hf_new_tokens)
                results.append(r)
                print(json.dumps(r), flush=True)
            del model

    # Compile time from the persistent cache: a fresh process, same cache folder.
    env = dict(os.environ, ENERGON_JAX_CACHE_DIR=str(cache_dir))
    same = ["--models", args.models, "--batches", args.batches, "--prompt", str(args.prompt),
            "--new-tokens", str(args.new_tokens), "--impls", args.impls]  # the programs timed above
    same += ["--decode-tiles", args.decode_tiles] if args.decode_tiles else []
    same += ["--step-tiles", args.step_tiles] if args.step_tiles else []
    same += ["--filter-kernel", args.filter_kernel] if args.filter_kernel else []
    same += ["--min-rows", str(args.min_rows)] if args.min_rows is not None else []
    same += ["--triton-rows", str(args.triton_rows)] if args.triton_rows is not None else []
    same += ["--sampling", args.sampling] if args.sampling else []
    warm = None if args.skip_warm_cache else subprocess.run([sys.executable, __file__, "--warm-cache", *same],
                                                            env=env, capture_output=True, text=True)
    warm_rows = json.loads(warm.stdout.strip().splitlines()[-1]) if warm and warm.returncode == 0 else []
    if warm and warm.returncode:
        print(warm.stderr[-2000:])
    for r in results:
        for w in warm_rows:
            if (w["model"], w["batch"]) == (r["model"], r["batch"]) and r["impl"] == args.impls.split(",")[0]:
                r["compile_s_warm_cache"] = w["compile_s_warm_cache"]

    print("\n| model | attention | batch | ms/step | tokens/s | HBM roofline | HF ms/step | speed-up vs HF | compile cold s | compile cached s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hf = r.get("hf_ms_per_step")
        hf_ms = f"{hf:.1f}" if hf else "-"
        speedup = f"{hf / r['ms_per_step']:.0f}x" if hf else "-"
        print(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['roofline']:.0f}% | {hf_ms} | {speedup} | "
              f"{r['compile_s']:.1f} | {r.get('compile_s_warm_cache', float('nan')):.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
