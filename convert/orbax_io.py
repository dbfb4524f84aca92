"""Converted checkpoints: Hugging Face folder -> Orbax checkpoint, and back onto any mesh.

On-disk layout of a converted folder OUT:

    OUT/energon_config.json   architecture, HF config, dtype, layout, parameter manifest, source hashes
    OUT/checkpoint/           one Orbax checkpoint (OCDBT); per-layer tensors are separate leaves
    OUT/config.json, tokenizer files   copied from the source folder
    OUT/sentence_bert_config.json      too, where the source has one: its max_seq_length is a Bert
                                       load's default max_seq_len and its do_lower_case lower-cases
                                       texts before tokenizing, as for the Hugging Face folder

Why per-layer leaves: the model stacks layers on a leading "layers" axis, but a stacked
tensor is as large as all its layers together. Writing layer leaves lets the converter hold
one tensor (plus a small write buffer) at a time, through Orbax's partial save (each call adds
leaves to one pending checkpoint; `finalize` commits it). At load every layer leaf is restored
straight into the devices of the pipeline stage that owns it, already split over "tensor", and
the stage's layers are stacked on each device: no host ever holds more than one device's shard.
Over several processes each one reads only the layers of the stages it holds devices of.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import mmap
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from energon_jax.convert.hf_files import (DTYPES, FLOATING_ONLY, CheckpointDtype, CheckpointError, SafetensorsFile,
                                          TensorSource, check_floating_weights, checkpoint_dtype, is_floating,
                                          read_config, read_json_object)

FORMAT = "energon-jax-orbax"
# Version 2: GPT-2's projection weights are stored [out, in] (models/layers.project); a version-1
# GPT-2 folder holds them [in, out] and must be converted again. Bert's layout did not change.
FORMAT_VERSION = 2
_STILL_READABLE = {1: {"bert"}}  # older version -> model types whose tensors it wrote as now
CONFIG_FILE = "energon_config.json"  # the marker loading.CONVERTED_MARKER looks for
CHECKPOINT_DIR = "checkpoint"
# Files carried over beside the checkpoint so the tokenizer loads from OUT as from the HF folder.
# sentence_bert_config.json: read back at load for the default max_seq_len (Architecture.default_max_seq_len)
# and do_lower_case (Architecture.lower_case).
_CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                  "sentence_bert_config.json")
_LAYER_KEY = "layer_{:04d}"
# Storage chunks of at most this size: a device reading its slice reads little more than the slice.
_CHUNK_BYTES = 16 << 20


# ---------------------------------------------------------------------------------- architectures
@dataclasses.dataclass(frozen=True)
class Architecture:
    """What conversion and loading need to know about one model family (model_type in config.json).

    converter: module with `iter_params(source, cfg)` (name map, transforms, shape asserts) and
        `mapped_names(tensor names, cfg)` (the checkpoint tensors that name map reads).
    config: (HF config dict, tensor names, file it came from) -> validated config dataclass (some
        families read optional heads off the tensor names); a converted folder rebuilds it from its
        recorded HF config.
    layout_sizes: cfg -> {"heads": .., "mlp": .., "layers": ..}, the dims split over tensor / stage.
    module: (cfg, param dtype, mesh or None) -> (flax module, example call args) whose params are the
        target tree on that mesh (embedding tables may be padded to split evenly; None: unpadded).
    model: (cfg, params, mesh, tokenizer, max_seq_len, source) -> the user-facing model object.
    default_max_seq_len: (folder, cfg) -> the max_seq_len a load takes when given none; it reads the
        folder's own files (a converted folder carries them), raising CheckpointError on a bad one.
    lower_case: folder -> whether texts are lower-cased before the tokenizer sees them (Bert: a
        sentence-transformers folder's do_lower_case), from the folder's own files as above.
    """

    converter: str
    config: Callable
    layout_sizes: Callable
    module: Callable
    model: Callable
    default_max_seq_len: Callable = lambda folder, cfg: cfg.max_seq_len
    lower_case: Callable = lambda folder: False


def _gpt2_config(hf, names, where):
    from energon_jax.convert.gpt2 import config_from_hf

    return config_from_hf(hf, where)


def _gpt2_module(cfg, dtype, mesh):
    from energon_jax.models.gpt2 import GPT2
    from energon_jax.runtime.sharding import table_multiple

    tokens = jnp.zeros((1, 1), jnp.int32)
    return GPT2(cfg, param_dtype=dtype, table_multiple=1 if mesh is None else table_multiple(mesh)), (tokens, tokens)


def _gpt2_model(cfg, params, mesh, tokenizer, max_seq_len, source):
    from energon_jax.engine.gpt import GPTModel

    return GPTModel(cfg, params, mesh, tokenizer, max_seq_len=max_seq_len, source=source)


def _bert_config(hf, names, where):
    from energon_jax.convert.bert import config_from_hf

    return config_from_hf(hf, names, where)


def _bert_module(cfg, dtype, mesh):
    from energon_jax.engine.bert import example_args
    from energon_jax.models.bert import Bert
    from energon_jax.runtime.sharding import table_multiple

    return Bert(cfg, dtype, table_multiple=1 if mesh is None else table_multiple(mesh)), example_args()


def _bert_model(cfg, params, mesh, tokenizer, max_seq_len, source):
    from energon_jax.engine.bert import BertModel

    return BertModel(cfg, params, mesh, tokenizer, max_seq_len=max_seq_len, source=source)


def _bert_default_max_seq_len(folder, cfg):
    from energon_jax.convert.bert import default_max_seq_len

    return default_max_seq_len(folder, cfg)


def _bert_lower_case(folder):
    from energon_jax.convert.bert import sentence_lower_case

    return sentence_lower_case(folder)


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("energon_jax.convert.gpt2", _gpt2_config,
                         lambda c: {"heads": c.n_head, "mlp": c.mlp_dim, "layers": c.n_layer},
                         _gpt2_module, _gpt2_model),
    "bert": Architecture("energon_jax.convert.bert", _bert_config,
                         lambda c: {"heads": c.num_attention_heads, "mlp": c.intermediate_size,
                                    "layers": c.num_hidden_layers},
                         _bert_module, _bert_model, _bert_default_max_seq_len, _bert_lower_case),
}


def architecture(model_type, where) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{where}: model_type={model_type!r} cannot be converted; supported: "
                              f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def _converter(arch: Architecture):
    return importlib.import_module(arch.converter)


def mapped_tensors(arch: Architecture, source: TensorSource, cfg) -> list[str]:
    """The tensors of `source` that the architecture's name map reads (buffers and unused heads left out)."""
    return [n for n in _converter(arch).mapped_names(source.keys(), cfg) if n in source]


def source_dtype(arch: Architecture, hf: dict, source: TensorSource, cfg) -> CheckpointDtype:
    """The dtype a conversion (and a load) of the Hugging Face folder takes without --dtype, and why."""
    return checkpoint_dtype(hf, source, mapped_tensors(arch, source, cfg))


def _key(path: tuple) -> str:
    return "/".join(path)


# ---------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    out: Path
    architecture: str
    num_params: int
    num_tensors: int
    bytes: int
    dtype: str
    seconds: float
    # Why `dtype`, where no --dtype chose it and the weights were not all of it (else None).
    dtype_from: str | None = None

    def line(self) -> str:
        why = f" (from {self.dtype_from})" if self.dtype_from else ""
        return (f"converted {self.architecture}: {self.num_params / 1e6:.2f}M params, {self.num_tensors} tensors, "
                f"{self.bytes / 2**20:.1f} MiB {self.dtype}{why} in {self.seconds:.1f} s -> {self.out}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _drop_mapped_pages(source: TensorSource) -> None:
    """Drop this process's mapped pages of the safetensors files read so far.

    Pages of a memory-mapped file count in this process's RSS once touched, so streaming a
    whole file would show the model size in RSS even though no copy is held. MADV_DONTNEED on
    a read-only file mapping only drops them from this process (the page cache keeps them).
    """
    for st in {id(s): s for s in source._where.values() if isinstance(s, SafetensorsFile)}.values():
        m = getattr(st, "_mmap", None)
        if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def _check_layout(arch: Architecture, cfg, tp: int, pp: int) -> None:
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name}={value!r} must be a positive int")
    sizes = arch.layout_sizes(cfg)
    for name, flag, value in (("layers", "pp", pp), ("heads", "tp", tp), ("mlp", "tp", tp)):
        if sizes[name] % value:
            raise ValueError(f"--{flag}={value} does not divide the model's {sizes[name]} "
                             f"{dict(layers='layers', heads='attention heads', mlp='MLP width')[name]}; "
                             f"choose among {[d for d in range(1, sizes[name] + 1) if sizes[name] % d == 0]}")


def _temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_converted_folder(folder: Path) -> bool:
    """Whether `folder` holds an energon_config.json of this converter's FORMAT (any version)."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _check_replaceable(out: Path) -> None:
    """--force replaces OUT as a whole, so it takes only an earlier `energon convert` output or an
    empty folder: `energon convert SRC ~/models --force` must not delete ~/models."""
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError:
            empty = False
        if empty or _is_converted_folder(out):
            return
        what = f"a folder that is not an `energon convert` output (it has no {CONFIG_FILE} of format {FORMAT!r})"
    else:
        what = "a file"
    raise FileExistsError(f"{out}: exists and is {what}; --force replaces only an earlier `energon convert` "
                          f"output or an empty folder: remove {out} yourself or choose another OUT")


def _check_out_parent(out: Path) -> None:
    """Before any work: OUT's folder (or, where it is missing and will be made, its nearest existing
    ancestor) is a writable folder. The error names OUT and that folder, not the temp folder that
    would have failed later."""
    parent = out.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    missing = "" if existing == parent else f" (missing; it would be made in {existing})"
    if not existing.is_dir():
        raise NotADirectoryError(f"OUT {out} cannot be written: {existing} is not a folder"
                                 + ("" if existing == parent else f" (OUT's parent {parent} would be made in it)"))
    probe = existing / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:  # a real write: os.access says yes to root even on read-only file systems and /sys
        probe.mkdir()
    except OSError as e:
        raise PermissionError(f"OUT {out} cannot be written: its parent folder {parent}{missing} is not writable "
                              f"({e.strerror or e}); choose another OUT") from None
    probe.rmdir()


def _remove(path: Path) -> None:
    """Remove a folder tree, a file, or a symlink (not what it points to: rmtree refuses links)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temp_dirs(out: Path) -> None:
    """Temp folders, and OUTs moved aside by --force, of earlier runs that were killed (SIGKILL
    leaves no chance to clean up)."""
    for p in [*out.parent.glob(f".{out.name}.tmp-*-*"), *out.parent.glob(f".{out.name}.old-*-*")]:
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(p)
        except PermissionError:  # alive, someone else's
            pass


