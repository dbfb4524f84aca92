"""Hugging Face GPT-2 <-> energon GPT-2: config validation, the name map, and its transforms.

HF stores attention / MLP weights as Conv1D, i.e. [in, out]; ours are [out, in]
(models/layers.project, checkpoint format version 2), so each is transposed, and the fused QKV
output axis is split into (3, heads, head_dim).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from energon_jax.config import GPT2Config
from energon_jax.convert.hf_files import CheckpointError, config_positive, config_size, read_json_object

# HF config options that change the numbers and that this module does not implement: value accepted.
_REJECTED_IF_SET = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# HF's "gelu_pytorch_tanh" is torch's tanh-approximate GELU: the formula of "gelu_new", which the model computes.
_ACCEPTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


class UnsupportedConfigError(ValueError):
    """A config option whose numbers this library would not reproduce."""


def config_from_hf(hf: dict, where="config.json") -> GPT2Config:
    """Validate an HF GPT-2 config.json; `where` (the file) names it in errors, and when it is a
    Path, a generation_config.json beside it adds its eos_token_id(s)."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise UnsupportedConfigError(f"model_type={model_type!r} is not GPT-2 (expected 'gpt2')")
    for option, accepted in _REJECTED_IF_SET.items():
        if option in hf and hf[option] != accepted:
            raise UnsupportedConfigError(
                f"unsupported GPT-2 config option {option}={hf[option]!r}; only {accepted!r} is implemented")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACCEPTED_ACTIVATIONS:
        raise UnsupportedConfigError(
            f"unsupported GPT-2 config option activation_function={act!r}; accepted: {list(_ACCEPTED_ACTIVATIONS)}")
    if "vocab_size" not in hf:
        raise CheckpointError(f"{where}: 'vocab_size' missing; a GPT-2 config.json must give it")
    eos = _eos_ids(hf.get("eos_token_id"), where, "eos_token_id")
    # HF generate stops on generation_config.json's EOS ids too: read the one beside a config.json
    # given by its path (a bare name, the default, is no file of ours)
    generation = where.with_name("generation_config.json") if isinstance(where, Path) else None
    if generation is not None and generation.is_file():
        gen = read_json_object(generation, "generation settings")
        eos += tuple(i for i in _eos_ids(gen.get("eos_token_id"), generation, "eos_token_id") if i not in eos)
    scale = hf.get("scale_attn_weights", True)
    if not isinstance(scale, bool):
        raise CheckpointError(f"{where}: scale_attn_weights={scale!r} must be true or false")
    return GPT2Config(
        vocab_size=config_size(hf, "vocab_size", None, where),
        n_positions=_size(hf, "n_positions", 1024, where),
        n_embd=_size(hf, "n_embd", 768, where),
        n_layer=_size(hf, "n_layer", 12, where),
        n_head=_size(hf, "n_head", 12, where),
        n_inner=config_size(hf, "n_inner", None, where, nullable=True),
        layer_norm_epsilon=config_positive(hf, "layer_norm_epsilon", 1e-5, where),
        scale_attn_weights=scale,
        bos_token_id=hf.get("bos_token_id"),  # not read by the model: HF takes -1 too
        eos_token_ids=eos,
    )


# GPT2Config.attribute_map: Hugging Face takes these names for the same sizes
_HF_ALIASES = {"n_positions": "max_position_embeddings", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
               "n_head": "num_attention_heads"}


def _size(hf: dict, key: str, default: int, where):
    """A size under its GPT-2 name or its HF alias (a config giving num_attention_heads was read with
    the default 12 heads: no tensor shape says how many there are); both, disagreeing, is an error."""
    alias = _HF_ALIASES[key]
    if key in hf and alias in hf and hf[key] != hf[alias]:
        raise CheckpointError(f"{where}: {key}={hf[key]!r} and {alias}={hf[alias]!r} are one setting and disagree")
    return config_size(hf, key if key in hf or alias not in hf else alias, default, where)


