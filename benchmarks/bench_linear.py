"""GPU check and timing of kernels/linear.py (a decode step's projections with their layer norms,
bias, GELU and residual adds folded in) against the model's XLA code, at GPT-2 medium's shapes.

Run on a CUDA machine from the repository root, with the package installed:
    python3 -P benchmarks/bench_linear.py [--rows 32,16,64] [--sweep] [--layers 8]
A layer here is a GPT-2 block's four projections with attention replaced by the first E columns of
the QKV output (each GEMM waits for the one before). It is timed per layer in a chain of --layers
layers with distinct weights (8 x 25 MB: nothing is served from L2, as in a real step), REPEATS
passes a dispatch, GPU time as inside a decode step. --sweep times each projection alone fused under
several settings (the rest XLA), then all four at each one's best. Writes $OUT/linear.txt too.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import sys
import time

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from energon_jax.kernels import linear as fl  # noqa: E402
from energon_jax.models.layers import gelu_new, project  # noqa: E402

EMBED, MLP = 1024, 4096  # GPT-2 medium
REPEATS = 8
KINDS = ("qkv", "out", "fc", "proj")
LINES = []


def say(line=""):
    print(line, flush=True)
    LINES.append(line)


def randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def case(m, layers, seed=0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1 + 10 * layers))
    x = randn(next(keys), (m, EMBED), jnp.bfloat16)
    e, f = EMBED, MLP

    def one():
        return {"ln1": (1 + 0.1 * randn(next(keys), (e,), jnp.bfloat16), randn(next(keys), (e,), jnp.bfloat16)),
                "qkv": (0.02 * randn(next(keys), (3 * e, e), jnp.bfloat16), randn(next(keys), (3 * e,), jnp.bfloat16)),
                "out": (0.02 * randn(next(keys), (e, e), jnp.bfloat16), jnp.zeros((e,), jnp.bfloat16)),
                "ln2": (1 + 0.1 * randn(next(keys), (e,), jnp.bfloat16), randn(next(keys), (e,), jnp.bfloat16)),
                "fc": (0.02 * randn(next(keys), (f, e), jnp.bfloat16), randn(next(keys), (f,), jnp.bfloat16)),
                "proj": (0.02 * randn(next(keys), (e, f), jnp.bfloat16), jnp.zeros((e,), jnp.bfloat16))}
    return x, [one() for _ in range(layers)]


def _layer_norm_xla(x, scale, bias):
    xf = x.astype(jnp.float32)  # models/layers.LayerNorm's two-pass form
    mean = xf.mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def layer(carry, p, tiles, stats=True):
    """One layer: XLA (models/layers.project and the model's two-pass layer norm) when tiles is empty,
    else the four projections through fused_linear, tiles[kind] their keyword arguments. stats: the
    norms take their rows' statistics from the kernel that produced their input (out and proj emit
    them) instead of walking the rows. carry: (x, x's tile stats, counters)."""
    x, st, cnt = carry
    if not tiles:
        qkv = project(_layer_norm_xla(x, *p["ln1"]), p["qkv"][0], 1, p["qkv"][1])
        x = x + project(qkv[:, :EMBED], p["out"][0], 1, p["out"][1])
        h = project(_layer_norm_xla(x, *p["ln2"]), p["fc"][0], 1, p["fc"][1], gelu_new)
        return x + project(h, p["proj"][0], 1, p["proj"][1]), st, cnt

    def lin(kind, a, **kw):
        return fl.fused_linear(a, *p[kind], impl="triton", counters=cnt, **kw, **tiles[kind])

    qkv, cnt = lin("qkv", x, norm=p["ln1"], stats=st if stats else None)
    x, st_mid, cnt = lin("out", qkv[:, :EMBED], residual=x, emit_stats=True)
    h, cnt = lin("fc", x, norm=p["ln2"], stats=st_mid if stats else None, activation="gelu_new")
    x, st, cnt = lin("proj", h, residual=x, emit_stats=True)
    return x, st, cnt


def first_stats(x, tiles):
    """The stats of the chain's input, as the proj kernel of tiles would emit them."""
    return fl.tile_stats(x, EMBED // tiles["proj"].get("block_n", fl.DEFAULT_BLOCK_N))


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


def check(m):
    """Each fused projection against fused_linear_reference, and a fused layer against the XLA one;
    the counters come back zero."""
    x, params = case(m, 1, seed=1)
    p = params[0]
    ok = True
    r = randn(jax.random.PRNGKey(3), (m, EMBED), jnp.bfloat16)
    h = randn(jax.random.PRNGKey(4), (m, MLP), jnp.bfloat16)
    for name, a, kw in (("qkv", x, {"norm": p["ln1"]}), ("out", x, {"residual": r}),
                        ("fc", x, {"norm": p["ln2"], "activation": "gelu_new"}), ("proj", h, {"residual": r})):
        for splits in (1, 4):
            out, cnt = jax.jit(lambda a, w, b, c: fl.fused_linear(a, w, b, impl="triton", counters=c, splits=splits,
                                                                  **kw))(a, *p[name], fl.counters())
            ref = fl.fused_linear_reference(a, *p[name], kw.get("norm"), kw.get("residual"),
                                            activation=kw.get("activation"))
            o, rf = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            rel = float(np.linalg.norm(o - rf) / np.linalg.norm(rf))
            good = rel < 1e-2 and not np.isnan(o).any() and int(jnp.abs(cnt).sum()) == 0
            ok &= good
            say(f"check M{m} {name} splits {splits}: rel L2 {rel:.2e}, counters zero {int(jnp.abs(cnt).sum()) == 0}"
                f" -> {'ok' if good else 'FAIL'}")
    every = {k: {} for k in KINDS}
    ref = jax.jit(lambda x: layer((x, None, None), p, {})[0])(x)
    for stats in (False, True):
        fused, st, cnt = jax.jit(lambda x, c: layer((x, first_stats(x, every), c), p, every, stats))(x, fl.counters())
        o, rf = np.asarray(fused, np.float32), np.asarray(ref, np.float32)
        rel = float(np.linalg.norm(o - rf) / np.linalg.norm(rf))
        st_err = max(float(jnp.max(jnp.abs(a - b) / (1e-3 + jnp.abs(b)))) for a, b in zip(st, fl.tile_stats(fused, 16)))
        good = rel < 2e-2 and st_err < 1e-3 and int(jnp.abs(cnt).sum()) == 0
        ok &= good
        say(f"check M{m} layer fused (stats {stats}) vs XLA: rel L2 {rel:.2e}, emitted stats rel err {st_err:.1e}"
            f" -> {'ok' if good else 'FAIL'}")
    return ok


def label(tiles):
    return "; ".join(f"{k} " + ",".join(f"{a}={v}" for a, v in t.items()) for k, t in tiles.items() if t) or "defaults"


SWEEP = {  # (block_n, block_k, splits, num_warps, num_stages, swap) per projection
    "qkv": ((64, 256, 2, 4, 2, False), (64, 256, 4, 4, 2, False), (128, 128, 2, 4, 3, True), (32, 256, 4, 2, 3, False),
            (64, 128, 8, 4, 3, True)),
    "out": ((64, 128, 4, 4, 3, True), (32, 256, 4, 2, 3, False), (64, 64, 8, 4, 3, False), (16, 128, 8, 2, 3, False),
            (32, 128, 8, 4, 3, False)),
    "fc": ((64, 256, 2, 4, 2, False), (64, 256, 4, 4, 2, False), (128, 128, 4, 4, 3, True), (64, 128, 8, 4, 3, True),
           (32, 256, 4, 2, 3, False)),
    "proj": ((16, 128, 8, 2, 3, False), (64, 128, 8, 4, 3, True), (32, 256, 4, 2, 3, False), (64, 256, 8, 4, 2, False),
             (32, 512, 8, 4, 2, False)),
}


def as_kwargs(c):
    return dict(zip(("block_n", "block_k", "splits", "num_warps", "num_stages", "swap"), c))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,16,64")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    say(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if jax.default_backend() != "gpu":
        sys.exit("benchmarks/bench_linear.py needs a CUDA GPU")
    rows_list = [int(r) for r in args.rows.split(",")]
    ok = all([check(m) for m in rows_list])
    wbytes = 2 * (3 * EMBED * EMBED + EMBED * EMBED + 2 * EMBED * MLP)

    def timed(m, name, x, params, tiles, stats=True):
        def passes(x, ps, c):
            body = lambda i, xc: functools.reduce(lambda xc, p: layer(xc, p, tiles, stats), ps, xc)
            return jax.lax.fori_loop(0, REPEATS, body, (x, first_stats(x, tiles) if tiles else None, c))
        try:
            per = time_us(jax.jit(passes), x, params, fl.counters()) / len(params) / REPEATS
        except Exception as e:  # noqa: BLE001 - a setting that does not compile: report, go on
            say(f"M{m} {name} failed: {type(e).__name__}: {str(e)[:300]}")
            return None
        say(f"M{m} {name}: {per:.2f} us per layer ({wbytes / per / 1e6:.2f} TB/s of weights)")
        return per

    for m in rows_list:
        x, params = case(m, args.layers)
        base = timed(m, "XLA", x, params, {})
        defaults = {k: {} for k in KINDS}
        timed(m, "all four fused, defaults, norms walk their rows", x, params, defaults, stats=False)
        best_per = timed(m, "all four fused, defaults", x, params, defaults)
        if not args.sweep or m != rows_list[0]:
            continue
        best = dict(defaults)  # coordinate descent: each projection's settings in turn, the others at their best
        for kind in KINDS:
            for c in SWEEP[kind]:
                trial = dict(best, **{kind: as_kwargs(c)})
                per = timed(m, f"fused, {label(trial)}", x, params, trial)
                if per is not None and (best_per is None or per < best_per):
                    best, best_per = trial, per
        say(f"M{m} best: {label(best)}: {best_per:.2f} us per layer against XLA's {base:.2f}")
        timed(m, "XLA again", x, params, {})
        timed(m, f"fused again, {label(best)}", x, params, best)
    say(f"\nall checks ok: {ok}")
    if os.environ.get("OUT"):
        with io.open(os.path.join(os.environ["OUT"], "linear.txt"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