class _DeferredSignals:
    """SIGINT / SIGTERM during conversion stop it at the next tensor boundary, not mid-write.

    Orbax writes from background threads; unwinding the main thread mid-save would delete the
    temporary folder while those threads still write into it. A second signal interrupts at once,
    except inside `held()`.
    """

    def __init__(self):
        self.received = None
        self.raised = False
        self._holding = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and not self._holding:
            self._raise(signum)
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def held(self):
        """Every signal waits until the block is done (steps that must all happen or none)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def check(self):
        if self.received is not None:
            self._raise(self.received)

    def _raise(self, signum):
        self.raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received is not None and not self.raised:  # came after the last check: deliver it now
            previous = self._previous.get(self.received)
            # Run here, not re-sent: what it raises (KeyboardInterrupt from Python's default handler)
            # then comes from this `with`, where convert_checkpoint can tell whether OUT was written.
            if callable(previous):
                previous(self.received, None)
            elif previous == signal.SIG_DFL:  # SIGTERM's: it would end the process without a word
                self._raise(self.received)
            elif previous is None:  # a handler installed outside Python
                os.kill(os.getpid(), self.received)


def convert_checkpoint(src, out, *, dtype: str | None = None, tp: int = 1, pp: int = 1, force: bool = False,
                       buffer_bytes: int = 64 << 20, progress: bool = True) -> ConvertSummary:
    """Convert a Hugging Face folder `src` to a converted folder `out` (see the module docstring).

    dtype: None takes the checkpoint's (`source_dtype`: config.json's, else the weights'); else one
    of DTYPES. Every weight is cast to it; one that is not floating point (a quantized checkpoint's
    int8 matrix) is refused before anything is written (hf_files.check_floating_weights).
    tp, pp: the layout the checkpoint is written for (recorded; it loads on any mesh).
    buffer_bytes: converted tensors are buffered up to this size between Orbax writes, so peak
    host memory is about the largest tensor plus this buffer, whatever the model size.
    Writes into a temporary folder beside `out` and renames it at the end; on any failure
    (or KeyboardInterrupt / SystemExit) the temporary folder is removed and `out` is untouched.
    A signal that comes while `out` is renamed into place (or after) still interrupts the caller,
    with `out` complete: the KeyboardInterrupt / SystemExit then has `out_written` = `out`.
    """
    t0 = time.perf_counter()
    # Absolute paths: Orbax's partial save refuses relative ones.
    from energon_jax.loading import resolve_path

    # SRC as generate and serve take it: a folder or a preset name (a file gets told to pass its folder).
    src, out = resolve_path(src), Path(out).expanduser().absolute()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not supported; accepted: {list(DTYPES)}")
    # Before the exists check: OUT is replaced as a whole, so an OUT that is or holds SRC would delete it.
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"OUT {out} {'is' if out.resolve() == src.resolve() else 'holds'} SRC {src}; replacing "
                         f"it would delete the source: choose an OUT outside SRC's folders")
    if (src / CONFIG_FILE).is_file():  # else "no weight file", about a folder that holds a whole model
        raise ValueError(f"SRC {src} is an `energon convert` output already ({CONFIG_FILE}): load it as it is, "
                         "or convert the Hugging Face folder it came from")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output already exists; pass --force to replace it")
    if out.exists():
        _check_replaceable(out)
    _check_out_parent(out)
    hf = read_config(src)
    arch = architecture(hf.get("model_type"), src / "config.json")
    source = TensorSource(src)
    cfg = arch.config(hf, source.keys(), src / "config.json")
    _check_layout(arch, cfg, tp, pp)
    arch.default_max_seq_len(src, cfg)  # a bad sentence_bert_config.json fails here, not at every load
    check_floating_weights(source, mapped_tensors(arch, source, cfg))
    chosen = source_dtype(arch, hf, source, cfg)
    out_dtype = dtype or chosen.name

    # The module's own parameter tree says which tensors exist, their shapes and which are per-layer.
    from energon_jax.loading import param_specs

    module, example = arch.module(cfg, jnp.float32, None)
    _, shapes = param_specs(module, example)
    expected = {_key(tuple(k.key for k in path)): tuple(shape) for path, shape in
                jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    num_params = sum(int(np.prod(s)) for s in expected.values())

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out)
    tmp = _temp_dir_for(out)
    tmp.mkdir()
    written = False
    try:
        with _DeferredSignals() as signals:
            manifest, nbytes, ntensors = _write_params(
                source, cfg, arch, expected, tmp / CHECKPOINT_DIR, out_dtype, buffer_bytes, num_params, progress,
                signals.check)
            hashed = [src / "config.json", *src.glob("*.index.json"), *source.files,
                      *[p for p in [src / "sentence_bert_config.json"] if p.is_file()]]
            meta = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "converter_version": _converter_version(),
                "architecture": hf["model_type"],
                "hf_config": hf,
                "dims": dataclasses.asdict(cfg),
                "dtype": out_dtype,
                "layout": {"tp": tp, "pp": pp},
                "num_params": num_params,
                "bytes": nbytes,
                "params": manifest,
                "source": {"folder": str(src.resolve()), "tensors": source.keys(),
                           "sha256": {p.name: _sha256(p) for p in hashed}},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
            for name in _CARRIED_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            signals.check()
            with signals.held():  # both renames of a --force replace, or none: never no OUT at all
                old = _replace(tmp, out)
            written = True
            if old is not None:
                _remove(old)
    except BaseException as e:
        if written:
            e.out_written = out
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertSummary(out, hf["model_type"], num_params, ntensors, nbytes, out_dtype, time.perf_counter() - t0,
                          None if dtype or chosen.plain else f"{chosen.reason}; stored {chosen.stored}")


def _converter_version() -> str:
    import energon_jax

    return f"energon-jax {energon_jax.__version__} / format {FORMAT_VERSION}"


def _write_params(source, cfg, arch, expected, ckpt_dir, out_dtype, buffer_bytes, num_params, progress,
                  check_interrupt):
    """Stream `iter_params` into one Orbax checkpoint, every tensor cast to `out_dtype`; returns
    (manifest, bytes, tensors)."""
    import orbax.checkpoint.experimental.v1 as ocp
    from orbax.checkpoint.experimental.v1 import partial as orbax_partial
    from tqdm import tqdm

    manifest: dict[str, dict] = {}
    buffer, buffered = {}, 0
    nbytes = ntensors = 0
    # Random / trained weights hardly compress; plain storage is faster and its size predictable.
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    # Each save below is synchronous and nothing mutates the arrays, so Orbax's defensive copy of
    # host arrays would only double the peak (the option exists from orbax 0.12.8; older ones copy).
    memory = getattr(ctx, "memory", None)
    if hasattr(memory, "deepcopy_host_arrays"):
        memory.deepcopy_host_arrays = False
    bar = tqdm(total=num_params, unit="param", unit_scale=True, desc="convert", disable=not progress,
               dynamic_ncols=True)

    def flush():
        nonlocal buffer, buffered
        if buffer:
            with ctx:
                orbax_partial.save(ckpt_dir, buffer)
            buffer, buffered = {}, 0
            _drop_mapped_pages(source)

    with bar:
        for path, layer, arr in _converter(arch).iter_params(source, cfg):
            check_interrupt()
            key = _key(path)
            if key not in expected:
                raise CheckpointError(f"converter produced {key!r}, which the {cfg.model_type} module does not have")
            want = expected[key][1:] if layer is not None else expected[key]
            if tuple(arr.shape) != want:
                raise CheckpointError(f"tensor for {key!r}{'' if layer is None else f' layer {layer}'} has shape "
                                      f"{tuple(arr.shape)} after conversion, the model expects {want}")
            if not is_floating(arr.dtype):  # check_floating_weights refused such sources: a converter's own doing
                raise CheckpointError(f"converter produced {key!r} of dtype {np.dtype(arr.dtype).name}; "
                                      f"{FLOATING_ONLY}")
            arr = arr.astype(out_dtype, copy=False)
            leaf_path = path if layer is None else (*path, _LAYER_KEY.format(layer))
            node = buffer
            for k in leaf_path[:-1]:
                node = node.setdefault(k, {})
            node[leaf_path[-1]] = arr
            entry = manifest.setdefault(key, {"shape": list(expected[key]), "dtype": np.dtype(arr.dtype).name,
                                              "layers": [] if layer is not None else None})
            if layer is not None:
                entry["layers"].append(layer)
            buffered += arr.nbytes
            nbytes += arr.nbytes
            ntensors += 1
            bar.update(arr.size)
            if buffered >= buffer_bytes:
                flush()
        flush()
    check_interrupt()
    missing = sorted(set(expected) - set(manifest))
    if missing:
        raise CheckpointError(f"{source.folder}: no tensors for {missing[:5]}")
    for key, entry in manifest.items():
        if entry["layers"] is not None:
            entry["layers"] = len(entry["layers"])
    orbax_partial.finalize(ckpt_dir)
    return manifest, nbytes, ntensors


def _replace(tmp: Path, out: Path) -> Path | None:
    """Rename tmp -> out; an existing out (allowed by --force) is moved aside first, and where to
    is returned for the caller to remove (None when there was none)."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return None
    trash = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash, out)  # the old OUT back where it was
        raise
    return trash


