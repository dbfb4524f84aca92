"""How fast can a kernel read a KV cache on this GPU? The read ceiling under the decode attention.

    python3 -P benchmarks/bench_read.py [--batch 32 --heads 16 --len 1024 --live 992 --pairs 6]

GPT-2 medium's decode at batch 32 and ~1,000 tokens of context reads 130 MB of K/V a layer. The
attention kernel (kernels/decode_append.py) takes ~36 us for it, ~3.6 TB/s. This script times
kernels that only read the same bytes, so the attention's distance from what the memory gives is
measured, not assumed:
- XLA: a reduce fusion over the live positions, and a copy (read + write) for the copy rate;
- Pallas (Triton lowering, the attention kernel's own stack): the attention's walk without any
  arithmetic but a sum, over tile sizes, warps, stages and runs per row;
- the attention kernel itself at the same shape (its caches donated, as in a decode loop), over
  tiles and runs per row (flash-decoding splits, their merge's kernel counted);
- if torch with CUDA and triton are importable: a @triton.jit read with plain loads and one with
  TMA tensor descriptors (Hopper's bulk copies), launched from torch, timed with CUDA events.
Every JAX variant reads `--pairs` distinct (K, V) pairs per call, so nothing is served from L2; its
time per pair is the GPU time of its kernels in a profiler trace. Rates are live K/V bytes / time.
Writes $OUT/read.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from profile_decode import trace_kernels  # noqa: E402

f32 = jnp.float32


def _read_kernel(k_ref, v_ref, o_ref, *, block_s, live, splits, masked):
    # the attention's walk (decode_append._walk) with its dots and softmax replaced by a sum
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    blocks = (live + block_s - 1) // block_s
    per = (blocks + splits - 1) // splits
    lo = jnp.minimum(j * per, blocks)
    hi = jnp.minimum(lo + per, blocks)
    d = k_ref.shape[-1]
    offs = jnp.arange(block_s)

    def step(i, acc):
        start = pl.multiple_of(i * block_s, block_s)
        if masked:
            mask = jnp.broadcast_to((start + offs < live)[:, None], (block_s, d))
            k = plgpu.load(k_ref.at[b, h, pl.ds(start, block_s), :], mask=mask, other=0)
            v = plgpu.load(v_ref.at[b, h, pl.ds(start, block_s), :], mask=mask, other=0)
        else:
            k = k_ref[b, h, pl.ds(start, block_s), :]
            v = v_ref[b, h, pl.ds(start, block_s), :]
        return acc + jnp.sum(k.astype(f32) + v.astype(f32), axis=0)

    o_ref[b, h, j, :] = jax.lax.fori_loop(lo, hi, step, jnp.zeros((d,), f32))


def pallas_read(k, v, *, live, block_s, splits, warps, stages, masked):
    b, n, _, d = k.shape
    kernel = functools.partial(_read_kernel, block_s=block_s, live=live, splits=splits, masked=masked)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, n, splits, d), f32), grid=(b, n, splits),
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(k, v)


def xla_read(k, v, *, live):
    return jnp.sum(k[:, :, :live].astype(f32), axis=2) + jnp.sum(v[:, :, :live].astype(f32), axis=2)


def xla_copy(k, v, *, live):
    del live
    return k + jnp.ones((), k.dtype), v + jnp.ones((), v.dtype)


def attention(k, v, *, live, qkv, **kw):
    """The decode step's kernel (write + attend) at position `live`, and its merge when split."""
    from energon_jax.kernels import decode_append as dap

    positions = jnp.full((k.shape[0],), live, jnp.int32)
    return dap.decode_append_attention(qkv, k, v, positions, scale=0.125, impl="triton", **kw)


