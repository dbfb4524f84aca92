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


def layer(carry, p, tiles):
    """tiles: {kind: fused_linear keyword arguments} for the projections fused; XLA (models/layers.project
    and the model's two-pass layer norm) for the others. carry: (x, counters)."""
    x, cnt = carry

    def lin(name, a, cnt, **kw):
        if name in tiles:
            t = dict(tiles[name])
            threaded = t.pop("threaded", True)
            if threaded:
                return fl.fused_linear(a, *p[name], impl="triton", counters=cnt, **kw, **t)
            return fl.fused_linear(a, *p[name], impl="triton", **kw, **t), cnt
        r = kw.get("residual")
        if kw.get("norm") is not None:
            a = _layer_norm_xla(a, *kw["norm"])
        y = project(a, p[name][0], 1, p[name][1], gelu_new if kw.get("activation") else None)
        return (y if r is None else r + y), cnt

    qkv, cnt = lin("qkv", x, cnt, norm=p["ln1"])
    x, cnt = lin("out", qkv[:, :EMBED], cnt, residual=x)
    h, cnt = lin("fc", x, cnt, norm=p["ln2"], activation="gelu_new")
    x, cnt = lin("proj", h, cnt, residual=x)
    return x, cnt


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
    c0 = fl.counters()
    fused = jax.jit(lambda x, c: layer((x, c), p, every)[0])(x, c0)
    ref = jax.jit(lambda x, c: layer((x, c), p, {})[0])(x, c0)
    o, rf = np.asarray(fused, np.float32), np.asarray(ref, np.float32)
    rel = float(np.linalg.norm(o - rf) / np.linalg.norm(rf))
    ok &= rel < 2e-2
    say(f"check M{m} layer fused vs XLA: rel L2 {rel:.2e} -> {'ok' if rel < 2e-2 else 'FAIL'}")
    return ok


def label(t):
    return ", ".join(f"{k} {v}" for k, v in t.items()) or "defaults"


def sweep_configs(kind):
    k_dim = MLP if kind == "proj" else EMBED
    out = []
    for bn, bk, sp, w, st, swap in ((64, 128, 4, 4, 3, False), (64, 128, 4, 4, 3, True), (32, 128, 8, 4, 3, False),
                                    (64, 64, 8, 4, 3, False), (128, 128, 2, 4, 3, True), (64, 256, 2, 4, 2, False),
                                    (32, 256, 4, 2, 3, False), (64, 128, 8, 4, 3, True), (128, 64, 4, 4, 3, True),
                                    (32, 64, 16, 2, 3, False), (64, 64, 16, 4, 2, False), (64, 128, 1, 4, 3, False),
                                    (16, 128, 8, 2, 3, False)):
        if k_dim % (bk * sp) == 0:
            out.append(dict(block_n=bn, block_k=bk, splits=sp, num_warps=w, num_stages=st, swap=swap))
    return out


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

    def timed(m, name, x, params, tiles):
        def passes(x, ps, c):
            body = lambda i, xc: functools.reduce(lambda xc, p: layer(xc, p, tiles), ps, xc)
            return jax.lax.fori_loop(0, REPEATS, body, (x, c))
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
        timed(m, "all four fused, defaults", x, params, {k: {} for k in KINDS})
        timed(m, "all four fused, defaults, a zeroed counter buffer per call", x, params,
              {k: {"threaded": False} for k in KINDS})
        if not args.sweep or m != rows_list[0]:
            continue
        best = {}
        for kind in KINDS:
            for t in sweep_configs(kind):
                per = timed(m, f"only {kind} fused, {label(t)}", x, params, {kind: t})
                if per is not None and per < best.get(kind, (base, None))[0]:
                    best[kind] = (per, t)
        say(f"M{m} best per projection: " + "; ".join(f"{k}: {label(t)} ({base - per:.2f} us saved)"
                                                      for k, (per, t) in best.items()))
        timed(m, "XLA again", x, params, {})
        if best:
            timed(m, "each ahead fused at its best", x, params, {k: t for k, (_, t) in best.items()})
    say(f"\nall checks ok: {ok}")
    if os.environ.get("OUT"):
        with io.open(os.path.join(os.environ["OUT"], "linear.txt"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
