"""Time the decode step's sampler (energon_jax.engine.sampling.sample) and the XLA operations it is
built from, on the device, at GPT-2's vocabulary.

    python3 -P benchmarks/bench_sampling.py [--batches 1,32] [--vocab 50257] [--chain 8] [--groups 64,256]
        [--kernel 2:2048:8:2,4:4096:16:2] [--modes 'top_p 0.9'] [--reference]

The sampler runs with impl="xla" (candidates, or whole-row sorts) for each CANDIDATE_GROUPS in
--groups, and with the filter kernel (kernels/sample_filter.py) for each BITS:BLOCK:NUM_WARPS in
--kernel (BITS:BLOCK:NUM_WARPS:NUM_STAGES; the kernel runs for the batches the XLA path sorts whole,
top_p alone here); before timing a kernel setting, its mask is checked equal to the XLA one on each
mode's logits. --reference also times the old whole-row sort (reference_filtered_logits).

Each figure is GPU time per call: CHAIN calls on distinct logits run inside one jit (as inside a
decode step, no dispatch per call), the median of 7 runs divided by CHAIN. Writes the table to
$OUT/sampling.txt too when OUT is set.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from energon_jax.engine import sampling  # noqa: E402
from energon_jax.kernels import sample_filter  # noqa: E402

MODES = {  # name: (temperature, top_k, top_p)
    "greedy": (0.0, 0, 1.0),
    "temperature 0.8": (0.8, 0, 1.0),
    "top_k 50": (0.8, 50, 1.0),
    "top_p 0.9": (0.8, 0, 0.9),
    "top_k 50 + top_p 0.9": (0.8, 50, 0.9),
}


def chain_us(fn, logits_cbv, keys_cb, repeats=7) -> float:
    """Median GPU microseconds per fn(logits_bv, keys_b) call over a chain of len(logits_cbv) calls."""

    @jax.jit
    def run(logits_cbv, keys_cb):
        return [fn(logits_cbv[i], keys_cb[i]) for i in range(logits_cbv.shape[0])]

    jax.block_until_ready(run(logits_cbv, keys_cb))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(logits_cbv, keys_cb))
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times) / logits_cbv.shape[0]


def components(vocab: int):
    """The operations a sampler can be made of, each alone: (name, fn(logits_bv, keys_b))."""
    ids = lambda x: jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape)  # noqa: E731
    ops = [
        ("argmax", lambda x, k: jnp.argmax(x, -1)),
        ("jax.random.categorical (Gumbel-max over V)", lambda x, k: jax.vmap(jax.random.categorical)(k, x)),
        ("sort_key_val over V", lambda x, k: jax.lax.sort_key_val(-x, ids(x))[1][:, 0]),
        ("sort_key_val over V, stable (the sampler's sort)",
         lambda x, k: jax.lax.sort_key_val(-x, ids(x), is_stable=True)[1][:, 0]),
        ("sort over V by (value, id): two keys", lambda x, k: jax.lax.sort((-x, ids(x)), num_keys=2)[1][:, 0]),
        ("sort values over V", lambda x, k: jnp.sort(x, -1)[:, -1]),
        ("cumsum over V", lambda x, k: jnp.cumsum(x, -1)[:, -1]),
    ]
    for kk in (1, 16, 50, 64, 256, 1024):
        if kk > vocab:
            continue
        ops.append((f"lax.top_k k={kk}", lambda x, k, kk=kk: jax.lax.top_k(x, kk)[1][:, -1]))
    return ops


def reference_sample(logits_bv, params, keys_b):
    """The sampler before candidates: every row sorted whole, then drawn in sorted order."""
    filtered_bv, order_bv = sampling.reference_filtered_logits(logits_bv, params)
    pick_b = jax.vmap(jax.random.categorical)(keys_b, filtered_bv)
    return jnp.take_along_axis(order_bv, pick_b[:, None], axis=-1)[:, 0]


def check_masks(logits_bv, params, label):
    """The kernel's mask equals the XLA filter's on these logits, or the run stops."""
    scaled = sampling._scaled(logits_bv, params)
    want = jax.jit(lambda x: sampling.filter_mask(x, params, impl="xla"))(scaled)
    got = jax.jit(lambda x: sampling.filter_mask(x, params, impl="triton"))(scaled)
    same = bool(jnp.all(want == got))
    print(f"{label}: mask equal to the XLA filter's: {same} ({int(got.sum())} tokens kept)", flush=True)
    if not same:
        raise SystemExit(f"{label}: the kernel's mask differs from the XLA filter's")


def logits_of(kind: str, chain: int, batch: int, vocab: int):
    """"flat": N(0, 3^2) logits, as from random weights (a top_p 0.9 nucleus of thousands of
    tokens); "peaked": the same plus 8-12 on 16 tokens a row, as from a confident model (a nucleus
    of a few tokens)."""
    x = jax.random.normal(jax.random.key(0), (chain, batch, vocab), jnp.float32) * 3
    if kind == "peaked":
        boost = jax.random.uniform(jax.random.key(1), (chain, batch, 16), jnp.float32, 8, 12)
        x = x.at[:, :, :16].add(boost)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--groups", default=str(sampling.CANDIDATE_GROUPS),
                    help="values of sampling.CANDIDATE_GROUPS to time the sampler with, e.g. 64,128,256")
    ap.add_argument("--kernel", default="", help="BITS:BLOCK:NUM_WARPS:NUM_STAGES settings of the filter kernel")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--reference", action="store_true", help="also time the whole-row sort")
    ap.add_argument("--components", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the XLA operations alone")
    args = ap.parse_args()
    kernel_settings = [tuple(map(int, r.split(":"))) for r in args.kernel.split(",") if r]
    lines = [f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; vocabulary {args.vocab}, "
             f"chain of {args.chain} calls per jit", "", "| operation | " + " | ".join(
                 f"batch {b} (us)" for b in args.batches.split(",")) + " |",
             "|---|" + "---|" * len(args.batches.split(","))]
    rows: dict[str, list[str]] = {}
    for b in (int(b) for b in args.batches.split(",")):
        keys = jax.vmap(sampling.row_keys)(jnp.arange(args.chain * b, dtype=jnp.int32).reshape(args.chain, b))
        for kind in ("flat", "peaked"):
            logits = logits_of(kind, args.chain, b, args.vocab)
            for name, (t, k, p) in MODES.items():
                if name not in args.modes.split(","):
                    continue
                if kind == "peaked" and name in ("greedy", "temperature 0.8"):
                    continue  # no filter: the same work as flat
                params = sampling.SamplingParams.make(b, temperature=t, top_k=k, top_p=p)
                runs = [("reference (whole-row sort)", reference_sample, None)] if args.reference else []
                runs += [(f"sample(impl='xla'), {g} candidate groups", sampling.sample, int(g))
                         for g in args.groups.split(",") if g]
                if k or p < 1.0:  # the filters run: time the kernel too
                    runs += [(f"sample(impl='triton'), kernel bits {bits} block {block} warps {warps} stages {stages}",
                              functools.partial(sampling.sample, impl="triton"), (bits, block, warps, stages))
                             for bits, block, warps, stages in kernel_settings]
                for label, fn, setting in runs:
                    # module settings are read at trace time
                    if isinstance(setting, int):
                        sampling.CANDIDATE_GROUPS = setting
                    elif setting:
                        sample_filter.BITS, sample_filter.BLOCK, sample_filter.NUM_WARPS, sample_filter.NUM_STAGES = setting
                        check_masks(logits[0], params, label)
                    us = chain_us(lambda x, key, params=params, fn=fn: fn(x, params, key), logits, keys)
                    row = f"{name}, {kind} logits: {label}"
                    rows.setdefault(row, []).append(f"{us:.1f}")
                    print(f"batch {b} {row}: {us:.1f} us", flush=True)
        logits = logits_of("flat", args.chain, b, args.vocab)
        for name, fn in components(args.vocab) if args.components else []:
            us = chain_us(fn, logits, keys)
            rows.setdefault(name, []).append(f"{us:.1f}")
            print(f"batch {b} {name}: {us:.1f} us", flush=True)
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    text = "\n".join(lines)
    print("\n" + text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sampling.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
