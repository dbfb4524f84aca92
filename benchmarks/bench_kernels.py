"""GPU check and timing of the Triton attention kernels (through jax-triton) against their XLA references.

Run on a CUDA machine from the repository root, with the package installed (make install or pip install .):
    python3 -P benchmarks/bench_kernels.py [--kernels decode,append,prefill,varlen] [--sweep]
Prints each kernel's error against its reference, then a markdown table of times; writes the
output to $OUT/kernels.txt (and the times to $OUT/kernels.json) too when OUT is set. --sweep also
times several tile configurations after the default one. Decode is timed per call inside a chain
of CHAIN calls in one jit (GPU time, as inside a decode step), with the single-call time beside it.

Floors (copy: H100 ~3.0 TB/s, H200 ~4.3 TB/s; ~790 TFLOP/s bf16 matmul on both): decode reads
K+V once, so its time is bytes / bandwidth; prefill and varlen are matmul work, reported in TFLOP/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np

# The kernels come from the installed package (pip install . or make install): the repository root
# goes last on the path, for benchmarks.decode only, so that its energon_jax/ folder (which lacks the
# energon_jax.kernels and energon_jax.convert the package maps from kernels/ and convert/) never shadows it.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from energon_jax.kernels import decode_append as dap  # noqa: E402
from energon_jax.kernels import decode_attention as da  # noqa: E402
from energon_jax.kernels import prefill_attention as pa  # noqa: E402
from energon_jax.kernels import varlen_attention as va  # noqa: E402
from benchmarks.decode import COPY_CEILINGS, roofline_bandwidth  # noqa: E402
from energon_jax.models.gpt2 import decode_attention_xla, write_token  # noqa: E402

# the device copy ceiling of benchmarks/decode.py's table for this device kind; other devices are
# reported against the H100's
HBM_BYTES_PER_S = roofline_bandwidth(jax.devices()[0].device_kind, 0.0) or COPY_CEILINGS["H100"]
MATMUL_FLOP_PER_S = 788e12  # bf16 8192^3 matmul through JAX on the H100 (shared/DEVICE.md)
LINES = []


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def time_us(fn, *args, inner=20, repeats=7):
    """Median microseconds per call of a jitted fn: warm up, then time back-to-back calls."""
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(runs)


def errors(out, ref):
    """(max abs error, relative L2 error, any NaN) of out against ref, in float32."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    return float(np.abs(out - ref).max()), float(rel), bool(np.isnan(out).any())


def report_check(name, out, ref, limit):
    mx, rel, nan = errors(out, ref)
    ok = not nan and rel < limit
    say(f"check {name}: max abs err {mx:.3e}, rel L2 err {rel:.3e}, NaN {nan} -> {'ok' if ok else 'FAIL'}")
    return ok


def tflops(flops, t_us):
    return f"{flops / t_us / 1e6:.0f} TFLOP/s ({flops / t_us * 1e6 / MATMUL_FLOP_PER_S:.0%} of matmul)"


def randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ---- decode: batch 32, context 2048, GPT-2 XL heads (25 x 64), bf16 ----

def decode_case(dtype=jnp.bfloat16, b=32, n=25, s=2048, d=64, lengths=None, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    return randn(kq, (b, n, d), dtype), randn(kk, (b, n, s, d), dtype), randn(kv, (b, n, s, d), dtype), lengths


def check_decode():
    ok = True
    # 30 rows: the cache cut into chunks and merged; 320 rows: one program per row, output in-kernel
    for b, lengths in ((6, [0, 1, 7, 129, 999, 1000]), (64, [0, 1, 7, 129, 999, 1000, 640, 333] * 8)):
        for dtype, limit in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)):
            args = decode_case(dtype, b=b, n=5, s=1000, lengths=lengths, seed=1)
            out = jax.jit(lambda *a: da.decode_attention(*a, scale=0.125, impl="triton"))(*args)
            ref = da.decode_attention_reference(*args, scale=0.125)
            splits = da.DecodeTiles().num_splits(1000, b * 5)
            ok &= report_check(f"decode {jnp.dtype(dtype).name}, {b * 5} rows, {splits} chunks", out, ref, limit)
    return ok


