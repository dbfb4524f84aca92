"""`energon convert` and `energon inspect`: the checkpoint verbs (registered by energon_jax.cli)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from energon_jax.convert.hf_files import DTYPES


def _cpu_only() -> None:
    """Conversion and inspection never need an accelerator: keep JAX off it (no GPU memory grabbed)."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def _convert(args) -> int:
    from energon_jax.convert.orbax_io import convert_checkpoint

    _cpu_only()
    try:  # SIGINT / SIGTERM are handled inside: the temporary output folder is removed
        summary = convert_checkpoint(args.src, args.out, dtype=args.dtype, tp=args.tp, pp=args.pp, force=args.force,
                                     buffer_bytes=int(args.buffer_mb * 2**20), progress=not args.quiet)
    except FileExistsError as e:  # energon_jax.cli reports ValueError-like errors only
        print(f"energon convert: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        if getattr(e, "out_written", None) is not None:  # the signal came as OUT was renamed into place
            print(f"energon convert: {args.out} written; interrupted afterwards", file=sys.stderr)
        else:
            print(f"energon convert: interrupted; {args.out} not written", file=sys.stderr)
        raise
    print(summary.line())
    return 0


def _format_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def _inspect(args) -> int:
    from energon_jax.convert.orbax_io import describe

    _cpu_only()
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    layout = info["layout"]
    lines = [
        f"path:          {info['path']} ({'Hugging Face folder' if info['kind'] == 'huggingface' else 'energon convert output'})",
        f"architecture:  {info['architecture']}",
        "dims:          " + ", ".join(f"{k}={v}" for k, v in info["dims"].items()),
        f"dtype:         {info['dtype'] or 'no floating weights'}" + (
            "" if info["default_dtype"] == info["dtype"] else
            f" (a convert or load without --dtype takes {info['default_dtype']}: {info['default_dtype_from']})"),
        f"max_seq_len:   {info['max_seq_len']} (a load's default)",
        f"parameters:    {info['num_params']:,} ({info['num_params'] / 1e6:.2f}M)",
        f"bytes:         {_format_bytes(info['bytes'])}; on disk {_format_bytes(info['bytes_on_disk'])}",
        "layout:        " + (f"written for tp={layout['tp']} pp={layout['pp']} (loads on any mesh)" if layout
                             else "none recorded (split at load time)"),
    ]
    if info["kind"] == "converted":
        lines.append(f"converter:     {info['converter_version']}")
        lines.append("source:        " + info["source"]["folder"] + "; sha256 " +
                     ", ".join(f"{name}={digest[:12]}" for name, digest in info["source"]["sha256"].items()))
    else:
        lines.append("files:         " + ", ".join(info["files"]))
    print("\n".join(lines))
    return 0


def _positive_mb(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):  # inf passed "> 0", then int(inf * 2**20) raised
        raise argparse.ArgumentTypeError(f"--buffer-mb={text} must be a finite number > 0")
    return value


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="Hugging Face folder -> sharded Orbax checkpoint (loads on any mesh)",
                       description="Convert a Hugging Face GPT-2 / Bert folder to an Orbax checkpoint plus "
                                   "energon_config.json and the tokenizer files, streaming one tensor at a time.")
    c.add_argument("src", help="Hugging Face model folder (config.json + safetensors or pytorch_model.bin) "
                                 "or preset name (e.g. tiny-gpt2-pydoc)")
    c.add_argument("out", help="output folder (written to a temporary folder beside it, renamed at the end)")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast floating tensors (default: the source's, config.json's dtype, else the weights'; "
                        "`energon inspect SRC` shows it)")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is written for (recorded)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is written for (recorded)")
    c.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier `energon convert` output or an empty folder")
    c.add_argument("--buffer-mb", type=_positive_mb, default=64.0,
                   help="host memory buffered between writes, beyond the tensor being converted (default 64)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)

    i = sub.add_parser("inspect", help="architecture, dims, dtype, parameters, bytes and layout of a model folder")
    i.add_argument("path", help="Hugging Face folder, `energon convert` output or preset name (e.g. tiny-gpt2-pydoc)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_inspect)
