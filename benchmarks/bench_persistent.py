"""Experiment toward issue 6's 1.3x: a decode layer's projections as ONE persistent Pallas kernel.

At GPT-2 medium, batch 32, ~1,000 tokens, a decode layer outside the attention is nine XLA kernels
(four split-K GEMMs, five small fusions: ~28-30 us a layer on an H200, BENCHMARKS.md session 12),
each bound by its launch and ramp more than by its bytes (25 MB of weights a layer: ~6 us at the
copy rate). Three designs of separate Pallas GEMMs lost to them (sessions 6, 12, 17). This one runs
the whole layer in one launch: a grid of at most one program per SM (all resident at once), walking
seven phases with a grid-wide barrier between them (an atomic counter the programs spin on):

    N1  rows:  xn = ln1(x)                                  (one program a row)
    G1  gemm:  qkv = xn @ w_qkv.T + b_qkv                   (whole K per item, bf16 out)
    G2  gemm:  po[s] = qkv[:, :E] @ w_o.T, K split in S2    (f32 partials)
    N2  rows:  h = x + sum_s po[s] + b_o; hn = ln2(h)
    G3  gemm:  f = gelu(hn @ w_fc.T + b_fc)                  (whole K, bf16 out)
    G4  gemm:  pp[s] = f @ w_proj.T, K split in S4           (f32 partials)
    R   rows:  y = h + sum_s pp[s] + b_proj

Attention is replaced by the first E columns of the QKV output, as in session 17's bench_linear, so
each GEMM waits for the one before. Timed per layer in a chain of --layers layers with distinct
weights (nothing served from L2), REPEATS passes a dispatch, against:
  - the model's XLA code for the same layer;
  - the same phases as seven launches (no barriers): what the barriers save or cost;
  - the persistent kernel with the barriers left out (wrong results; the phases' own time).
Every variant that should be right is checked first against the XLA layer (relative L2 error) and
the counters must come back zero with no barrier timed out.

The barrier: each program stores its phase's outputs, syncs its threads, adds 1 to the counter
(acquire-release, GPU scope), and spins (atomic reads) until the counter reaches phase * G. Reads of
another program's outputs come after that acquire. The last program to leave resets the counters,
so the buffer is zero between calls. A spin is capped (MAX_SPIN reads): should the programs not all
be resident, the kernel ends with a count of timed-out barriers instead of hanging the GPU.

Run on a CUDA machine from the repository root:
    python3 -P benchmarks/bench_persistent.py [--rows 32] [--layers 8] [--sweep]
Locally (CPU, Pallas interpreter), the seven-launch form at small sizes against the XLA layer:
    python benchmarks/bench_persistent.py --cpu-check
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from energon_jax.models.layers import gelu_new, project  # noqa: E402

REPEATS = 8
MAX_SPIN = 1 << 17
EPS = 1e-5
PHASES = ("N1", "G1", "G2", "N2", "G3", "G4", "R")
LINES = []
_GELU_C = math.sqrt(2.0 / math.pi)


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def case(m, e, f, layers, seed=0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1 + 12 * layers))
    x = randn(next(keys), (m, e), jnp.bfloat16)

    def one():
        return {"ln1": (1 + 0.1 * randn(next(keys), (e,), jnp.bfloat16), randn(next(keys), (e,), jnp.bfloat16)),
                "qkv": (0.02 * randn(next(keys), (3 * e, e), jnp.bfloat16), randn(next(keys), (3 * e,), jnp.bfloat16)),
                "out": (0.02 * randn(next(keys), (e, e), jnp.bfloat16), 0.1 * randn(next(keys), (e,), jnp.bfloat16)),
                "ln2": (1 + 0.1 * randn(next(keys), (e,), jnp.bfloat16), randn(next(keys), (e,), jnp.bfloat16)),
                "fc": (0.02 * randn(next(keys), (f, e), jnp.bfloat16), randn(next(keys), (f,), jnp.bfloat16)),
                "proj": (0.02 * randn(next(keys), (e, f), jnp.bfloat16), 0.1 * randn(next(keys), (e,), jnp.bfloat16))}
    return x, [one() for _ in range(layers)]


def _layer_norm_xla(x, scale, bias):
    xf = x.astype(jnp.float32)  # models/layers.LayerNorm's two-pass form
    mean = xf.mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + EPS)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def layer_xla(x, p):
    e = x.shape[1]
    qkv = project(_layer_norm_xla(x, *p["ln1"]), p["qkv"][0], 1, p["qkv"][1])
    x = x + project(qkv[:, :e], p["out"][0], 1, p["out"][1])
    h = project(_layer_norm_xla(x, *p["ln2"]), p["fc"][0], 1, p["fc"][1], gelu_new)
    return x + project(h, p["proj"][0], 1, p["proj"][1])


# ---------------------------------------------------------------------------------------------
# The kernel


def _gelu(y):
    return 0.5 * y * (1.0 + jnp.tanh(_GELU_C * (y + 0.044715 * y * y * y)))


def _ln_row(v, g_ref, b_ref):
    mean = jnp.mean(v)
    c = v - mean
    rstd = jax.lax.rsqrt(jnp.mean(c * c) + EPS)
    return c * rstd * g_ref[...].astype(jnp.float32) + b_ref[...].astype(jnp.float32)


def _kernel(x_ref, g1_ref, be1_ref, wq_ref, bq_ref, wo_ref, bo_ref, g2_ref, be2_ref, wf_ref, bf_ref, wp_ref,
            bp_ref, *bufs, cfg, phases, sync, interpret):
    # the workspace's inputs, then y (a fresh output) and the workspace again (outputs aliased to those inputs)
    n_ws = (len(bufs) - 1) // 2
    y_ref, (xn_ref, qkv_ref, po_ref, h_ref, hn_ref, f_ref, pp_ref, cnt_ref) = bufs[n_ws], bufs[n_ws + 1:]
    f32 = jnp.float32
    m, e = x_ref.shape
    nf = wf_ref.shape[0]
    g = cfg["programs"]
    pid = pl.program_id(0)
    plgpu = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

    def rows(body):
        @pl.when(pid < m)
        def _():
            body(pid)

    def gemm(a_ref, w_ref, n, k, bn, bk, splits, swap, epilogue):
        tiles = n // bn
        items = tiles * splits
        ksteps = k // splits // bk

        def item(t, carry):
            it = pid + t * g

            @pl.when(it < items)
            def _():
                j, s = it // splits, it % splits
                cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

                def step(c, acc):
                    ks = pl.ds(pl.multiple_of((s * ksteps + c) * bk, bk), bk)
                    a = a_ref[:, ks]
                    w = w_ref[cols, ks]
                    if swap:
                        return acc + jax.lax.dot_general(w, a, (((1,), (1,)), ((), ())), preferred_element_type=f32).T
                    return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)

                acc = jax.lax.fori_loop(0, ksteps, step, jnp.zeros((m, bn), f32))
                epilogue(acc, j, s, cols)
            return carry

        if cfg.get("clamp") and items <= g:
            # one item a program, no loop and no branch around the K loop: the programs past the last
            # item redo it and store the same values
            it = jnp.minimum(pid, items - 1)
            j, s = it // splits, it % splits
            cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

            def step1(c, acc):
                ks = pl.ds(pl.multiple_of((s * ksteps + c) * bk, bk), bk)
                w = w_ref[cols, ks]
                a = a_ref[:, ks]
                if swap:
                    return acc + jax.lax.dot_general(w, a, (((1,), (1,)), ((), ())), preferred_element_type=f32).T
                return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)

            epilogue(jax.lax.fori_loop(0, ksteps, step1, jnp.zeros((m, bn), f32)), j, s, cols)
            return
        jax.lax.fori_loop(0, pl.cdiv(items, g), item, 0)

    def n1():
        def body(r):
            xn_ref[r, :] = _ln_row(x_ref[r, :].astype(f32), g1_ref, be1_ref).astype(xn_ref.dtype)
        rows(body)

    def g1():
        bn, bk, sw = cfg["G1"]

        def epi(acc, j, s, cols):
            qkv_ref[:, cols] = (acc + bq_ref[cols].astype(f32)[None, :]).astype(qkv_ref.dtype)
        gemm(xn_ref, wq_ref, 3 * e, e, bn, bk, 1, sw, epi)

    def g2():
        bn, bk, splits, sw = cfg["G2"]

        def epi(acc, j, s, cols):
            po_ref[s, :, cols] = acc
        gemm(qkv_ref, wo_ref, e, e, bn, bk, splits, sw, epi)

    def n2():
        def body(r):
            v = x_ref[r, :].astype(f32) + jnp.sum(po_ref[:, r, :], axis=0) + bo_ref[...].astype(f32)
            hv = v.astype(h_ref.dtype)
            h_ref[r, :] = hv
            hn_ref[r, :] = _ln_row(hv.astype(f32), g2_ref, be2_ref).astype(hn_ref.dtype)
        rows(body)

    def g3():
        bn, bk, sw = cfg["G3"]

        def epi(acc, j, s, cols):
            f_ref[:, cols] = _gelu(acc + bf_ref[cols].astype(f32)[None, :]).astype(f_ref.dtype)
        gemm(hn_ref, wf_ref, nf, e, bn, bk, 1, sw, epi)

    def g4():
        bn, bk, splits, sw = cfg["G4"]

        def epi(acc, j, s, cols):
            pp_ref[s, :, cols] = acc
        gemm(f_ref, wp_ref, e, nf, bn, bk, splits, sw, epi)

    def r():
        def body(i):
            v = h_ref[i, :].astype(f32) + jnp.sum(pp_ref[:, i, :], axis=0) + bp_ref[...].astype(f32)
            y_ref[i, :] = v.astype(y_ref.dtype)
        rows(body)

    def barrier(k):
        """Wait until every program has finished phase k (1-based count of barriers so far)."""
        target = k * g
        plgpu.debug_barrier()
        plgpu.atomic_add(cnt_ref, (0,), 1)

        def cond(c):
            return (c[0] < target) & (c[1] < MAX_SPIN)

        def body(c):
            return plgpu.atomic_add(cnt_ref, (0,), 0), c[1] + 1

        v, _ = jax.lax.while_loop(cond, body, (plgpu.atomic_add(cnt_ref, (0,), 0), 0))

        @pl.when(v < target)
        def _():
            plgpu.atomic_add(cnt_ref, (1,), 1)  # timed out: counted, and the results are wrong
        plgpu.debug_barrier()

    run = {"N1": n1, "G1": g1, "G2": g2, "N2": n2, "G3": g3, "G4": g4, "R": r}
    for i, ph in enumerate(phases):
        if i and sync and not interpret:
            barrier(i)
        run[ph]()
    if sync and not interpret and len(phases) > 1:
        plgpu.debug_barrier()
        ticket = plgpu.atomic_add(cnt_ref, (2,), 1)

        @pl.when(ticket == g - 1)  # everyone is past every barrier: put the counters back
        def _():
            plgpu.atomic_xchg(cnt_ref, (0,), 0)
            plgpu.atomic_xchg(cnt_ref, (2,), 0)


def workspace(m, e, f, cfg):
    bf, f32 = jnp.bfloat16, jnp.float32
    return (jnp.zeros((m, e), bf), jnp.zeros((m, 3 * e), bf),
            jnp.zeros((cfg["G2"][2], m, e), f32), jnp.zeros((m, e), bf), jnp.zeros((m, e), bf),
            jnp.zeros((m, f), bf), jnp.zeros((cfg["G4"][2], m, e), f32), jnp.zeros((4,), jnp.int32))


def layer_pallas(x, p, ws, cfg, *, launches="one", sync=True, interpret=False, phases=PHASES):
    """One layer through the kernel: launches "one" (persistent, barriers unless sync=False) or
    "seven" (one launch a phase; y is the last launch's). ws: the workspace (workspace()), threaded
    from call to call, updated in place. Returns (y, ws)."""
    weights = (*p["ln1"], *p["qkv"], *p["out"], *p["ln2"], *p["fc"], *p["proj"])
    groups = [phases] if launches == "one" else [(ph,) for ph in phases]
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=cfg["warps"], num_stages=cfg["stages"])
    nw = 1 + len(weights)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), *(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in ws))
    for grp in groups:
        kernel = functools.partial(_kernel, cfg=cfg, phases=grp, sync=sync, interpret=interpret)
        y, *ws = pl.pallas_call(kernel, out_shape=out_shape, grid=(cfg["programs"],),
                                input_output_aliases={nw + i: 1 + i for i in range(len(ws))},
                                interpret=interpret, **extra)(x, *weights, *ws)
        ws = tuple(ws)
    return y, ws


# ---------------------------------------------------------------------------------------------
# Checks and timing


def rel_l2(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def default_cfg(programs):
    # G1/G3: (block_n, block_k, swap); G2/G4: (block_n, block_k, splits, swap)
    return {"programs": programs, "warps": 4, "stages": 3, "G1": (32, 128, True), "G2": (32, 128, 4, True),
            "G3": (32, 128, True), "G4": (32, 128, 4, True)}


def cpu_check():
    m, e, f = 16, 128, 512
    cfg = {"programs": 24, "warps": 4, "stages": 3, "G1": (16, 64, False), "G2": (16, 32, 2, True),
           "G3": (32, 64, True), "G4": (16, 64, 4, False)}
    x, params = case(m, e, f, 2, seed=1)
    ok = True
    for c in (cfg, dict(cfg, clamp=True)):
        ws = workspace(m, e, f, c)
        y_ref, y = x, x
        for p in params:
            y_ref = layer_xla(y_ref, p)
            y, ws = layer_pallas(y, p, ws, c, launches="seven", interpret=True)
        err = rel_l2(y, y_ref)
        say(f"cpu check (interpreter, seven launches, 2 layers, M{m} E{e} F{f}, {label(c)}): rel L2 {err:.2e}")
        ok &= err < 2e-2
    return ok


def time_us(fn, *args, inner=3, repeats=7):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="profile the chain of each form and list its kernels per layer (GPU time against wall)")
    parser.add_argument("--launch-cost", action="store_true",
                        help="time empty Pallas launches in the chain, with and without the workspace and weights")
    parser.add_argument("--probe", action="store_true",
                        help="time each phase alone and GEMM-phase settings, one launch, no barriers (timing only)")
    args = parser.parse_args()
    if args.cpu_check:
        sys.exit(0 if cpu_check() else 1)
    dev = jax.devices()[0]
    say(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if jax.default_backend() != "gpu":
        sys.exit("benchmarks/bench_persistent.py needs a CUDA GPU (or --cpu-check)")
    sms = int(getattr(dev, "core_count", 0) or 132)
    say(f"SMs: {sms}")
    m, e = args.rows, args.embed
    f = 4 * e
    wbytes = 2 * (3 * e * e + e * e + 2 * e * f)
    x, params = case(m, e, f, args.layers)

    # checks: one layer, each form that should be right against XLA
    y_ref = jax.jit(layer_xla)(x, params[0])
    ok = True

    def check(cfg, launches):
        nonlocal ok
        try:
            fn = jax.jit(functools.partial(layer_pallas, cfg=cfg, launches=launches))
            y, ws = fn(x, params[0], workspace(m, e, f, cfg))
            y, ws = fn(x, params[0], ws)  # a second call on the returned workspace: counters reset?
            err = rel_l2(y, y_ref)
            cnt = np.asarray(ws[-1])
            good = err < 2e-2 and not np.isnan(np.asarray(y, np.float32)).any() and cnt[0] == 0 and cnt[2] == 0 \
                and cnt[1] == 0
            say(f"check {launches} launch(es), {label(cfg)}: rel L2 {err:.2e}, counters {cnt.tolist()}"
                f" -> {'ok' if good else 'FAIL'}")
            ok &= good
            return good
        except Exception as ex:  # noqa: BLE001 - report and go on
            say(f"check {launches}, {label(cfg)} failed: {type(ex).__name__}: {str(ex)[:400]}")
            ok = False
            return False

    def timed(name, layer_fn, with_ws, cfg=None):
        def passes(x, ps, ws):
            def body(i, carry):
                xc, w = carry
                for p in ps:
                    if with_ws:
                        xc, w = layer_fn(xc, p, w)
                    else:
                        xc = layer_fn(xc, p)
                return xc, w
            return jax.lax.fori_loop(0, REPEATS, body, (x, ws))
        try:
            ws = workspace(m, e, f, cfg) if with_ws else ()
            per = time_us(jax.jit(passes), x, params, ws) / len(params) / REPEATS
        except Exception as ex:  # noqa: BLE001
            say(f"{name} failed: {type(ex).__name__}: {str(ex)[:400]}")
            return None
        say(f"M{m} {name}: {per:.2f} us per layer ({wbytes / per / 1e6:.2f} TB/s of weights)")
        return per

    cfg = default_cfg(sms)
    if args.probe:
        probe(cfg, sms, timed, check)
        return
    if args.trace:
        trace(x, params, m, e, f, dict(cfg, stages=4))
        return
    if args.launch_cost:
        launch_cost(x, params, m, e, f, cfg, timed)
        return
    check(cfg, "seven")
    good_one = check(cfg, "one")
    base = timed("XLA", layer_xla, False)
    timed(f"seven launches, {label(cfg)}", functools.partial(layer_pallas, cfg=cfg, launches="seven"), True, cfg)
    timed(f"one launch, no barriers (wrong results), {label(cfg)}",
          functools.partial(layer_pallas, cfg=cfg, sync=False), True, cfg)
    best_per = None
    if good_one:
        best_per = timed(f"one launch, {label(cfg)}", functools.partial(layer_pallas, cfg=cfg), True, cfg)
    if args.sweep and good_one:
        best = cfg
        trials = [dict(cfg, programs=sms // 2), dict(cfg, warps=8), dict(cfg, stages=4), dict(cfg, stages=2),
                  dict(cfg, G1=(32, 256, True), G3=(32, 256, True), G2=(32, 256, 2, True), G4=(32, 256, 4, True)),
                  dict(cfg, G1=(16, 128, False), G3=(16, 128, False), G2=(16, 128, 4, False), G4=(16, 128, 4, False)),
                  dict(cfg, G1=(64, 128, True), G3=(64, 128, True), G2=(32, 128, 8, True), G4=(32, 256, 8, True)),
                  dict(cfg, G2=(32, 128, 8, True), G4=(32, 128, 8, True))]
        for trial in trials:
            if not check(trial, "one"):
                continue
            per = timed(f"one launch, {label(trial)}", functools.partial(layer_pallas, cfg=trial), True, trial)
            if per is not None and (best_per is None or per < best_per):
                best, best_per = trial, per
        say(f"best: {label(best)}: {best_per:.2f} us per layer against XLA's {base:.2f}")
        timed("XLA again", layer_xla, False)
        timed(f"one launch again, {label(best)}", functools.partial(layer_pallas, cfg=best), True, best)
    say(f"\nall checks ok: {ok}")
    if os.environ.get("OUT"):
        with io.open(os.path.join(os.environ["OUT"], "persistent.txt"), "w") as fh:
            fh.write("\n".join(LINES) + "\n")


def _empty_kernel(*refs):
    del refs


def launch_cost(x, params, m, e, f, cfg, timed):
    """What one empty launch a layer costs in the chain, by what it is passed: x only; x and the
    layer's 12 weights; x and the workspace aliased in place (as layer_pallas); x and the workspace
    as fresh outputs."""
    from jax.experimental.pallas import triton as plgpu

    extra = {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}
    g = cfg["programs"]

    def xs_only(xc, p, ws):
        return pl.pallas_call(_empty_kernel, out_shape=jax.ShapeDtypeStruct(xc.shape, xc.dtype), grid=(g,),
                              **extra)(xc), ws

    def with_weights(xc, p, ws):
        weights = (*p["ln1"], *p["qkv"], *p["out"], *p["ln2"], *p["fc"], *p["proj"])
        return pl.pallas_call(_empty_kernel, out_shape=jax.ShapeDtypeStruct(xc.shape, xc.dtype), grid=(g,),
                              **extra)(xc, *weights), ws

    def aliased(xc, p, ws):
        shapes = (jax.ShapeDtypeStruct(xc.shape, xc.dtype), *(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in ws))
        y, *ws = pl.pallas_call(_empty_kernel, out_shape=shapes, grid=(g,),
                                input_output_aliases={1 + i: 1 + i for i in range(len(ws))}, **extra)(xc, *ws)
        return y, tuple(ws)

    def fresh(xc, p, ws):
        shapes = (jax.ShapeDtypeStruct(xc.shape, xc.dtype), *(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in ws))
        y, *_ = pl.pallas_call(_empty_kernel, out_shape=shapes, grid=(g,), **extra)(xc)
        return y, ws

    for name, fn in (("x only", xs_only), ("x + 12 weights", with_weights), ("x + workspace aliased", aliased),
                     ("x + workspace as fresh outputs", fresh)):
        for grid_note in ("",):
            timed(f"empty launch, {name}{grid_note}", fn, True, cfg)
    timed("empty launch as layer_pallas passes it", functools.partial(layer_pallas, cfg=cfg, sync=False, phases=()),
          True, cfg)


def trace(x, params, m, e, f, cfg):
    """Each form's chain under the profiler: its kernels per layer, GPU-busy time against wall."""
    import tempfile

    from profile_decode import summarise, trace_kernels

    forms = {"XLA": (layer_xla, False),
             "empty launch": (functools.partial(layer_pallas, cfg=cfg, sync=False, phases=()), True),
             "one launch, no barriers": (functools.partial(layer_pallas, cfg=cfg, sync=False), True),
             "one launch": (functools.partial(layer_pallas, cfg=cfg), True),
             "seven launches": (functools.partial(layer_pallas, cfg=cfg, launches="seven"), True)}
    for name, (fn, with_ws) in forms.items():
        def passes(x, ps, ws, fn=fn, with_ws=with_ws):
            def body(i, carry):
                xc, w = carry
                for p in ps:
                    xc, w = fn(xc, p, w) if with_ws else (fn(xc, p), w)
                return xc, w
            return jax.lax.fori_loop(0, REPEATS, body, (x, ws))
        run = jax.jit(passes)
        ws = workspace(m, e, f, cfg) if with_ws else ()
        jax.block_until_ready(run(x, params, ws))
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, params, ws))
        wall = time.perf_counter() - t0
        say(f"--- {name}: kernels per layer (a chain of {len(params)} layers x {REPEATS} passes)")
        kernels = trace_kernels(lambda: jax.block_until_ready(run(x, params, ws)), tempfile.mkdtemp())
        out = summarise(kernels, len(params) * REPEATS, wall, top=12)
        say(f"{name}: {out}")