# (B, N, S, live length): the target shape (GPT-2 XL heads, context 2,048), then GPT-2
# medium's batch-32 decode at ~1,000 tokens of context, as benchmarks/decode.py runs it end to end
DECODE_SHAPES = ((32, 25, 2048, 2048), (32, 16, 1024, 992))
# the fused step also at one, four and eight slots (16, 64 and 128 rows: several runs per row)
APPEND_SHAPES = DECODE_SHAPES + ((1, 16, 1024, 992), (4, 16, 1024, 992), (8, 16, 1024, 992))
CHAIN = 24  # calls per dispatch in the chained timing (GPT-2 medium's layers)


def chained(attn):
    """CHAIN calls in one jit, each query made from the previous output: the host dispatches once,
    so short kernels are timed on the GPU, merge steps included, as inside a decode step."""
    def run(q, k, v, lengths):
        return jax.lax.fori_loop(0, CHAIN, lambda i, q: attn(q, k, v, lengths).astype(q.dtype), q)
    return jax.jit(run)


def bench_decode(tiles_list):
    rows = []
    for b, n, s, live in DECODE_SHAPES:
        args = decode_case(b=b, n=n, s=s, lengths=[live] * b)
        d = args[0].shape[-1]
        # the live K and V, each read once (the Triton kernel's traffic; XLA's attention reads the whole
        # cache, so at live < S its rate is understated by live / S)
        kv_bytes = 2 * b * n * live * d * args[1].dtype.itemsize

        def rate(t_us):
            return f"{kv_bytes / t_us / 1e6:.2f} TB/s ({kv_bytes / t_us * 1e6 / HBM_BYTES_PER_S:.0%} of copy)"

        name = f"decode B{b} N{n} S{s} live {live}"
        impls = [("xla reference", lambda *a: da.decode_attention(*a, scale=0.125, impl="xla"))]
        impls += [(f"triton {tiles} ({tiles.num_splits(s, b * n)} splits)",
                   lambda *a, tiles=tiles: da.decode_attention(*a, scale=0.125, impl="triton", tiles=tiles))
                  for tiles in tiles_list]
        for label, attn in impls:
            one = time_us(jax.jit(attn), *args)
            per = time_us(chained(attn), *args, inner=3) / CHAIN
            rows.append((name, label, per, f"{rate(per)}; one call {one:.1f} us"))
    return rows


# ---- append: a decode step's cache write + attention in one kernel (kernels/decode_append.py) ----

def append_case(dtype, b, n, s, d, positions, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (randn(kq, (b, 3, n, d), dtype), randn(kk, (b, n, s, d), dtype), randn(kv, (b, n, s, d), dtype),
            jnp.asarray(positions, jnp.int32))


def check_append():
    ok = True
    for b, positions in ((6, [0, 1, 7, 129, 999, 1023]), (64, [0, 1, 7, 129, 999, 1023, 640, 333] * 8)):
        for dtype, limit in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)):
            args = append_case(dtype, b, 5, 1024, 64, positions, seed=1)
            ref, k_ref, v_ref = dap.decode_append_reference(*args, scale=0.125)
            for splits in (None, 1, 5):  # None: runs chosen from the rows (16 at 30 rows, 1 at 320)
                out, k, v = jax.jit(lambda *a, n=splits: dap.decode_append_attention(
                    *a, scale=0.125, impl="triton", splits=n))(*args)
                same = bool(jnp.array_equal(k, k_ref)) and bool(jnp.array_equal(v, v_ref))
                what = f"append {jnp.dtype(dtype).name}, {b * 5} rows, splits {splits}"
                say(f"check {what}: caches written as the reference: {same}")
                ok &= same and report_check(what, out, ref, limit)
    return ok


def _write_then(attend):
    """The unfused step: two scatters into the cache (as models/gpt2.write_token), then attend."""
    def step(qkv, k, v, pos, *, scale):
        k, v = write_token(k[None], qkv[:, 1], 0, pos)[0], write_token(v[None], qkv[:, 2], 0, pos)[0]
        return attend(qkv[:, 0], k, v, pos + 1, scale=scale), k, v
    return step


