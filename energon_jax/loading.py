"""`load_sharded_model`: a Hugging Face folder, a converted folder or a preset -> a sharded model."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.convert import gpt2 as gpt2_convert
from energon_jax.convert import hf_files
from energon_jax.convert.hf_files import CheckpointError, TensorSource, checkpoint_dtype, read_config
from energon_jax.runtime.checks import check_int
from energon_jax.runtime.compile_cache import enable_compilation_cache
from energon_jax.runtime.distributed import put_global
from energon_jax.runtime.mesh import check_layout, resolve_mesh
from energon_jax.runtime.sharding import logical_to_sharding, table_multiple
from energon_jax.tokenizer import Tokenizer

PRESETS_DIR = Path(__file__).parent / "presets"
# hf_files.DTYPES' names (--dtype's choices, convert's too), in its order, -> the jnp dtypes of those names.
DTYPES = {name: getattr(jnp, name) for name in hf_files.DTYPES}


def list_presets() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_path(path: str | os.PathLike) -> Path:
    """The model folder `path` names, made absolute (Orbax refuses relative checkpoint paths).

    `path` is a folder, or a preset name (list_presets()); a folder of that name wins over the preset.
    Raises NotADirectoryError for a file (naming its folder where the file is one a model folder
    holds) and FileNotFoundError for anything else.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p.absolute()
    if isinstance(path, str) and (PRESETS_DIR / path / "config.json").is_file():
        return PRESETS_DIR / path
    if p.exists():
        hint = ""
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin"):
            hint = f" (its folder: {str(p.absolute().parent)!r})"
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the folder that holds config.json{hint}")
    raise FileNotFoundError(f"{str(path)!r} not found: it is neither a model folder nor a preset name; "
                            f"presets: {list_presets()}")


def resolve_dtype(dtype):
    if dtype is None:
        return None
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:  # not a dtype at all, e.g. 5
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; accepted: None, {list(DTYPES)}")
    return DTYPES[name]


# A folder written by `energon convert` carries this file (see convert/orbax_io.py).
CONVERTED_MARKER = "energon_config.json"

# model_type in config.json -> "module:function(folder, hf_config, mesh, dtype, max_seq_len)"
ARCHITECTURES = {
    "gpt2": "energon_jax.loading:_load_gpt2",
    "bert": "energon_jax.engine.bert:load_bert",
}


def stack_layers(pieces, num_layers: int) -> dict:
    """(path, layer, array) triples -> nested dict with per-layer arrays stacked on axis 0."""
    tree, per_layer = {}, {}
    for path, layer, arr in pieces:
        if layer is None:
            _set(tree, path, arr)
        else:
            per_layer.setdefault(path, [None] * num_layers)[layer] = arr
    for path, arrs in per_layer.items():
        _set(tree, path, np.stack(arrs))
    return tree


