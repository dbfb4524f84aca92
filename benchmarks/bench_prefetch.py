"""Experiment (issue 6, the 1.3x decode target): can the fused decode step's attention kernel warm L2
with the weights that the GEMMs after it read?

In a GPT-2 medium decode step at batch 32 and ~1,000 tokens of context, the four projections of a
layer read 25 MB of weights in ~17 us of XLA split-K GEMMs (~1.5 TB/s): short kernels, bound by
DRAM latency more than by bandwidth. The attention kernel before them streams 130 MB of K/V for
~37 us. If that kernel also loads the layer's out / fc / proj weights (and the next layer's QKV)
with eviction_policy="evict_last", and its K/V with "evict_first", the GEMMs might read them from
L2. Expected before the runs: the GEMMs' 17 us a layer down to ~8-10 us if L2 keeps the weights,
at a cost of ~5 us on the attention (25 MB more at ~4 TB/s); a net ~3-5 us a layer. The first
question, answered by --modes layer_cold,layer_warm, is what the layer costs with its weights in L2.

    python3 -P benchmarks/bench_prefetch.py                 # every mode, wall per step
    python3 -P benchmarks/bench_prefetch.py --trace         # and per-kernel GPU time from a trace

Chain: 24 GPT-2 medium layers with distinct weights (one decode step), bf16, batch 32, cache 1,024,
position 992; a jitted fori_loop of --steps steps, the caches in its carry.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from energon_jax.kernels import decode_append as da
from energon_jax.kernels._flash import LOG2E
from energon_jax.models.layers import project

B, N, D, S, E, L = 32, 16, 64, 1024, 1024, 24
POS = 992
BLOCK_S = 32
PROGRAMS = B * N
TILE = BLOCK_S * D  # elements of one prefetched [BLOCK_S, D] tile


def layer_norm(x, g, b):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + 1e-5) * g + b).astype(x.dtype)


def make_params(key, distinct: int):
    def one(k):
        ks = jax.random.split(k, 4)
        w = lambda kk, shape: (0.02 * jax.random.normal(kk, shape, jnp.float32)).astype(jnp.bfloat16)
        z = lambda shape: jnp.zeros(shape, jnp.bfloat16)
        return dict(g1=jnp.ones((E,), jnp.float32), b1=jnp.zeros((E,), jnp.float32),
                    g2=jnp.ones((E,), jnp.float32), b2=jnp.zeros((E,), jnp.float32),
                    w_qkv=w(ks[0], (3, N, D, E)), b_qkv=z((3, N, D)),
                    w_out=w(ks[1], (E, N, D)), b_out=z((E,)),
                    w_fc=w(ks[2], (4 * E, E)), b_fc=z((4 * E,)),
                    w_proj=w(ks[3], (E, 4 * E)), b_proj=z((E,)))
    layers = [one(k) for k in jax.random.split(key, distinct)]
    return [layers[i % distinct] for i in range(L)]


def tiles_of(w):
    """w viewed as [PROGRAMS, T, BLOCK_S, D]: program p prefetches tiles [p, 0..T)."""
    t = w.size // (PROGRAMS * TILE)
    assert t * PROGRAMS * TILE == w.size, w.shape
    return w.reshape(PROGRAMS, t, BLOCK_S, D)


def _pf_kernel(pos_ref, qkv_ref, k_in_ref, v_in_ref, *rest, n_pf, scale_log2, kv_evict, pf_evict, vmask, read_only, bs,
               parts=0):
    from jax.experimental.pallas import triton as plgpu

    pf_refs, rest = rest[:n_pf], rest[n_pf:]
    if parts:  # qkv_ref holds the QKV GEMM's float32 partial sums [parts, B, 3, N, D]; rest[0] the bias [3, N, D]
        bias_ref, rest = rest[0], rest[1:]
    o_ref, sink_ref, k_ref, v_ref = rest
    f32 = jnp.float32
    b, h = pl.program_id(0), pl.program_id(1)
    prog = b * N + h
    pos = jnp.clip(pos_ref[b], 0, S - 1)
    if parts:
        def row(c):
            x = bias_ref[c, h, :].astype(jnp.float32)
            for j in range(parts):
                x = x + qkv_ref[j, b, c, h, :]
            return x.astype(k_in_ref.dtype)  # rounded as the bf16 projection output would be
        q, k_new, v_new = row(0), row(1), row(2)
    else:
        q = qkv_ref[b, 0, h, :]
    cdt = k_in_ref.dtype
    if not parts:
        k_new = qkv_ref[b, 1, h, :].astype(cdt)
        v_new = qkv_ref[b, 2, h, :].astype(cdt)
    q_rd = jnp.broadcast_to(q.astype(cdt)[None, :], (16, D))
    offs = jnp.arange(bs)
    dims = (((1,), (1,)), ((), ()))

    def step(i, carry):
        m, l, acc, sink = carry
        start = pl.multiple_of(i * bs, bs)
        live = start + offs < pos
        if vmask == "load":  # masked loads: dead rows read as 0, no select between load and dot
            mask = jnp.broadcast_to(live[:, None], (bs, D))
            k = plgpu.load(k_in_ref.at[b, h, pl.ds(start, bs), :], mask=mask, other=0.0, eviction_policy=kv_evict)
            v = plgpu.load(v_in_ref.at[b, h, pl.ds(start, bs), :], mask=mask, other=0.0, eviction_policy=kv_evict)
        else:
            k = plgpu.load(k_in_ref.at[b, h, pl.ds(start, bs), :], eviction_policy=kv_evict)
            v = plgpu.load(v_in_ref.at[b, h, pl.ds(start, bs), :], eviction_policy=kv_evict)
        if vmask == "where":
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
        if read_only:  # the loads and both dots, no softmax: what the walk costs without its max / exp2
            sc = jax.lax.dot_general(q_rd, k, dims, preferred_element_type=f32).astype(cdt)
            return m, l, acc + jax.lax.dot_general(sc, v, (((1,), (0,)), ((), ())), preferred_element_type=f32), sink
        s = jax.lax.dot_general(q_rd, k, dims, preferred_element_type=f32)
        s = jnp.where(live[None, :], s * scale_log2, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        pc = p.astype(cdt)
        pv = jax.lax.dot_general(pc, v, (((1,), (0,)), ((), ())), preferred_element_type=f32)
        for ref in pf_refs:  # tile i of this program's share of each weight, while i < its tile count
            t = ref.shape[1]
            mask = jnp.full((BLOCK_S, D), i < t)
            w = plgpu.load(ref.at[prog, jnp.minimum(i, t - 1)], mask=mask, other=0.0, eviction_policy=pf_evict)
            sink = sink + jnp.sum(jax.lax.dot_general(q_rd, w, dims, preferred_element_type=f32))  # 16 equal rows
        return m_new, l * alpha + jnp.sum(pc.astype(f32), axis=1), acc * alpha[:, None] + pv, sink

    init = (jnp.full((16,), -jnp.inf, f32), jnp.zeros((16,), f32), jnp.zeros((16, D), f32), jnp.zeros((), f32))
    m, l, acc, sink = jax.lax.fori_loop(0, (pos + bs - 1) // bs, step, init)
    first = jnp.arange(16) == 0
    m = jnp.max(jnp.where(first, m, -jnp.inf))
    l = jnp.sum(jnp.where(first, l, 0.0))
    acc = jnp.sum(jnp.where(first[:, None], acc, 0.0), axis=0)
    s_new = jnp.sum(q.astype(f32) * k_new.astype(f32)) * scale_log2
    m_all = jnp.maximum(m, s_new)
    alpha = jnp.exp2(m - m_all)
    p_new = jnp.exp2(s_new - m_all)
    acc = acc * alpha + p_new * v_new.astype(f32)
    l = l * alpha + p_new
    o_ref[b, h, :] = (acc / l).astype(o_ref.dtype)
    sink_ref[b, h] = sink
    k_ref[b, h, pos, :] = k_new
    v_ref[b, h, pos, :] = v_new


def pf_attention(qkv, kc, vc, positions, prefetch, *, scale, kv_evict, pf_evict, warps=4, stages=3, interpret=False,
                 vmask="where", read_only=False, bs=BLOCK_S, bias=None):
    """bias None: qkv [B, 3, N, D]. Else qkv is the QKV GEMM's float32 partials [P, B, 3, N, D], summed
    with bias [3, N, D] in the kernel (what XLA's fusion after its split-K GEMM does)."""
    from jax.experimental.pallas import triton as plgpu

    pf = [tiles_of(w) for w in prefetch]
    kernel = functools.partial(_pf_kernel, n_pf=len(pf), scale_log2=scale * LOG2E, kv_evict=kv_evict,
                               pf_evict=pf_evict, vmask=vmask, read_only=read_only, bs=bs,
                               parts=0 if bias is None else qkv.shape[0])
    caches = (jax.ShapeDtypeStruct(kc.shape, kc.dtype), jax.ShapeDtypeStruct(vc.shape, vc.dtype))
    out = pl.pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct((B, N, D), kc.dtype),
                                            jax.ShapeDtypeStruct((B, N), jnp.float32), *caches),
                         grid=(B, N), input_output_aliases={2: 2, 3: 3},  # the caches, updated in place
                         interpret=interpret,
                         compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(
        positions, qkv, kc, vc, *pf, *([] if bias is None else [bias]))
    o, _sink, kc, vc = out
    return o, kc, vc