def bench_append(configs):
    """Per step in an unrolled chain of CHAIN steps in one jit, the caches carried from step to step
    (updated in place: each step's caches are dead after it), each query made from the last output:
    GPU time, cache writes included, as inside a decode step. configs: (block_s, warps, stages, splits)
    of the fused kernel (splits None: chosen from the rows)."""
    rows = []
    for b, n, s, live in APPEND_SHAPES:
        args = append_case(jnp.bfloat16, b, n, s, 64, [live - 1] * b)
        kv_bytes = 2 * b * n * live * 64 * 2

        def chain(step):
            def run(qkv, k, v, pos):
                for _ in range(CHAIN):
                    out, k, v = step(qkv, k, v, pos, scale=0.125)
                    qkv = qkv.at[:, 0].set(out.astype(qkv.dtype))
                return qkv, k, v
            return jax.jit(run, donate_argnums=(1, 2))

        impls = [("scatters + decode_attention_reference (f32, HIGHEST)", _write_then(da.decode_attention_reference)),
                 ("scatters + models.gpt2.decode_attention_xla (the XLA path)", _write_then(decode_attention_xla)),
                 ("scatters + jax-triton decode_attention", _write_then(
                     lambda *a, scale: da.decode_attention(*a, scale=scale, impl="triton")))]
        impls += [(f"fused decode_append (Pallas), block_s {bs}, {w} warps, {st} stages, splits "
                   f"{sp if sp else dap.default_splits(b * n, s, bs)}{'' if sp else ' (default)'}",
                   lambda *a, scale, bs=bs, w=w, st=st, sp=sp: dap.decode_append_attention(
                       *a, scale=scale, impl="triton", block_s=bs, num_warps=w, num_stages=st, splits=sp))
                  for bs, w, st, sp in configs]
        for label, step in impls:
            fn = chain(step)
            qkv, k, v, pos = args
            jax.block_until_ready(fn(qkv, k.copy(), v.copy(), pos))  # compile
            runs = []
            for _ in range(5):
                k_c, v_c = k.copy(), v.copy()
                jax.block_until_ready((k_c, v_c))
                t0 = time.perf_counter()
                jax.block_until_ready(fn(qkv, k_c, v_c, pos))
                runs.append((time.perf_counter() - t0) * 1e6 / CHAIN)
            per = statistics.median(runs)
            rows.append((f"append B{b} N{n} S{s} pos {live - 1}", label, per,
                         f"{kv_bytes / per / 1e6:.2f} TB/s ({kv_bytes / per * 1e6 / HBM_BYTES_PER_S:.0%} of copy)"))
    return rows


# ---- prefill: batch 8, T 1024, 16 heads x 64, bf16, causal ----