def attention_us_per_pair(pairs, out_dir, **kw) -> tuple[float, int, list]:
    """As gpu_us_per_pair for the attention, with the caches donated and carried from call to call
    as in a decode loop (an undonated cache is copied before the in-place write: 2 more kernels)."""
    run = jax.jit(lambda ps: [attention(k, v, **kw)[1:] for k, v in ps], donate_argnums=0)
    pairs = run(pairs)
    jax.block_until_ready(pairs)
    reps, box = 5, [pairs]

    def go():
        for _ in range(reps):
            box[0] = run(box[0])
        jax.block_until_ready(box[0])

    kernels = trace_kernels(go, out_dir)
    calls = reps * len(pairs)
    return sum(us for _, us in kernels) / calls, round(len(kernels) / calls), box[0]


def gpu_us_per_pair(fn, pairs, out_dir) -> tuple[float, int]:
    """GPU microseconds per (K, V) pair of fn over every pair in one jit, and kernels per pair."""
    run = jax.jit(lambda ps: [fn(k, v) for k, v in ps])
    jax.block_until_ready(run(pairs))  # compile
    reps = 5
    kernels = trace_kernels(lambda: [jax.block_until_ready(run(pairs)) for _ in range(reps)], out_dir)
    calls = reps * len(pairs)
    return sum(us for _, us in kernels) / calls, round(len(kernels) / calls)