# ---------------------------------------------------------------------------------- reading
def read_converted_config(folder) -> dict:
    """energon_config.json of a converted folder, checked for format, version and the keys a load reads."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {folder} is not a folder written by `energon convert`")
    meta = read_json_object(path, "converted-folder metadata")
    version = meta.get("format_version")
    readable = version == FORMAT_VERSION or meta.get("architecture") in _STILL_READABLE.get(version, ())
    if meta.get("format") != FORMAT or not readable:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {version!r} "
                              f"is not readable by this version (reads {FORMAT!r} version {FORMAT_VERSION}); "
                              f"convert the Hugging Face checkpoint again with `energon convert`")
    # what the load reads: a damaged file was a raw KeyError ('hf_config') or numpy's TypeError
    # about a dtype, and float64 loaded as float32 without a word
    again = "; convert the Hugging Face checkpoint again with `energon convert`"
    for key, kind in (("architecture", str), ("hf_config", dict), ("params", dict), ("source", dict),
                      ("dtype", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is {'missing' if key not in meta else repr(meta[key])[:60]}; "
                                  f"it must be a JSON {'string' if kind is str else 'object'}{again}")
    if not isinstance(meta["source"].get("tensors"), list):
        raise CheckpointError(f"{path}: 'source' lacks its list of 'tensors'{again}")
    if meta["dtype"] not in (*DTYPES, "float64"):  # float64: older converters stored a float64 checkpoint so
        raise CheckpointError(f"{path}: dtype={meta['dtype']!r} is not a weight dtype; accepted: "
                              f"{[*DTYPES, 'float64']}{again}")
    return meta


def _layer_shardings(target: NamedSharding, num_layers: int) -> list[NamedSharding]:
    """Sharding of each layer's leaf: the devices of the mesh slice owning that layer, split the same way.

    `target` shards a stacked [L, ...] array; its first spec entry names the mesh axis that splits
    layers (the pipeline "stage") or None (every device holds every layer).
    """
    spec = tuple(target.spec)
    layer_axis, rest = (spec[0] if spec else None), PartitionSpec(*spec[1:])
    mesh = target.mesh
    if layer_axis is None:
        return [NamedSharding(mesh, rest)] * num_layers
    if not isinstance(layer_axis, str):
        raise NotImplementedError(f"layers split over several mesh axes {layer_axis!r}; only one axis is supported")
    groups = mesh.shape[layer_axis]
    if groups == 1:  # the whole mesh owns every layer
        return [NamedSharding(mesh, rest)] * num_layers
    if num_layers % groups:
        raise ValueError(f"{num_layers} layers cannot be split evenly over {groups} devices of mesh axis "
                         f"{layer_axis!r}")
    i = mesh.axis_names.index(layer_axis)
    names = tuple(n for n in mesh.axis_names if n != layer_axis)
    sub = [NamedSharding(Mesh(np.take(mesh.devices, g, axis=i), names), rest) for g in range(groups)]
    per_group = num_layers // groups
    return [sub[layer // per_group] for layer in range(num_layers)]


def _stack_on_devices(layers: dict[int, jax.Array], target: NamedSharding, shape: tuple) -> jax.Array:
    """Per-layer arrays (already on their stage's devices) -> one stacked array in `target`.

    `layers` needs only the layers of the stages this process holds devices of (the others, on
    other processes, are never read here)."""
    by_device = {layer: {s.device: s for s in a.addressable_shards} for layer, a in layers.items()}
    pieces = []
    for device, index in target.addressable_devices_indices_map(shape).items():
        wanted = range(*index[0].indices(shape[0]))
        shards = [by_device[layer][device] for layer in wanted]
        for s in shards:  # the layer sharding was derived from target, so the slices must agree
            assert s.index == tuple(index[1:]), (s.index, index)
        # Through the host, one device shard at a time: a device-side stack would compile one small
        # program per (shape, device), which costs more than the copy (measured on CPU).
        pieces.append(jax.device_put(np.stack([np.asarray(s.data) for s in shards]), device))
    return jax.make_array_from_single_device_arrays(shape, target, pieces)


def _fits(stored: tuple, wanted: tuple, per_layer: bool) -> bool:
    """The stored shape is the model's, or (a table, not per-layer) the model's with zero rows appended."""
    if stored == wanted:
        return True
    return (not per_layer and len(stored) == len(wanted) >= 1 and stored[1:] == wanted[1:]
            and stored[0] < wanted[0])


def _placeholder(ocp, folder):
    """Orbax's marker for a leaf not to read. Only a load across hosts with pp > 1 needs it, so one
    host never touches it, whatever the Orbax release (pyproject allows 0.12.4, which may lack it)."""
    marker = getattr(ocp, "PLACEHOLDER", None)
    if marker is None:
        raise CheckpointError(f"{folder}: loading pipeline stages that lie on other hosts needs an Orbax that "
                              "exports orbax.checkpoint.experimental.v1.PLACEHOLDER (0.12.8 does); upgrade "
                              "orbax-checkpoint, or load the Hugging Face folder")
    return marker


def load_converted(folder, *, mesh: Mesh, dtype=None, max_seq_len=None):
    """Load a folder written by `energon convert` onto `mesh` (any tp/pp/dp, whatever the recorded layout).

    Each array is restored by Orbax straight into its target NamedSharding (layer leaves into the
    devices of their pipeline stage); dtype None keeps the stored dtype, else arrays are cast as
    they are read. Returns the same model object as loading the Hugging Face folder.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    from energon_jax.loading import check_max_seq_len, param_shardings, param_specs
    from energon_jax.runtime.mesh import check_layout
    from energon_jax.tokenizer import Tokenizer

    folder = Path(folder).expanduser().absolute()  # Orbax refuses relative checkpoint paths
    meta = read_converted_config(folder)
    arch = architecture(meta["architecture"], folder / CONFIG_FILE)
    # The same validation as at conversion (some families read optional heads off the tensor names).
    cfg = arch.config(meta["hf_config"], meta["source"]["tensors"], folder / CONFIG_FILE)
    check_layout(mesh, **arch.layout_sizes(cfg))
    default = arch.default_max_seq_len(folder, cfg)  # from the carried files, as load_bert from the HF folder
    lower_case = arch.lower_case(folder)
    max_seq_len = check_max_seq_len(default if max_seq_len is None else max_seq_len, cfg.max_seq_len)
    dtype = jnp.dtype(dtype or ("float32" if meta["dtype"] == "float64" else meta["dtype"]))  # float64 as HF loads do
    module, example = arch.module(cfg, dtype, mesh)
    shardings = param_shardings(module, example, mesh)
    _, shapes = param_specs(module, example)

    flat_shardings = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    manifest = meta["params"]
    abstract, stacked, padded = {}, {}, False
    for path, shape in flat_shapes.items():
        key = _key(tuple(k.key for k in path))
        entry = manifest.get(key)
        if entry is None or not _fits(tuple(entry["shape"]), tuple(shape), entry["layers"] is not None):
            raise CheckpointError(f"{folder / CONFIG_FILE}: parameter {key!r} is "
                                  f"{'missing' if entry is None else 'of shape ' + str(tuple(entry['shape']))}; "
                                  f"the model expects {tuple(shape)}")
        if not is_floating(entry["dtype"]):  # restored as `dtype`, the raw integers would be the weights
            raise CheckpointError(f"{folder / CONFIG_FILE}: parameter {key!r} is stored as {entry['dtype']} (its "
                                  f"converter kept integer tensors, as older ones did); {FLOATING_ONLY}")
        padded |= tuple(entry["shape"]) != tuple(shape)
        node = abstract
        for k in key.split("/")[:-1]:
            node = node.setdefault(k, {})
        leaf = key.split("/")[-1]
        if entry["layers"] is None:
            node[leaf] = jax.ShapeDtypeStruct(shape, dtype, sharding=flat_shardings[path])
        else:
            per_layer = _layer_shardings(flat_shardings[path], shape[0])
            # A layer whose stage has no device in this process (pp > 1, stages on different hosts)
            # is left out with a placeholder: Orbax (0.12.8) cannot build an array with no
            # addressable shard ("If the Array has no addressable shards, `dtype` must be provided"
            # from jax.make_array_from_single_device_arrays in serialization._read_and_create_array),
            # and no device here needs it, since _stack_on_devices only builds this process's shards
            # of the stacked array. Each process thus reads its own stages' slices only, straight
            # onto its devices, as on one host; the placeholder keeps the structure check strict
            # (Orbax's partial_load would also accept leaves missing by mistake).
            node[leaf] = {_LAYER_KEY.format(i): jax.ShapeDtypeStruct(shape[1:], dtype, sharding=s)
                          if s.addressable_devices else _placeholder(ocp, folder)
                          for i, s in enumerate(per_layer)}
            stacked[key] = (flat_shardings[path], tuple(shape))
    ctx = ocp.Context()
    # Checked by _fits above: only embedding tables grow, by zero rows, to split evenly on this mesh.
    ctx.array.loading.enable_padding_and_truncation = padded
    try:
        with ctx:
            restored = ocp.load(folder / CHECKPOINT_DIR, abstract)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / CHECKPOINT_DIR}: cannot restore the checkpoint ({type(e).__name__}: {e})") \
            from None

    params = {}
    for key in (_key(tuple(k.key for k in p)) for p in flat_shapes):
        parts = key.split("/")
        node = restored
        for k in parts:
            node = node[k]
        if key in stacked:
            target, shape = stacked[key]
            layers = {i: node[_LAYER_KEY.format(i)] for i in range(shape[0])
                      if isinstance(node[_LAYER_KEY.format(i)], jax.Array)}  # placeholders stay unread
            node = _stack_on_devices(layers, target, shape)
            del layers
        dest = params
        for k in parts[:-1]:
            dest = dest.setdefault(k, {})
        dest[parts[-1]] = node
    return arch.model(cfg, params, mesh, Tokenizer.from_folder(folder, lower_case=lower_case), max_seq_len,
                      str(folder))