def prefill_case(dtype=jnp.bfloat16, b=8, t=1024, n=16, d=64, lengths=None, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    return (*(randn(k, (b, t, n, d), dtype) for k in keys), lengths)


def check_prefill():
    ok = True
    # float32 dots run as tf32 on the GPU (as XLA's default precision does): a looser bound
    for dtype, limit in ((jnp.bfloat16, 2e-2), (jnp.float32, 5e-3)):
        args = prefill_case(dtype, b=4, t=300, n=3, lengths=[0, 1, 129, 300], seed=2)
        out = jax.jit(lambda *a: pa.prefill_attention(*a, scale=0.125, impl="triton"))(*args)
        ref = pa.prefill_attention_reference(*args, scale=0.125)
        ok &= report_check(f"prefill {jnp.dtype(dtype).name}", out, ref, limit)
    return ok


def bench_prefill(tiles_list):
    args = prefill_case()
    b, t, n, d = args[0].shape
    flops = 4 * b * n * d * t * (t + 1) / 2  # QK^T and PV over the causal half
    rows = []
    ref = jax.jit(lambda *a: pa.prefill_attention(*a, scale=0.125, impl="xla"))
    tm = time_us(ref, *args, inner=5)
    rows.append(("prefill", "xla reference (f32 softmax)", tm, tflops(flops, tm)))
    try:  # the fast XLA/cuDNN path users would otherwise call
        cudnn = jax.jit(lambda q, k, v, lengths: jax.nn.dot_product_attention(
            q, k, v, scale=0.125, is_causal=True, implementation="cudnn"))
        tm = time_us(cudnn, *args)
        rows.append(("prefill", "dot_product_attention cudnn", tm, tflops(flops, tm)))
    except Exception as e:  # noqa: BLE001 - a missing cuDNN path is reported, not fatal
        say(f"cudnn prefill baseline unavailable: {type(e).__name__}: {str(e)[:200]}")
    for tiles in tiles_list:
        fn = jax.jit(lambda *a, tiles=tiles: pa.prefill_attention(*a, scale=0.125, impl="triton", tiles=tiles))
        tm = time_us(fn, *args)
        rows.append(("prefill", f"triton {tiles}", tm, tflops(flops, tm)))
    return rows


# ---- varlen: bert-base (12 heads x 64), 64 sequences of length U[16, 512], bf16 ----

def varlen_case(dtype=jnp.bfloat16, seq_lens=None, n=12, d=64, pad=0, seed=0):
    rng = np.random.default_rng(seed)
    seq_lens = rng.integers(16, 513, size=64) if seq_lens is None else np.asarray(seq_lens)
    t = int(seq_lens.sum()) + pad
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(seq_lens)]), jnp.int32)
    return (*(randn(k, (t, n, d), dtype) for k in keys), cu), seq_lens


def check_varlen():
    ok = True
    for dtype, limit in ((jnp.bfloat16, 2e-2), (jnp.float32, 5e-3)):
        args, lens = varlen_case(dtype, seq_lens=[1, 7, 129, 0, 500, 64], n=3, pad=11, seed=3)
        fn = jax.jit(lambda *a: va.varlen_attention(*a, scale=0.125, max_seqlen=500, impl="triton"))
        out = fn(*args)
        ref = va.varlen_attention_reference(*args, scale=0.125, max_seqlen=500)
        ok &= report_check(f"varlen {jnp.dtype(dtype).name}", out, ref, limit)
    return ok