def probe(cfg, sms, timed, check):
    """Where the kernel's time goes: each phase alone in one launch without barriers (wrong results,
    timing only), an empty launch, then the GEMM phases under settings that put more bytes in flight
    per SM."""
    cfg = dict(cfg, stages=4)
    check(dict(cfg, clamp=True), "one")
    for phases in ((), *((ph,) for ph in PHASES)):
        timed(f"phases {'+'.join(phases) or 'none'} alone, {label(cfg)}",
              functools.partial(layer_pallas, cfg=cfg, sync=False, phases=phases), True, cfg)
    for g1, g3, g4, warps, stages, programs, clamp in (
            ((32, 128, True), (32, 128, True), (32, 128, 4, True), 4, 4, sms, True),
            ((32, 256, True), (32, 256, True), (32, 256, 4, True), 4, 4, sms, True),
            ((32, 256, True), (32, 256, True), (32, 256, 4, True), 8, 4, sms, True),
            ((32, 512, True), (32, 512, True), (32, 512, 4, True), 4, 2, sms, True),
            ((32, 512, True), (32, 512, True), (32, 512, 4, True), 8, 2, sms, True),
            ((32, 1024, True), (32, 1024, True), (32, 1024, 4, True), 8, 1, sms, True),
            ((32, 1024, True), (32, 1024, True), (32, 1024, 4, True), 4, 1, sms, True),
            ((16, 256, True), (16, 256, True), (16, 256, 8, True), 4, 4, 2 * sms, False),
            ((16, 512, True), (16, 512, True), (16, 512, 8, True), 4, 2, 2 * sms, False),
            ((32, 256, True), (32, 256, True), (32, 256, 4, True), 4, 4, 2 * sms, False),
            ((64, 256, True), (64, 256, True), (32, 256, 4, True), 8, 4, sms, False)):
        trial = dict(cfg, G1=g1, G3=g3, G4=g4, warps=warps, stages=stages, programs=programs, clamp=clamp)
        for ph in ("G1", "G3", "G4"):
            timed(f"{ph} alone, {label(trial)}", functools.partial(layer_pallas, cfg=trial, sync=False, phases=(ph,)),
                  True, trial)


def label(cfg):
    return (f"{'clamped ' if cfg.get('clamp') else ''}G{cfg['programs']} w{cfg['warps']} s{cfg['stages']} qkv{cfg['G1']} out{cfg['G2']} fc{cfg['G3']}"
            f" proj{cfg['G4']}").replace(" ", " ").replace("True", "T").replace("False", "F")


if __name__ == "__main__":
    main()