def pad_rows(table: np.ndarray, multiple: int) -> np.ndarray:
    """Zero rows appended so the table's first axis splits evenly over `multiple` devices."""
    extra = -table.shape[0] % multiple
    return table if not extra else np.concatenate([table, np.zeros((extra,) + table.shape[1:], table.dtype)])


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_sharded_model(path, *, tp: int = 1, pp: int = 1, dp: int = 1, dtype=None, max_seq_len=None, mesh=None):
    """Load a GPT-2 or Bert model and place its parameters on a device mesh.

    path: a Hugging Face model folder, a folder written by `energon convert`, or a preset name.
    dtype: None keeps the checkpoint's dtype (config.json's, else the weights': what `energon inspect`
    shows as the default and `energon convert` writes); "bfloat16", "float16" or "float32".
    """
    enable_compilation_cache()
    folder = resolve_path(path)
    dtype = resolve_dtype(dtype)
    mesh = resolve_mesh(mesh, tp, pp, dp)
    if (folder / CONVERTED_MARKER).is_file():
        from energon_jax.convert.orbax_io import load_converted

        return load_converted(folder, mesh=mesh, dtype=dtype, max_seq_len=max_seq_len)
    hf_config = read_config(folder)
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{folder}: model_type={model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    module_name, fn_name = ARCHITECTURES[model_type].split(":")
    loader = getattr(importlib.import_module(module_name), fn_name)
    return loader(folder, hf_config, mesh, dtype, max_seq_len)


def check_max_seq_len(max_seq_len, limit: int) -> int:
    if max_seq_len is None:
        return limit
    return check_int("max_seq_len", max_seq_len, 1, limit, " (the model's positions)")


def param_specs(module, example_args) -> tuple[dict, dict]:
    """(logical axes, shapes) of every parameter, read off the module's own annotations."""
    import flax.linen as nn

    boxed = jax.eval_shape(module.init, jax.random.key(0), *example_args)["params"]
    return nn.get_partition_spec(boxed), jax.tree.map(lambda x: x.shape, nn.unbox(boxed))


def param_shardings(module, example_args, mesh) -> dict:
    """NamedSharding of every parameter on `mesh` (the one rules table decides)."""
    axes, _ = param_specs(module, example_args)
    return jax.tree.map(lambda spec: logical_to_sharding(spec, mesh), axes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def place_params(host_tree: dict, module, example_args, mesh, dtype) -> dict:
    """Host arrays (nested dict in the module's layout) -> jax.Arrays in their NamedShardings.

    Shapes are checked against the module's own parameter shapes, and dtypes for being floating
    point (cast to `dtype`, a quantized checkpoint's int8 would give its raw integers as the
    weights), before anything moves.
    """
    axes, shapes = param_specs(module, example_args)
    host_flat = dict(jax.tree_util.tree_flatten_with_path(host_tree)[0])
    want_flat = dict(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    if set(host_flat) != set(want_flat):
        missing = sorted(map(jax.tree_util.keystr, set(want_flat) - set(host_flat)))
        extra = sorted(map(jax.tree_util.keystr, set(host_flat) - set(want_flat)))
        raise CheckpointError(f"parameter tree mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, arr in host_flat.items():
        if tuple(arr.shape) != tuple(want_flat[key]):
            raise CheckpointError(f"parameter {jax.tree_util.keystr(key)} has shape {tuple(arr.shape)}, "
                                  f"the model expects {tuple(want_flat[key])}")
        if not hf_files.is_floating(arr.dtype):
            raise CheckpointError(f"parameter {jax.tree_util.keystr(key)} is {np.dtype(arr.dtype).name} in the "
                                  f"checkpoint; {hf_files.FLOATING_ONLY}")
    # Over several processes each one holds the host tree (read from its own disk or a shared one)
    # and copies only its own devices' slices (put_global).
    return jax.tree.map(lambda arr, spec: put_global(np.asarray(arr).astype(dtype), logical_to_sharding(spec, mesh)),
                        host_tree, axes, is_leaf=lambda x: isinstance(x, np.ndarray))


def _load_gpt2(folder, hf_config, mesh, dtype, max_seq_len):
    from energon_jax.engine.gpt import GPTModel
    from energon_jax.models.gpt2 import GPT2

    cfg = gpt2_convert.config_from_hf(hf_config, folder / "config.json")
    check_layout(mesh, heads=cfg.n_head, mlp=cfg.mlp_dim, layers=cfg.n_layer)
    max_seq_len = check_max_seq_len(max_seq_len, cfg.n_positions)
    source = TensorSource(folder)
    weights = gpt2_convert.mapped_names(source.keys(), cfg)
    hf_files.check_floating_weights(source, weights)  # before any tensor is read
    dtype = dtype or jnp.dtype(checkpoint_dtype(hf_config, source, weights).name)
    host = stack_layers(gpt2_convert.iter_params(source, cfg), cfg.n_layer)
    multiple = table_multiple(mesh)
    host["wte"], host["wpe"] = pad_rows(host["wte"], multiple), pad_rows(host["wpe"], multiple)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = place_params(host, GPT2(cfg, param_dtype=dtype, table_multiple=multiple), (tokens, tokens), mesh, dtype)
    return GPTModel(cfg, params, mesh, Tokenizer.from_folder(folder), max_seq_len=max_seq_len, source=str(folder))