def bench_varlen(tiles_list):
    args, lens = varlen_case()
    n, d = args[0].shape[1:]
    flops = 4 * n * d * float(np.sum(lens.astype(np.float64) ** 2))
    rows = []
    ref = jax.jit(lambda *a: va.varlen_attention(*a, scale=0.125, max_seqlen=512, impl="xla"))
    tm = time_us(ref, *args, inner=5)
    rows.append(("varlen", f"xla reference ({len(lens)} seqs, {int(lens.sum())} tokens)", tm, tflops(flops, tm)))
    try:  # what a padded encoder does: a [S, 512] batch through cuDNN, told each sequence's length
        padded = randn(jax.random.PRNGKey(1), (len(lens), 512, n, d), args[0].dtype)
        seq_lens = jnp.asarray(lens, jnp.int32)
        cudnn = jax.jit(lambda x, sl: jax.nn.dot_product_attention(
            x, x, x, scale=0.125, query_seq_lengths=sl, key_value_seq_lengths=sl, implementation="cudnn"))
        tm = time_us(cudnn, padded, seq_lens)
        rows.append(("varlen", "dot_product_attention cudnn, padded to 512", tm, tflops(flops, tm)))
    except Exception as e:  # noqa: BLE001 - a missing cuDNN path is reported, not fatal
        say(f"cudnn varlen baseline unavailable: {type(e).__name__}: {str(e)[:200]}")
    for tiles in tiles_list:
        fn = jax.jit(lambda *a, tiles=tiles: va.varlen_attention(*a, scale=0.125, max_seqlen=512, impl="triton", tiles=tiles))
        tm = time_us(fn, *args)
        rows.append(("varlen", f"triton {tiles}", tm, tflops(flops, tm)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time several tile configurations")
    parser.add_argument("--append-configs", default=None, metavar="BLOCK_S,WARPS,STAGES[,SPLITS];...",
                        help="time these fused-step settings after the default ones (SPLITS left out: chosen "
                             "from the rows), instead of --sweep's list for that kernel")
    parser.add_argument("--kernels", default="decode,append,prefill,varlen",
                        help="comma-separated subset of decode,append,prefill,varlen")
    args = parser.parse_args()
    sweep = args.sweep
    chosen = set(args.kernels.split(","))
    if not chosen <= {"decode", "append", "prefill", "varlen"}:
        parser.error(f"--kernels {args.kernels!r}: choose from decode, append, prefill, varlen")

    dev = jax.devices()[0]
    say(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if jax.default_backend() != "gpu":
        sys.exit("benchmarks/bench_kernels.py needs a CUDA GPU")
    checks = {"decode": check_decode, "append": check_append, "prefill": check_prefill, "varlen": check_varlen}
    ok = all([checks[name]() for name in sorted(chosen)])

    decode_tiles = [da.DecodeTiles()]
    append_configs = [(dap.DEFAULT_BLOCK_S, 4, 3, None), (dap.DEFAULT_BLOCK_S, 4, 3, 1)]
    if args.append_configs:
        try:
            given = [tuple(int(x) for x in c.split(",")) for c in args.append_configs.split(";") if c]
        except ValueError:
            parser.error(f"--append-configs {args.append_configs!r}: expected BLOCK_S,WARPS,STAGES[,SPLITS];...")
        if any(len(c) not in (3, 4) for c in given):
            parser.error(f"--append-configs {args.append_configs!r}: each setting is 3 or 4 ints")
        append_configs += [c if len(c) == 4 else (*c, None) for c in given]
    flash_tiles = [pa.FlashTiles()]
    varlen_tiles = [va.FlashTiles()]
    if sweep:
        decode_tiles += [da.DecodeTiles(block_s=bs, chunk=c, num_warps=w, num_stages=st, mma=mma)
                         for bs, c, w, st, mma in (
                             (128, 256, 4, 2, False), (128, 512, 4, 2, False), (64, 256, 4, 2, False),
                             (128, 4096, 4, 3, False),
                             (64, 256, 4, 2, True), (64, 256, 4, 3, True), (128, 256, 4, 3, True),
                             (64, 512, 4, 3, True), (128, 512, 8, 3, True), (32, 4096, 4, 4, True),
                             (64, 4096, 4, 3, True), (64, 4096, 4, 4, True), (128, 4096, 4, 3, True),
                             (128, 4096, 8, 3, True))]
        append_configs += [] if args.append_configs else [(32, 4, 4, 1), (64, 4, 2, 1), (64, 4, 4, 1), (64, 8, 3, 1), (128, 4, 3, 1),
                           (128, 8, 3, 1), (128, 8, 2, 1), (32, 4, 3, 2), (32, 4, 3, 4), (32, 2, 3, None),
                           (16, 4, 3, None)]
        more = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4))
        flash_tiles += [pa.FlashTiles(block_m=m, block_n=nn, num_warps=w, num_stages=st) for m, nn, w, st in more]
        varlen_tiles += [va.FlashTiles(block_m=m, block_n=nn, num_warps=w, num_stages=st) for m, nn, w, st in more]

    rows = []
    for bench, tiles in ((bench_decode, decode_tiles), (bench_append, append_configs), (bench_prefill, flash_tiles),
                         (bench_varlen, varlen_tiles)):
        if bench.__name__.removeprefix("bench_") not in chosen:
            continue
        try:
            rows += bench(tiles)
        except Exception as e:  # noqa: BLE001 - report and go on to the next kernel
            say(f"{bench.__name__} failed: {type(e).__name__}: {str(e)[:400]}")
            ok = False

    say()
    say("| kernel | implementation | time (us; decode: per call in a chain) | rate |")
    say("|---|---|---|---|")
    for kernel, impl, t, rate in rows:
        say(f"| {kernel} | {impl} | {t:.1f} | {rate} |")
    say(f"\nall checks ok: {ok}")
    if os.environ.get("OUT"):
        with io.open(os.path.join(os.environ["OUT"], "kernels.json"), "w") as f:
            json.dump([{"kernel": k, "impl": i, "us": t} for k, i, t, _ in rows], f)
        with io.open(os.path.join(os.environ["OUT"], "kernels.txt"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
