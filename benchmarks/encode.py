"""Bert-base encoding throughput: energon-jax's packed (padding-free) path vs Hugging Face.

Workload: bert-base shapes with random weights, 1,024 sequences with lengths uniform in
[16, 512] and random token ids, mean pooling. Ours: bf16, sequences sorted by length into
packed chunks of at most --max-tokens tokens, one compiled program per chunk shape, timed
after a warm-up call has compiled every shape (end to end: packing on the host, device
work, pooled embeddings back as numpy). Hugging Face `BertModel`: fp16, SDPA attention,
padded batches of 64, in input order (what a plain loop does) and sorted by length.

Run on a GPU machine from the repository root (energon_jax importable, with kernels/ and
convert/ as energon_jax.kernels / energon_jax.convert):
    python3 benchmarks/encode.py [--configs xla:16384,triton:16384]
Prints a markdown table; also writes it to --out (default $OUT/encode.txt when OUT is set).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# This script's folder holds benchmarks/bench_kernels.py, which would shadow the `kernels` package
# that transformers probes for on import: keep the folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # noqa: E402

PEAK_BF16_FLOPS = 788e12  # bf16 8192^3 matmul through JAX on the H100 (shared/DEVICE.md)
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def model_flops(lengths, hidden=768, layers=12, inter=3072) -> float:
    """Matmul FLOPs of the encoder over the real tokens only (dense layers + attention)."""
    tokens = float(np.sum(lengths))
    dense = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 2 * 2 * layers * hidden * float(np.sum(np.square(np.asarray(lengths, np.float64))))
    return dense + attention


def make_checkpoint(folder: str):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    BertModel(cfg).to(torch.bfloat16).save_pretrained(folder)


def time_calls(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def device_only_seconds(model, seqs, reps) -> float:
    """Median time of the compiled steps alone over pre-packed chunks already on the device."""
    import jax

    from energon_jax.engine.packing import pack
    from energon_jax.engine.steps import bucket
    from energon_jax.models.bert import PackedAttention

    chunks = pack(seqs, [None] * len(seqs), max_tokens=model.max_tokens_per_chunk)
    args = [(jax.device_put((c.tokens, c.positions, c.token_types, c.segments, c.cu_seqlens)),
             PackedAttention(bucket(c.max_len, cap=model.max_seq_len), model.attention_impl)) for c in chunks]

    def run():
        outs = [model._step(model.params, *a, attention=att, head="mean") for a, att in args]
        jax.block_until_ready(outs)

    run()
    return statistics.median(time_calls(run, reps))


def bench_ours(folder, seqs, configs, reps):
    import jax

    import energon_jax as ej

    model = ej.load_sharded_model(folder, dtype="bfloat16")
    rows, embs = [], {}
    for impl, max_tokens in configs:
        model.attention_impl = impl
        model.max_tokens_per_chunk = max_tokens
        before = model.compile_counts["bert"]
        t0 = time.perf_counter()
        embs[(impl, max_tokens)] = model.encode(seqs, pooling="mean")  # warm-up: compiles every chunk shape
        warm = time.perf_counter() - t0
        compiles = model.compile_counts["bert"] - before
        times = time_calls(lambda: model.encode(seqs, pooling="mean"), reps)  # result is numpy: synchronised
        recompiles = model.compile_counts["bert"] - before - compiles
        stats = model.last_stats
        rows.append(dict(name=f"energon-jax packed, bf16, attention={impl}, chunks <= {max_tokens} tokens",
                         times=times, stats=stats, compiles=compiles, recompiles=recompiles, warm=warm,
                         device_s=device_only_seconds(model, seqs, reps)))
    return rows, embs, jax.devices()[0].device_kind


def bench_hf(folder, seqs, batch, reps, sort):
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(folder, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    order = np.argsort([len(s) for s in seqs], kind="stable") if sort else np.arange(len(seqs))
    batches = []
    for start in range(0, len(seqs), batch):
        idx = order[start: start + batch]
        t = max(len(seqs[i]) for i in idx)
        ids = np.zeros((len(idx), t), np.int64)
        mask = np.zeros((len(idx), t), np.int64)
        for j, i in enumerate(idx):
            ids[j, : len(seqs[i])] = seqs[i]
            mask[j, : len(seqs[i])] = 1
        batches.append((idx, torch.from_numpy(ids), torch.from_numpy(mask)))
    out = np.empty((len(seqs), 768), np.float32)

    @torch.inference_mode()
    def run():
        for idx, ids, mask in batches:  # host -> device per batch, as a serving loop would
            ids, mask = ids.cuda(non_blocking=True), mask.cuda(non_blocking=True)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            out[idx] = ((h * m).sum(1) / m.sum(1)).float().cpu().numpy()
        torch.cuda.synchronize()

    run()  # warm-up
    times = time_calls(run, reps)
    computed = sum(ids.numel() for _, ids, _ in batches)
    name = f"HF BertModel fp16 SDPA, padded batches of {batch}, {'sorted by length' if sort else 'input order'}"
    return dict(name=name, times=times, computed=computed), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=1024)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--configs", default="xla:65536,triton:16384,triton:32768,triton:65536",
                    help="attention implementation (xla, auto, triton) : token budget of one packed chunk, ...")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "encode.txt") if os.environ.get("OUT") else None)
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_len, args.max_len + 1, size=args.num)
    # int32 arrays, as HF gets ready-made padded tensors: neither side is timed converting Python lists
    seqs = [rng.integers(1000, 30000, size=n).astype(np.int32) for n in lengths]
    real = int(lengths.sum())
    flops = model_flops(lengths)
    say(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.num} sequences, lengths U[{args.min_len}, {args.max_len}], {real} real tokens; "
        f"model FLOPs over real tokens {flops / 1e12:.1f} TFLOP")

    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(folder)
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
        ours, embs, device = bench_ours(folder, seqs, configs, args.reps)
        hf_rows, hf_emb = [], None
        if not args.skip_hf:
            for sort in (False, True):
                row, hf_emb = bench_hf(folder, seqs, args.hf_batch, args.reps, sort)
                hf_rows.append(row)
    say(f"device: {device}")
    say()
    say("| path | seq/s | real tokens/s | median s (of %d) | computed / real tokens | compiles | "
        "TFLOP/s (real) | of bf16 peak |" % args.reps)
    say("|---|---|---|---|---|---|---|---|")
    for row in ours + hf_rows:
        med = statistics.median(row["times"])
        computed = row["stats"].computed_tokens if "stats" in row else row["computed"]
        compiles = f"{row['compiles']} (+{row['recompiles']} after warm-up)" if "compiles" in row else "-"
        say(f"| {row['name']} | {args.num / med:,.0f} | {real / med:,.0f} | {med:.4f} | {computed / real:.3f} | "
            f"{compiles} | {flops / med / 1e12:.0f} | {flops / med / PEAK_BF16_FLOPS:.1%} |")
    say()
    for row in ours:
        s = row["stats"]
        say(f"{row['name']}: {s.chunks} chunks, shapes (tokens, seq slots, max-len bucket) "
            f"{sorted(set(s.shapes))}; warm-up call (compiles) {row['warm']:.1f} s; compiled steps alone "
            f"(pre-packed inputs on device) {row['device_s']:.4f} s = {real / row['device_s']:,.0f} real tokens/s")
    if hf_emb is not None:
        for (impl, max_tokens), emb in embs.items():
            cos = np.sum(emb * hf_emb, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(hf_emb, axis=1)
            say(f"check attention={impl}, chunks <= {max_tokens}: cosine(ours bf16, HF fp16) min {cos.min():.5f}, mean {cos.mean():.5f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(LINES) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
