"""Few-row projections on the GPU: XLA's GEMM against kernels/gemv.py's fused Pallas kernel.

Two measurements, both at GPT-2 XL's shapes with 48 distinct weight matrices (so the reads are
far larger than L2) and the layer picked by a traced index, as in the model's layer loop:

1. per projection: a chain of 48 products (unrolled: a device loop's per-iteration cost would
   swamp ~5 us kernels), each layer's output feeding the next; wall time per link, and for XLA
   and the best tiles the kernels' own time from a profiler trace. `--sweep` tries tile settings.
2. a GPT-2 block without its attention (LN1, QKV, out projection + residual, LN2, fc + gelu,
   fc2 + residual), 48 layers per step: XLA's ops against four fused kernels. This is the
   difference the decode step can gain.

    python3 -P benchmarks/bench_gemv.py [--sweep] [--rows 1] [--block-config JSON]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from energon_jax.kernels.gemv import gemv_pallas, gemv_xla

sys.path.insert(0, os.path.dirname(__file__))
from profile_decode import trace_kernels  # noqa: E402

E, F, L = 1600, 6400, 48
SHAPES = {"qkv": (E, 3 * E), "attn_out": (E, E), "mlp_fc": (E, F), "mlp_proj": (F, E)}


def timed(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def chain(proj, k, n):
    """48 products unrolled (no loop), link l's input the previous output's first k columns."""
    def run(x, w, b):
        for l in range(L):
            y = proj(x, w, b, jnp.int32(l))
            x = y[:, :k] if n >= k else jnp.tile(y, (1, k // n))
        return x
    return jax.jit(run)


def kernel_us(fn, *args):
    """GPU kernel time of one call, from a profiler trace: (total us, launches)."""
    jax.block_until_ready(fn(*args))
    ks = trace_kernels(lambda: jax.block_until_ready(fn(*args)), tempfile.mkdtemp())
    return sum(us for _, us in ks), len(ks)


def weights(key, k, n, transposed):
    shape = (L, n, k) if transposed else (L, k, n)
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def sweep_configs(k, n, transposed):
    if transposed:  # tiles [block_n, block_k], contiguous along k
        grid = itertools.product((4, 8, 16, 32), (64, 128, 256), (4, 8))
    else:
        grid = itertools.product((16, 32), (64, 256), (8,))
    return [dict(block_n=bn, block_k=bk, num_warps=nw) for bn, bk, nw in grid
            if n % bn == 0 and k % bk == 0 and bn * bk <= 8192]


def per_projection(rows, sweep, transposed):
    out = {}
    key = jax.random.PRNGKey(0)
    layout = "nk" if transposed else "kn"
    for name, (k, n) in SHAPES.items():
        w = weights(key, k, n, transposed)
        b = jnp.zeros((L, n), jnp.bfloat16)
        x = jax.random.normal(key, (rows, k), jnp.bfloat16)
        mb = k * n * 2 / 1e6
        variants = {"xla": lambda x, w, b, i: gemv_xla(x, w, b, i, transposed=transposed)}
        if rows == 1:  # what the engine does today for one row: two rows, so XLA picks a GEMM
            variants["xla_2rows"] = lambda x, w, b, i: gemv_xla(jnp.concatenate([x, x]), w, b, i,
                                                                transposed=transposed)[:1]
        for c in sweep_configs(k, n, transposed) if sweep else [dict()]:
            variants["pallas " + json.dumps(c)] = (
                lambda c: lambda x, w, b, i: gemv_pallas(x, w, b, i, transposed=transposed, **c))(c)
        rows_here = []
        for vname, proj in variants.items():
            try:
                fn = chain(proj, k, n)
                t = timed(fn, x, w, b) / L
            except Exception as e:  # a tile setting Triton refuses: report, go on
                print(f"  {name} {vname}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            row = dict(proj=name, layout=layout, variant=vname, wall_us_per_link=round(t * 1e6, 2),
                       wall_tb_s=round(mb / 1e6 / t, 3))
            rows_here.append((row, fn))
        best = min((r for r in rows_here if r[0]["variant"].startswith("pallas")), key=lambda r: r[0]["wall_us_per_link"])
        for row, fn in rows_here:
            if row is best[0] or row["variant"].startswith("xla"):
                us, launches = kernel_us(fn, x, w, b)
                row.update(kernel_us_per_link=round(us / L, 2), kernel_tb_s=round(mb * L / us, 3) if us else None,
                           launches_per_link=round(launches / L, 2), best="pallas" in row["variant"])
                print(json.dumps(row), flush=True)
        out[name] = json.loads(best[0]["variant"].split(" ", 1)[1])
    return out


def block_params(key, transposed):
    ks = jax.random.split(key, 4)
    p = {name: (weights(kk, k, n, transposed), jnp.zeros((L, n), jnp.bfloat16))
         for (name, (k, n)), kk in zip(SHAPES.items(), ks)}
    ones, zeros = jnp.ones((L, E), jnp.bfloat16), jnp.zeros((L, E), jnp.bfloat16)
    p["ln1"] = (ones, zeros)
    p["ln2"] = (ones, zeros)
    return p


def block_step(proj):
    """48 blocks without attention, unrolled (the QKV's first E columns stand in for attention)."""
    def run(x, p):
        for i in range(L):
            l = jnp.int32(i)
            qkv = proj("qkv", x, *p["qkv"], l, ln=p["ln1"])
            x = proj("attn_out", qkv[:, :E], *p["attn_out"], l, residual_mn=x)
            f = proj("mlp_fc", x, *p["mlp_fc"], l, ln=p["ln2"], act="gelu_new")
            x = proj("mlp_proj", f, *p["mlp_proj"], l, residual_mn=x)
        return x
    return jax.jit(run)


def xla_unfused(name, x, w, b, l, *, ln=None, act=None, residual_mn=None, rows2=False, transposed=False):
    """The model's ops one by one (what XLA sees in the decode step today)."""
    two = (lambda a: jnp.concatenate([a, a])) if rows2 else (lambda a: a)
    return gemv_xla(two(x), w, b, l, ln=ln, act=act, transposed=transposed,
                    residual_mn=None if residual_mn is None else two(residual_mn))[: x.shape[0]]


def blocks(rows, configs, transposed):
    """configs: tile settings per projection name (missing: the kernel's defaults)."""
    p = block_params(jax.random.PRNGKey(1), transposed)
    x = jax.random.normal(jax.random.PRNGKey(2), (rows, E), jnp.bfloat16)
    pallas = lambda name, *a, **kw: gemv_pallas(*a, transposed=transposed, **configs.get(name, {}), **kw)
    variants = {
        "xla_2rows": lambda *a, **kw: xla_unfused(*a, rows2=True, transposed=transposed, **kw),
        "pallas " + json.dumps(configs): pallas,
    }
    gb = L * sum(k * n * 2 for k, n in SHAPES.values()) / 1e9
    for vname, proj in variants.items():
        fn = block_step(proj)
        t = timed(fn, x, p)
        us, launches = kernel_us(fn, x, p)
        print(json.dumps(dict(part="48 blocks without attention", layout="nk" if transposed else "kn", variant=vname,
                              rows=rows, wall_ms=round(t * 1e3, 3), wall_tb_s=round(gb / 1e3 / t, 3),
                              kernel_ms=round(us / 1e3, 3), launches=launches,
                              kernel_tb_s=round(gb * 1e3 / us, 3) if us else None)), flush=True)
    ref = block_step(lambda *a, **kw: xla_unfused(*a, transposed=transposed, **kw))(x, p).astype(jnp.float32)
    got = block_step(pallas)(x, p).astype(jnp.float32)
    print(json.dumps(dict(check="pallas vs xla blocks, max abs", value=float(jnp.max(jnp.abs(ref - got))),
                          scale=float(jnp.max(jnp.abs(ref))))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--layout", choices=("kn", "nk", "both"), default="both",
                    help="weights stored [L, K, N] (the model's) or [L, N, K] (contiguous along K)")
    ap.add_argument("--block-config", default="{}", help="JSON {projection: tile settings} for the block run (with --sweep: the best found)")
    args = ap.parse_args()
    print(json.dumps(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__)))
    for transposed in {"kn": [False], "nk": [True], "both": [False, True]}[args.layout]:
        best = per_projection(args.rows, args.sweep, transposed)
        blocks(args.rows, best if args.sweep else json.loads(args.block_config), transposed)


if __name__ == "__main__":
    main()
