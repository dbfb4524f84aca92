"""Reading Hugging Face model folders: config.json and weight files, one tensor at a time.

Safetensors are parsed here directly (8-byte header length, JSON header, raw bytes) and
memory-mapped, so a tensor is read only when asked for, bfloat16 included (via ml_dtypes),
and a truncated file is reported with the tensor that runs past its end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# The parameter dtypes a conversion or a load may take (--dtype's choices).
DTYPES = ("bfloat16", "float16", "float32")


class CheckpointError(ValueError):
    """A model folder or weight file that cannot be read; the message names the file or tensor."""


def read_json_object(path: Path, what: str, hint: str = "") -> dict:
    """The JSON object in the file at `path` (a model folder's config, index or settings file);
    a file that is not one raises CheckpointError naming it, `what` it should hold, and `hint`."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e}){hint}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object of {what} (got {type(value).__name__}){hint}")
    return value


def config_size(hf: dict, key: str, default, where, *, low: int = 1, nullable: bool = False) -> int | None:
    """config.json's `key` (or `default` when absent) as an int >= low (None too if nullable);
    anything else is a CheckpointError naming the file, the key and the value. A string or float
    size failed deep inside the model build ("not all arguments converted"), or 0 heads there as a
    ZeroDivisionError."""
    value = hf.get(key, default)
    if value is None and nullable:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return value
    raise CheckpointError(f"{where}: {key}={value!r} must be an int >= {low}{' or null' if nullable else ''}")