def make_step(mode: str):
    """One decode step over the 24 layers: (params, x, kcs, vcs, positions) -> (x, kcs, vcs)."""
    scale = 1.0 / D ** 0.5

    def attention(qkv, kc, vc, positions, prefetch):
        if mode == "xla":
            return da.decode_append_reference(qkv, kc, vc, positions, scale=scale)
        if mode == "kernel":
            return da._decode_append_pallas(qkv, kc, vc, positions, scale=scale, block_s=BLOCK_S, splits=1,
                                            num_warps=4, num_stages=3, interpret=False)
        if mode.startswith("v:"):  # v:vmask/bs/warps/stages[/read]: attention variants, no prefetch
            opts = mode[2:].split("/")
            return pf_attention(qkv, kc, vc, positions, (), scale=scale, kv_evict=None, pf_evict=None,
                                vmask=opts[0], bs=int(opts[1]), warps=int(opts[2]), stages=int(opts[3]),
                                read_only=len(opts) > 4)
        _, kv, pf_set, pf = mode.split(":")  # pf:<kv evict>:<which>:<pf evict>
        sets = {"none": 0, "mlp": 3, "all": 4}
        return pf_attention(qkv, kc, vc, positions, prefetch[:sets[pf_set]], scale=scale,
                            kv_evict=None if kv == "normal" else kv, pf_evict=None if pf == "normal" else pf)

    def step(params, x, kcs, vcs, positions):
        kcs, vcs = list(kcs), list(vcs)
        for i, p in enumerate(params):
            h = layer_norm(x, p["g1"], p["b1"])
            if mode.startswith("s:"):  # s:P: QKV as P float32 partials, summed in the attention kernel
                parts = int(mode[2:])
                w = p["w_qkv"].reshape(3, N, D, parts, E // parts)
                qkv = jnp.einsum("bpk,cndpk->pbcnd", h.reshape(B, parts, E // parts), w,
                                 preferred_element_type=jnp.float32)
                o, kcs[i], vcs[i] = pf_attention(qkv, kcs[i], vcs[i], positions, (), scale=scale, kv_evict=None,
                                                 pf_evict=None, bias=p["b_qkv"])
                qkv = None
            else:
                qkv = project(h, p["w_qkv"], 1, p["b_qkv"])  # [B, 3, N, D]
            if qkv is None:
                pass
            elif mode.startswith("layer"):
                o = qkv[:, 0]
            else:
                nxt = params[(i + 1) % L]["w_qkv"]
                o, kcs[i], vcs[i] = attention(qkv, kcs[i], vcs[i], positions,
                                              (p["w_out"], p["w_fc"], p["w_proj"], nxt))
            x = x + project(o, p["w_out"], 2, p["b_out"])
            h = layer_norm(x, p["g2"], p["b2"])
            f = project(h, p["w_fc"], 1, p["b_fc"], jax.nn.gelu)
            x = x + project(f, p["w_proj"], 1, p["b_proj"])
        return x, kcs, vcs

    return step


def make_loop(mode: str, steps: int):
    step = make_step(mode)

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def loop(params, x, kcs, vcs, positions):
        def body(_, c):
            return step(params, *c, positions)
        return jax.lax.fori_loop(0, steps, body, (x, kcs, vcs))

    return loop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="layer_cold,layer_warm,xla,kernel,pf:normal:none:normal,"
                                       "pf:evict_first:none:normal,pf:evict_first:mlp:evict_last,"
                                       "pf:evict_first:all:evict_last,pf:normal:all:evict_last,"
                                       "pf:evict_first:all:normal")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--trace", action="store_true", help="also sum each mode's GPU kernels from a profiler trace")
    ap.add_argument("--top", type=int, default=14, help="kernels listed per traced mode")
    args = ap.parse_args()
    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}")
    key = jax.random.PRNGKey(0)
    cold = make_params(key, L)
    warm = make_params(key, 1)
    x0 = (jax.random.normal(jax.random.PRNGKey(1), (B, E), jnp.float32)).astype(jnp.bfloat16)
    positions = jnp.full((B,), POS, jnp.int32)

    def caches():
        ks = jax.random.split(jax.random.PRNGKey(2), 2 * L)
        mk = lambda k: jax.random.normal(k, (B, N, S, D), jnp.bfloat16)
        return [mk(k) for k in ks[:L]], [mk(k) for k in ks[L:]]

    kcs, vcs = caches()
    reference = None
    results = {}
    for mode in args.modes.split(","):
        params = warm if mode == "layer_warm" else cold
        loop = make_loop(mode, args.steps)
        # correctness: one step from the same caches, against the XLA path (attention modes)
        x1, kcs, vcs = loop(params, x0, kcs, vcs, positions)
        x1 = jax.device_get(x1).astype("float32")
        if not mode.startswith("layer"):
            if reference is None:
                reference = x1
            err = float(((x1 - reference) ** 2).sum() ** 0.5 / ((reference ** 2).sum() ** 0.5))
        else:
            err = float("nan")
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            x, kcs, vcs = loop(params, x0, kcs, vcs, positions)
            x.block_until_ready()
            times.append(time.perf_counter() - t0)
        us_step = 1e6 * statistics.median(times) / args.steps
        row = {"mode": mode, "us_per_step": round(us_step, 1), "us_per_layer": round(us_step / L, 2),
               "rel_l2_vs_first_attention_mode": err}
        if args.trace:
            from profile_decode import summarise, trace_kernels

            def run():
                nonlocal kcs, vcs
                xx, kcs, vcs = loop(params, x0, kcs, vcs, positions)
                xx.block_until_ready()
            t0 = time.perf_counter()
            kernels = trace_kernels(run, f"/tmp/prof_{mode.replace(':', '_')}")
            row["trace"] = summarise(kernels, args.steps * L, time.perf_counter() - t0, top=args.top)
        results[mode] = row
        print(json.dumps(row), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
