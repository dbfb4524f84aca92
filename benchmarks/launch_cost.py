"""Host cost of one kernel launch inside a jitted loop: an XLA fusion, a jax-triton call, and a
Pallas (Triton lowering) call, each doing no real work.

    python3 -P benchmarks/launch_cost.py [--iters 400] [--chain 16]

Each variant runs a `lax.fori_loop` of --iters iterations whose body chains --chain tiny kernels
(each adds one to a 128-float vector, the next reading the last one's output). The GPU work is
~1-2 us a kernel, so when wall time per kernel is above that the loop is bound by the host
launching kernels, and wall / (iters * chain) is the host's cost per launch. A decode step of
GPT-2 medium launches ~300 kernels, 24 of them jax-triton calls (benchmarks/profile_decode.py):
this tells whether those calls cost the host more than XLA's own kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

N = 128


@triton.jit
def _add_one(x_ptr, o_ptr, SIZE: tl.constexpr):
    offs = tl.arange(0, SIZE)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def xla_op(x):
    # the barrier keeps XLA from fusing the chain into one kernel
    return jax.lax.optimization_barrier(x + 1.0)


def jax_triton_op(x):
    import jax_triton as jt

    return jt.triton_call(x, kernel=_add_one, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                          num_warps=1, num_stages=1, SIZE=N)


def pallas_op(x):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))(x)


OPS = {"xla": xla_op, "jax-triton": jax_triton_op, "pallas": pallas_op}


def timed_loop(op, iters: int, chain: int, repeats: int = 5) -> float:
    """Median wall seconds of one call of a jitted fori_loop of iters x chain ops."""
    @jax.jit
    def run(x):
        def body(_, x):
            for _ in range(chain):
                x = op(x)
            return x
        return jax.lax.fori_loop(0, iters, body, x)

    x = jnp.zeros((N,), jnp.float32)
    out = jax.block_until_ready(run(x))
    expect = float(iters * chain)
    if float(out[0]) != expect:  # each op really ran
        raise SystemExit(f"{op.__name__}: got {float(out[0])}, expected {expect}")
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(x))
        walls.append(time.perf_counter() - t)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--ops", default=",".join(OPS))
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, triton {triton.__version__}: "
          f"fori_loop of {args.iters} iterations x a chain of {args.chain} kernels")
    print("| kernel | us per kernel (chain) | us per loop iteration with one kernel |")
    print("|---|---|---|")
    results = {}
    for name in args.ops.split(","):
        chained = timed_loop(OPS[name], args.iters, args.chain)
        single = timed_loop(OPS[name], args.iters, 1)
        per_kernel = 1e6 * chained / (args.iters * args.chain)
        per_iter = 1e6 * single / args.iters
        results[name] = {"us_per_kernel": per_kernel, "us_per_iteration_one_kernel": per_iter}
        print(f"| {name} | {per_kernel:.2f} | {per_iter:.2f} |", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "launch_cost.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