def torch_variants(args, live_bytes) -> list[dict]:
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError as e:
        print(f"# torch/triton variants skipped: {e}")
        return []
    if not torch.cuda.is_available():
        print("# torch has no CUDA: torch/triton variants skipped")
        return []

    @triton.jit
    def read_plain(K, V, O, live, S: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * S * D
        offs = tl.arange(0, BLOCK)[:, None] * D + tl.arange(0, D)[None, :]
        acc = tl.zeros([D], tl.float32)
        for i in tl.range(0, tl.cdiv(live, BLOCK), num_stages=STAGES):
            k = tl.load(K + base + i * BLOCK * D + offs)
            v = tl.load(V + base + i * BLOCK * D + offs)
            acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
        tl.store(O + row * D + tl.arange(0, D), acc)

    @triton.jit
    def read_tma(K, V, O, live, S: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        row = tl.program_id(0)
        kd = tl.make_tensor_descriptor(K + row.to(tl.int64) * S * D, shape=[S, D], strides=[D, 1],
                                       block_shape=[BLOCK, D])
        vd = tl.make_tensor_descriptor(V + row.to(tl.int64) * S * D, shape=[S, D], strides=[D, 1],
                                       block_shape=[BLOCK, D])
        acc = tl.zeros([D], tl.float32)
        for i in tl.range(0, tl.cdiv(live, BLOCK), num_stages=STAGES):
            k = kd.load([i * BLOCK, 0])
            v = vd.load([i * BLOCK, 0])
            acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
        tl.store(O + row * D + tl.arange(0, D), acc)

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    shape = (args.batch, args.heads, args.len, 64)
    pairs = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
              torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(args.pairs)]
    out = torch.empty((args.batch * args.heads, 64), device="cuda", dtype=torch.float32)

    def timed(launch) -> float:
        for k, v in pairs:
            launch(k, v)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        start.record()
        for _ in range(reps):
            for k, v in pairs:
                launch(k, v)
        end.record()
        torch.cuda.synchronize()
        return 1e3 * start.elapsed_time(end) / (reps * len(pairs))

    rows = []

    def add(name, launch, moved=live_bytes):
        try:
            us = timed(launch)
        except Exception as e:  # a variant this triton cannot build is reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
            return
        rows.append({"variant": name, "us": us, "tb_s": moved / us / 1e6})
        print(f"{name:60s} {us:8.2f} us  {moved / us / 1e6:5.2f} TB/s", flush=True)

    add("torch sum (live)", lambda k, v: (k[:, :, :args.live].sum(2, dtype=torch.float32),
                                          v[:, :, :args.live].sum(2, dtype=torch.float32)))
    add("torch copy (read+write, bytes counted twice)", lambda k, v: (k.clone(), v.clone()),
        moved=2 * live_bytes * args.len / args.live)
    grid = (args.batch * args.heads,)
    for kind, kern in (("plain", read_plain), ("tma", read_tma)):
        for block in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    add(f"triton {kind} block {block} warps {warps} stages {stages}",
                        lambda k, v, kern=kern, block=block, warps=warps, stages=stages: kern[grid](
                            k, v, out, args.live, S=args.len, D=64, BLOCK=block, STAGES=stages, num_warps=warps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--live", type=int, default=992)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    shape = (args.batch, args.heads, args.len, 64)
    live_bytes = 2 * args.batch * args.heads * args.live * 64 * 2
    print(f"# K/V {shape} bf16, live {args.live}: {live_bytes / 1e6:.1f} MB read a pair, {args.pairs} pairs a call")
    keys = jax.random.split(jax.random.key(0), 2 * args.pairs + 1)
    pairs = [(jax.random.normal(keys[2 * i], shape, jnp.bfloat16), jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16))
             for i in range(args.pairs)]
    qkv = jax.random.normal(keys[-1], (args.batch, 3, args.heads, 64), jnp.bfloat16)
    variants = [("xla reduce (live)", functools.partial(xla_read, live=args.live)),
                ("xla copy (read+write, bytes counted twice)", functools.partial(xla_copy, live=args.live))]
    for block, splits, warps, stages, masked in [(32, 1, 4, 3, True), (32, 1, 4, 3, False), (64, 1, 4, 3, False),
                                                 (128, 1, 8, 3, False), (32, 2, 4, 3, False), (64, 2, 4, 4, False),
                                                 (32, 1, 4, 5, False), (32, 1, 8, 3, False), (128, 1, 4, 2, False),
                                                 (64, 4, 4, 3, False), (32, 2, 4, 3, True), (32, 2, 4, 2, False),
                                                 (32, 3, 4, 3, False), (128, 2, 8, 3, False)]:
        name = f"pallas read block {block} runs {splits} warps {warps} stages {stages}{' masked' if masked else ''}"
        variants.append((name, functools.partial(pallas_read, live=args.live, block_s=block, splits=splits,
                                                 warps=warps, stages=stages, masked=masked)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, fn) in enumerate(variants):
            t0 = time.perf_counter()
            try:
                us, n_kernels = gpu_us_per_pair(fn, pairs, os.path.join(tmp, str(i)))
            except Exception as e:
                print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            copy = "copy" in name
            rate = (2 if copy else 1) * live_bytes * (args.len / args.live if copy else 1) / us / 1e6
            rows.append({"variant": name, "us": us, "kernels": n_kernels, "tb_s": rate})
            print(f"{name:60s} {us:8.2f} us GPU ({n_kernels} kernels)  {rate:5.2f} TB/s  "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
        for block, splits, warps, stages in [(32, 1, 4, 3), (32, 2, 4, 3), (64, 2, 4, 3), (128, 1, 8, 3),
                                             (128, 1, 4, 2), (32, 4, 4, 3), (64, 1, 4, 3)]:
            name = f"attention (decode_append) block {block} runs {splits} warps {warps} stages {stages}"
            try:
                us, n_kernels, pairs = attention_us_per_pair(pairs, os.path.join(tmp, name.replace(" ", "_")),
                                                             live=args.live, qkv=qkv, block_s=block, splits=splits,
                                                             num_warps=warps, num_stages=stages)
            except Exception as e:
                print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            rows.append({"variant": name, "us": us, "kernels": n_kernels, "tb_s": live_bytes / us / 1e6})
            print(f"{name:60s} {us:8.2f} us GPU ({n_kernels} kernels)  {live_bytes / us / 1e6:5.2f} TB/s", flush=True)
    del pairs
    if not args.no_torch:
        rows += torch_variants(args, live_bytes)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "read.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