def config_positive(hf: dict, key: str, default: float, where) -> float:
    """config.json's `key` (or `default`) as a finite number > 0 (a layer norm's epsilon)."""
    value = hf.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise CheckpointError(f"{where}: {key}={value!r} must be a finite number > 0")


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found; a Hugging Face model folder needs one")
    return read_json_object(path, "config options")


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = header
        for name, entry in header.items():
            if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensor {name!r} needs dtype, shape "
                                      f"and data_offsets, got {entry!r:.200}")
            begin, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                    f"{self._data_start + end} but the file has {size}")
            if entry["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            need = int(np.prod(entry["shape"])) * np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
            if not 0 <= begin <= end or end - begin != need:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: tensor {name!r} of shape {tuple(entry['shape'])} "
                    f"{entry['dtype']} needs {need} bytes, its data_offsets [{begin}, {end}] hold {end - begin}")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_ST_DTYPES[self._entries[name]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        arr = np.frombuffer(self._mmap, dtype=self.dtype(name), count=(end - begin) // self.dtype(name).itemsize,
                            offset=self._data_start + begin)
        return arr.reshape(entry["shape"])


class TensorSource:
    """All tensors of a model folder by name, whatever the file layout.

    Accepts model.safetensors, sharded safetensors with model.safetensors.index.json, or
    pytorch_model.bin (loaded with torch, `weights_only=True`).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[str, object] = {}
        self.files: list[Path] = []
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        # Hugging Face's order, the numbers' reference: a model.safetensors first, so a stale index
        # (or stale shards) beside it, which save_pretrained leaves, is not what gets read
        if single.is_file():
            st = SafetensorsFile(single)
            self._where = {name: st for name in st.keys()}
            self.files = [single]
        elif index.is_file():
            weight_map = _read_weight_map(index)
            shards = {f: SafetensorsFile(self.folder / f) for f in sorted(set(weight_map.values()))}
            held = {f: set(shard.keys()) for f, shard in shards.items()}
            absent = [(name, f) for name, f in weight_map.items() if name not in held[f]]
            if absent:  # a KeyError at the first read before
                raise CheckpointError(f"{index}: weight_map puts tensors in shards that do not hold them: "
                                      + ", ".join(f"{name!r} in {f}" for name, f in absent[:5]))
            self._where = {name: shards[f] for name, f in weight_map.items()}
            self.files = [self.folder / f for f in shards]
        elif (self.folder / "pytorch_model.bin").is_file():
            path = self.folder / "pytorch_model.bin"
            state = _load_torch_bin(path)
            self._where = {name: state for name in state}
            self.files = [path]
        elif (self.folder / "pytorch_model.bin.index.json").is_file():
            raise CheckpointError(
                f"{self.folder}: sharded pytorch_model-*.bin checkpoints (pytorch_model.bin.index.json) are not "
                "supported; re-save the model as safetensors first, e.g. transformers.AutoModel.from_pretrained("
                "folder).save_pretrained(new_folder)")
        else:
            raise CheckpointError(
                f"{self.folder}: no weight file; expected model.safetensors, model.safetensors.index.json "
                f"or pytorch_model.bin")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        return src.shape(name) if isinstance(src, SafetensorsFile) else tuple(src[name].shape)

    def dtype(self, name: str) -> np.dtype:
        src = self._where[name]
        return src.dtype(name) if isinstance(src, SafetensorsFile) else src[name].dtype

    def file(self, name: str) -> Path:
        """The weight file holding tensor `name`."""
        src = self._where[name]
        return src.path if isinstance(src, SafetensorsFile) else self.files[0]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {name!r} missing from the checkpoint")
        src = self._where[name]
        return src.get(name) if isinstance(src, SafetensorsFile) else src[name]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.get(name)


def _read_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file), checked against the folder."""
    weight_map = read_json_object(index, "index entries").get("weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
        raise CheckpointError(f"{index}: needs a 'weight_map' object of tensor name -> safetensors file name")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise CheckpointError(f"{index}: weight_map names files that are not in {index.parent}: {missing[:5]}")
    return weight_map


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch (pip install torch); "
                              "or convert the folder to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles / zip archives
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    out = {}
    for name, t in state.items():
        t = t.detach()
        out[name] = t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointDtype:
    """The dtype a conversion or a load of a Hugging Face folder takes when given none, and why.

    name: a floating dtype, never an integer one. stored: the floating dtypes of the weights the
    model reads, the one holding the most parameters first ("float16+float32"; "" when none is
    floating). reason: where `name` comes from, in words (inspect and convert print it).
    """

    name: str
    stored: str
    reason: str

    @property
    def plain(self) -> bool:
        """The weights are all of `name`: nothing to say about the choice."""
        return self.stored == self.name


def checkpoint_dtype(hf: dict, source: "TensorSource", names) -> CheckpointDtype:
    """The default dtype of a folder with config `hf` whose model reads the tensors `names` of `source`
    (names it does not hold are left out; integer buffers count for nothing).

    config.json's `dtype` (transformers >= 4.56) or `torch_dtype` wins where it is one of DTYPES, as
    transformers' dtype="auto" takes it; else the weights' dtype, and for weights of mixed floating
    dtypes the one holding the most parameters (ties: the wider). One function for `energon convert`,
    `energon inspect` and the loaders of Hugging Face folders, so all three agree.
    """
    params: dict[str, int] = {}
    for name in dict.fromkeys(names):
        dtype = np.dtype(source.dtype(name)) if name in source else None
        if dtype is not None and is_floating(dtype):
            params[dtype.name] = params.get(dtype.name, 0) + int(np.prod(source.shape(name)))
    ranked = sorted(params, key=lambda d: (-params[d], -np.dtype(d).itemsize, d))
    stored = "+".join(ranked)
    unusable = ""
    for key in ("dtype", "torch_dtype"):
        if key not in hf or hf[key] is None:
            continue
        value = hf[key]
        name = value.removeprefix("torch.") if isinstance(value, str) else None
        if name in DTYPES:
            return CheckpointDtype(name, stored, f"config.json's {key}")
        unusable = f"; config.json's {key}={value!r} is not one of {list(DTYPES)}"
        break
    if not ranked:
        return CheckpointDtype("float32", stored, "no floating-point weights" + unusable)
    # float64 weights: jax computes in float32 unless x64 is on (it is not here), and a float64
    # folder loaded as float32 with a warning per array
    name, wide = (ranked[0], "") if ranked[0] in DTYPES else ("float32", f", as float32 (not one of {list(DTYPES)})")
    if len(ranked) == 1:
        return CheckpointDtype(name, stored, "the weights" + wide + unusable)
    return CheckpointDtype(name, stored, f"most parameters of the mixed {stored} weights" + wide
                           + (unusable or "; config.json gives no dtype") + "; --dtype chooses another")


# What a model weight may be stored as, in the words the errors use.
FLOATING_ONLY = ("a model weight must be floating point (float64, float32, float16 or bfloat16; it is cast to "
                 f"one of {list(DTYPES)}); quantized checkpoints are not supported")


def check_floating_weights(source: "TensorSource", names) -> None:
    """Refuse a checkpoint where a tensor the model reads as a weight (`names`: what the name map
    reads, as for checkpoint_dtype; names `source` lacks are left out) is not floating point, e.g. a
    quantized checkpoint's int8 matrix: cast to a float dtype it would give the raw integers as the
    weights, silently. Integer buffers (position_ids, attention masks) are no weights and not in
    `names`. Reads dtypes, no tensor data; the CheckpointError names the file, the tensor and its dtype."""
    bad = [name for name in dict.fromkeys(names) if name in source and not is_floating(source.dtype(name))]
    if bad:
        name = bad[0]
        more = f" (and {len(bad) - 1} more weights that are not floating point)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source.file(name)}: tensor {name!r} is {np.dtype(source.dtype(name)).name}{more}; "
                              f"{FLOATING_ONLY}")


def is_floating(dtype) -> bool:
    """A floating dtype, bfloat16 included (ml_dtypes' bfloat16 is no np.floating to numpy)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)