def _eos_ids(value, where, key) -> tuple[int, ...]:
    """An HF eos_token_id (None, an int or a list of ints) as a tuple."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where}: {key}={value!r} must be a token id >= 0, a list of them, or null")
    return tuple(dict.fromkeys(values))


def config_to_hf(cfg: GPT2Config) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "scale_attn_weights": cfg.scale_attn_weights,
        "activation_function": "gelu_new", "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id,
        "tie_word_embeddings": True,
    }


def _identity(x, cfg):
    return x


def _transpose(x, cfg):  # HF Conv1D [in, out] -> ours [out, in]
    return x.T


def _split_qkv_kernel(x, cfg):  # [E, 3E] -> [3, N, D, E]
    return x.T.reshape(3, cfg.n_head, cfg.head_dim, cfg.n_embd)


def _merge_qkv_kernel(x, cfg):  # [3, N, D, E] -> [E, 3E]
    return x.reshape(3 * cfg.n_embd, cfg.n_embd).T


def _split_qkv_bias(x, cfg):  # [3E] -> [3, N, D]
    return x.reshape(3, cfg.n_head, cfg.head_dim)


def _split_out_kernel(x, cfg):  # [E_in = N*D, E] -> [E, N, D]
    return x.T.reshape(cfg.n_embd, cfg.n_head, cfg.head_dim)


def _merge_out_kernel(x, cfg):  # [E, N, D] -> [N*D, E]
    return x.reshape(cfg.n_embd, cfg.n_embd).T


def _flatten(x, cfg):  # biases: back to HF's flat vector
    return x.reshape(-1)


# (HF name without the "transformer." prefix, our path, HF shape, transform, inverse). "{i}" = layer
# index. HF's Conv1D stores projection weights [in, out]; ours are [out, in] (models/layers.project).
Entry = tuple[str, tuple[str, ...], Callable[[GPT2Config], tuple[int, ...]], Callable, Callable]
_ID = (_identity, _identity)
_T = (_transpose, _transpose)
NAME_MAP: list[Entry] = [
    ("wte.weight", ("wte",), lambda c: (c.vocab_size, c.n_embd), *_ID),
    ("wpe.weight", ("wpe",), lambda c: (c.n_positions, c.n_embd), *_ID),
    ("ln_f.weight", ("ln_f", "scale"), lambda c: (c.n_embd,), *_ID),
    ("ln_f.bias", ("ln_f", "bias"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.ln_1.weight", ("h", "blocks", "ln_1", "scale"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.ln_1.bias", ("h", "blocks", "ln_1", "bias"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.attn.c_attn.weight", ("h", "blocks", "attn", "qkv_kernel"), lambda c: (c.n_embd, 3 * c.n_embd),
     _split_qkv_kernel, _merge_qkv_kernel),
    ("h.{i}.attn.c_attn.bias", ("h", "blocks", "attn", "qkv_bias"), lambda c: (3 * c.n_embd,), _split_qkv_bias,
     _flatten),
    ("h.{i}.attn.c_proj.weight", ("h", "blocks", "attn", "out_kernel"), lambda c: (c.n_embd, c.n_embd),
     _split_out_kernel, _merge_out_kernel),
    ("h.{i}.attn.c_proj.bias", ("h", "blocks", "attn", "out_bias"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.ln_2.weight", ("h", "blocks", "ln_2", "scale"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.ln_2.bias", ("h", "blocks", "ln_2", "bias"), lambda c: (c.n_embd,), *_ID),
    ("h.{i}.mlp.c_fc.weight", ("h", "blocks", "mlp", "fc_kernel"), lambda c: (c.n_embd, c.mlp_dim), *_T),
    ("h.{i}.mlp.c_fc.bias", ("h", "blocks", "mlp", "fc_bias"), lambda c: (c.mlp_dim,), *_ID),
    ("h.{i}.mlp.c_proj.weight", ("h", "blocks", "mlp", "proj_kernel"), lambda c: (c.mlp_dim, c.n_embd), *_T),
    ("h.{i}.mlp.c_proj.bias", ("h", "blocks", "mlp", "proj_bias"), lambda c: (c.n_embd,), *_ID),
]

# Non-parameter buffers some GPT-2 checkpoints carry; the tied lm_head duplicates wte.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def _hf_prefix(names) -> str:
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def _mapped(names: set[str], cfg: GPT2Config):
    """(checkpoint name, our path, layer index or None, HF shape, transform) of each tensor the name map reads."""
    prefix = _hf_prefix(names)
    for hf_name, path, shape_fn, transform, _ in NAME_MAP:
        for i in range(cfg.n_layer) if "{i}" in hf_name else [None]:
            yield prefix + (hf_name if i is None else hf_name.format(i=i)), path, i, shape_fn(cfg), transform


def mapped_names(names, cfg: GPT2Config) -> list[str]:
    """The checkpoint tensors (of tensor names `names`) that the name map reads."""
    return [name for name, *_ in _mapped(set(names), cfg)]


def iter_params(source, cfg: GPT2Config):
    """Yield (our path, layer index or None, array in our layout) one HF tensor at a time.

    `source` has `keys()`, `shape(name)` and `get(name)` (see `hf_files.TensorSource`).
    Shapes are asserted against the config before any transform.
    """
    names = set(source.keys())
    used = set()
    for name, path, i, expected, transform in _mapped(names, cfg):
        if name not in names:
            raise CheckpointError(f"tensor {name!r} missing from the checkpoint")
        if tuple(source.shape(name)) != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(source.shape(name))}, expected {expected} "
                                  f"from config.json")
        used.add(name)
        yield path, i, transform(np.asarray(source.get(name)), cfg)
    unknown = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise CheckpointError(f"checkpoint has tensors this GPT-2 does not use: {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''}")


def to_hf_state_dict(params: dict, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Inverse of the name map: our (stacked) params -> HF GPT2LMHeadModel tensors."""
    out = {}
    for hf_name, path, shape_fn, _, inverse in NAME_MAP:
        arr = params
        for key in path:
            arr = arr[key]
        arr = np.asarray(arr)
        for i in range(cfg.n_layer) if "{i}" in hf_name else [None]:
            hf = np.ascontiguousarray(inverse(arr if i is None else arr[i], cfg))
            assert hf.shape == shape_fn(cfg), (hf_name, hf.shape, shape_fn(cfg))
            out["transformer." + (hf_name if i is None else hf_name.format(i=i))] = hf
    return out
