"""Peak host memory of `energon convert` on a random GPT-2 (default ~0.5 GB of float32 weights).

    python benchmarks/convert_memory.py [--n-embd 1024 --n-layer 6 --vocab 50304] [--buffer-mb 64]

Writes a random Hugging Face GPT-2 folder (safetensors written from numpy: no torch init), converts it
in a fresh subprocess and prints that process's peak RSS, its RSS before converting (interpreter,
jax, orbax imported) and the model size. Streaming conversion keeps the difference near the largest
tensor plus the write buffer, not the model size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs in the child: peak RSS after every import the conversion needs, then after the conversion.
_CHILD = """
import json, resource, sys
def peak_rss():  # VmHWM: this process image's own peak (ru_maxrss can carry the forking parent's)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import jax, orbax.checkpoint.experimental.v1, tqdm
import energon_jax.cli, energon_jax.convert.orbax_io, energon_jax.models.gpt2
jax.config.update("jax_platforms", "cpu"); jax.devices()
base = peak_rss()
rc = energon_jax.cli.main(sys.argv[1:])
print("MEMORY " + json.dumps({"rc": rc, "base_rss": base, "peak_rss": peak_rss()}))
"""


def write_random_gpt2(folder: Path, *, n_embd: int, n_layer: int, vocab: int, n_positions: int = 1024,
                      n_head: int = 16, seed: int = 0) -> int:
    """A GPT-2 folder (config.json + model.safetensors) of random float32 weights; returns its bytes."""
    from safetensors.numpy import save_file

    from energon_jax.config import GPT2Config
    from energon_jax.convert.gpt2 import NAME_MAP, config_to_hf

    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    rng = np.random.default_rng(seed)
    tensors = {}
    for hf_name, _, shape_fn, _, _ in NAME_MAP:
        for i in range(n_layer) if "{i}" in hf_name else [None]:
            name = "transformer." + (hf_name.format(i=i) if i is not None else hf_name)
            tensors[name] = rng.standard_normal(shape_fn(cfg), dtype=np.float32) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    save_file(tensors, str(folder / "model.safetensors"))
    return sum(t.nbytes for t in tensors.values())


def measure_convert(src: Path, out: Path, *extra: str) -> dict:
    """Convert in a fresh interpreter; returns rc, base_rss, peak_rss (bytes) and the child's stderr."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, "convert", str(src), str(out), "--quiet", *extra],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"conversion failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return {**json.loads(lines[-1][len("MEMORY "):]), "stdout": proc.stdout, "stderr": proc.stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--buffer-mb", default="64")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = write_random_gpt2(Path(tmp) / "hf", n_embd=args.n_embd, n_layer=args.n_layer, vocab=args.vocab)
        largest = args.vocab * args.n_embd * 4
        m = measure_convert(Path(tmp) / "hf", Path(tmp) / "out", "--buffer-mb", args.buffer_mb)
    mib = 2**20
    print(m["stdout"].splitlines()[0])
    print(f"model {model_bytes / mib:.0f} MiB (largest tensor {largest / mib:.0f} MiB, buffer {args.buffer_mb} MiB): "
          f"peak RSS {m['peak_rss'] / mib:.0f} MiB, before converting {m['base_rss'] / mib:.0f} MiB, "
          f"conversion added {(m['peak_rss'] - m['base_rss']) / mib:.0f} MiB "
          f"({(m['peak_rss'] - m['base_rss']) / model_bytes:.2f} x model)")


if __name__ == "__main__":
    main()