# ---------------------------------------------------------------------------------- inspecting
def describe(path) -> dict:
    """What `energon inspect` prints: architecture, dims, dtype, params, bytes, layout of a folder, and
    max_seq_len: what a load takes when given none (a Bert folder's sentence_bert_config.json can set it).

    A Hugging Face folder's dtype and bytes are those of the tensors the model reads (buffers and
    unused heads left out); a checkpoint of mixed floating dtypes gets "float16+float32", the dtype
    holding the most parameters first. default_dtype: what a conversion or load takes without
    --dtype (`checkpoint_dtype`, which convert and the loaders call too), default_dtype_from: why."""
    from energon_jax.loading import resolve_path

    folder = resolve_path(path)  # a folder or a preset name, as generate and serve take it
    if (folder / CONFIG_FILE).is_file():
        meta = read_converted_config(folder)
        disk = sum(p.stat().st_size for p in (folder / CHECKPOINT_DIR).rglob("*") if p.is_file())
        arch = architecture(meta["architecture"], folder / CONFIG_FILE)
        cfg = arch.config(meta["hf_config"], meta["source"]["tensors"], folder / CONFIG_FILE)
        return {"kind": "converted", "path": str(folder), "architecture": meta["architecture"],
                "dims": meta["dims"], "max_seq_len": arch.default_max_seq_len(folder, cfg),
                "dtype": meta["dtype"], "default_dtype": meta["dtype"],
                "default_dtype_from": "the converted checkpoint", "num_params": meta["num_params"],
                "bytes": meta["bytes"], "bytes_on_disk": disk, "layout": meta["layout"],
                "converter_version": meta["converter_version"], "source": meta["source"]}
    hf = read_config(folder)
    arch = architecture(hf.get("model_type"), folder / "config.json")
    source = TensorSource(folder)
    cfg = arch.config(hf, source.keys(), folder / "config.json")
    from energon_jax.loading import param_specs

    _, shapes = param_specs(*arch.module(cfg, jnp.float32, None))
    num_params = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    mapped = mapped_tensors(arch, source, cfg)
    chosen = checkpoint_dtype(hf, source, mapped)
    return {"kind": "huggingface", "path": str(folder), "architecture": hf["model_type"],
            "dims": dataclasses.asdict(cfg), "max_seq_len": arch.default_max_seq_len(folder, cfg),
            "dtype": chosen.stored, "default_dtype": chosen.name, "default_dtype_from": chosen.reason,
            "num_params": num_params,
            "bytes": sum(int(np.prod(source.shape(n))) * np.dtype(source.dtype(n)).itemsize for n in mapped),
            "bytes_on_disk": sum(p.stat().st_size for p in source.files),
            "layout": None, "files": [p.name for p in source.files]}
