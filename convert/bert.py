"""Hugging Face Bert <-> energon Bert: config validation, the name map, and its transforms.

HF Linear weights are [out, in]; ours are [in, out] einsum kernels, so every dense weight is
transposed, and the separate query / key / value projections are fused into one
[E, 3, heads, head_dim] kernel. Loads `BertModel` and `BertFor*` checkpoints (names under
`bert.`); the pooler and the masked-LM head are loaded when the checkpoint has them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from energon_jax.convert.hf_files import CheckpointError, config_positive, config_size, read_json_object
from energon_jax.models.bert import BERT_ACTIVATIONS, BertConfig


class UnsupportedConfigError(ValueError):
    """A config option whose numbers this library would not reproduce."""


# HF config options that change the numbers and that this module does not implement: value accepted.
_REJECTED_IF_SET = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
}

_POOLER = "pooler.dense.weight"
_MLM = "cls.predictions.transform.dense.weight"
# Task heads of BertFor* checkpoints that this encoder does not serve, and non-parameter buffers.
_IGNORED_PREFIXES = ("cls.seq_relationship.", "classifier.", "qa_outputs.")
_IGNORED_NAMES = ("embeddings.position_ids",)
# A tied decoder may be stored anyway (older checkpoints); it must equal what it is tied to.
_TIED = {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}


def _hf_prefix(names: Iterable[str]) -> str:
    return "bert." if any(n.startswith("bert.embeddings.") for n in names) else ""


def _bert_name(name: str, prefix: str) -> str:
    """Checkpoint name of an encoder tensor (`cls.*` heads sit outside the `bert.` prefix)."""
    return name if name.startswith("cls.") else prefix + name


# Older checkpoints (bert-base-uncased among them) keep TensorFlow's LayerNorm names, which
# transformers renames as it loads them: new suffix -> legacy suffix.
_LEGACY_SUFFIXES = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}


def _stored_name(name: str, names: set[str]) -> str:
    """`name` as the checkpoint stores it: itself, else its legacy gamma / beta name if present."""
    if name not in names:
        for new, old in _LEGACY_SUFFIXES.items():
            if name.endswith(new) and name.removesuffix(new) + old in names:
                return name.removesuffix(new) + old
    return name


def config_from_hf(hf: dict, tensor_names: Iterable[str] = (), where="config.json") -> BertConfig:
    """Validate an HF Bert config.json; the heads present are read off `tensor_names`; `where`
    (the file) names it in errors."""
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise UnsupportedConfigError(f"model_type={model_type!r} is not Bert (expected 'bert')")
    for option, accepted in _REJECTED_IF_SET.items():
        if option in hf and hf[option] != accepted:
            raise UnsupportedConfigError(
                f"unsupported Bert config option {option}={hf[option]!r}; only {accepted!r} is implemented")
    if hf.get("pruned_heads"):
        raise UnsupportedConfigError(f"unsupported Bert config option pruned_heads={hf['pruned_heads']!r}; "
                                     "only unpruned models are implemented")
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in BERT_ACTIVATIONS:  # a list was "unhashable type"
        raise UnsupportedConfigError(
            f"unsupported Bert config option hidden_act={act!r}; accepted: {sorted(BERT_ACTIVATIONS)}")
    names = set(tensor_names)
    prefix = _hf_prefix(names)
    has_mlm = _MLM in names
    if has_mlm and not hf.get("tie_word_embeddings", True):
        raise UnsupportedConfigError("unsupported Bert config option tie_word_embeddings=False with a masked-LM "
                                     "head; only a decoder tied to the word embeddings is implemented")
    if "vocab_size" not in hf:
        raise CheckpointError(f"{where}: 'vocab_size' missing; a Bert config.json must give it")
    try:
        return BertConfig(
            vocab_size=config_size(hf, "vocab_size", None, where),
            hidden_size=config_size(hf, "hidden_size", 768, where),
            num_hidden_layers=config_size(hf, "num_hidden_layers", 12, where),
            num_attention_heads=config_size(hf, "num_attention_heads", 12, where),
            intermediate_size=config_size(hf, "intermediate_size", 3072, where),
            hidden_act=act,
            max_position_embeddings=config_size(hf, "max_position_embeddings", 512, where),
            type_vocab_size=config_size(hf, "type_vocab_size", 2, where),
            layer_norm_eps=config_positive(hf, "layer_norm_eps", 1e-12, where),
            pad_token_id=hf.get("pad_token_id", 0),  # not read by the model: HF takes -1 too
            has_pooler=prefix + _POOLER in names,
            has_mlm_head=has_mlm,
        )
    except CheckpointError:  # names the file and the key already
        raise
    except ValueError as e:
        raise UnsupportedConfigError(f"invalid Bert config.json: {e}") from None


def config_to_hf(cfg: BertConfig) -> dict:
    arch = "BertForMaskedLM" if cfg.has_mlm_head else "BertModel"
    out = {"model_type": "bert", "architectures": [arch], "position_embedding_type": "absolute",
           "tie_word_embeddings": True}
    out.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.name.startswith("has_")})
    return out


# sentence-transformers' settings of its Transformer module, beside config.json in a sentence-transformers
# folder (all-MiniLM-L6-v2: {"max_seq_length": 256, "do_lower_case": false}). It truncates every input to
# max_seq_length tokens, so serving the model at its 512 positions gives other embeddings past 256; with
# do_lower_case true it lower-cases every text (str.lower) before the tokenizer sees it.
SENTENCE_CONFIG = "sentence_bert_config.json"


# key -> (check, what the value must be); null or absent is always accepted (the default).
_SENTENCE_KEYS = {
    # bool is an int to Python; 256.0 is not what sentence-transformers writes either.
    "max_seq_length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int"),
    # "true" and 1 are not what sentence-transformers writes: refused rather than guessed at
    "do_lower_case": (lambda v: isinstance(v, bool), "true or false"),
}


def sentence_config(folder) -> dict:
    """The settings of `folder`'s sentence_bert_config.json that a load uses, checked together
    whichever one is asked for: {"max_seq_length": int or None, "do_lower_case": bool}, None / False
    when the file or the key is absent (or null). A file that is not a JSON object, or a value of the
    wrong type, raises CheckpointError naming the file and the key."""
    path = Path(folder) / SENTENCE_CONFIG
    raw = read_json_object(path, "sentence-transformers settings", "; fix or remove the file") if path.is_file() else {}
    for key, (check, want) in _SENTENCE_KEYS.items():
        if raw.get(key) is not None and not check(raw[key]):
            raise CheckpointError(f"{path}: {key}={raw[key]!r} must be {want} (or null); fix or remove the file")
    return {"max_seq_length": raw.get("max_seq_length"), "do_lower_case": bool(raw.get("do_lower_case"))}


def sentence_max_seq_len(folder) -> int | None:
    """`max_seq_length` of `folder`'s sentence_bert_config.json (`sentence_config`): None when absent
    (sentence-transformers then uses the model's positions too)."""
    return sentence_config(folder)["max_seq_length"]


def sentence_lower_case(folder) -> bool:
    """`do_lower_case` of `folder`'s sentence_bert_config.json (`sentence_config`): when true,
    sentence-transformers lower-cases every text before tokenizing, and so does the model's Tokenizer."""
    return sentence_config(folder)["do_lower_case"]


def default_max_seq_len(folder, cfg: BertConfig) -> int:
    """The max_seq_len a load of `folder` takes when the caller gives none: sentence_bert_config.json's
    max_seq_length (what sentence-transformers truncates to), capped at the model's positions; else
    the positions."""
    limit = cfg.max_position_embeddings
    value = sentence_max_seq_len(folder)
    return limit if value is None else min(value, limit)


# ------------------------------------------------------------------ transforms (ours <-> HF)
def _identity(xs, cfg):
    return xs[0]


def _transpose(xs, cfg):  # HF Linear [out, in] -> [in, out]
    return np.ascontiguousarray(xs[0].T)


def _fuse_qkv_kernel(xs, cfg):  # 3 x [N*D, E] -> [E, 3, N, D]
    e, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    return np.stack([x.T.reshape(e, n, d) for x in xs], axis=1)


def _fuse_qkv_bias(xs, cfg):  # 3 x [N*D] -> [3, N, D]
    return np.stack([x.reshape(cfg.num_attention_heads, cfg.head_dim) for x in xs])


def _out_kernel(xs, cfg):  # [E, N*D] -> [N, D, E]
    return np.ascontiguousarray(xs[0].T).reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size)


def _split_qkv_kernel(x, cfg):
    return [np.ascontiguousarray(x[:, c].reshape(cfg.hidden_size, -1).T) for c in range(3)]


def _split_qkv_bias(x, cfg):
    return [x[c].reshape(-1) for c in range(3)]


def _inv_transpose(x, cfg):
    return [np.ascontiguousarray(x.T)]


def _inv_out_kernel(x, cfg):
    return [np.ascontiguousarray(x.reshape(-1, cfg.hidden_size).T)]


def _inv_identity(x, cfg):
    return [x]


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: tuple[str, ...]  # HF names (without the `bert.` prefix); "{i}" = layer index
    path: tuple[str, ...]  # our parameter path
    hf_shape: Callable[[BertConfig], tuple[int, ...]]  # shape of each HF tensor
    to_ours: Callable  # (list of HF arrays, cfg) -> our array
    to_hf: Callable  # (our array, cfg) -> list of HF arrays
    when: str = "always"  # "always" | "pooler" | "mlm"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def _e(c):
    return (c.hidden_size,)


def _ee(c):
    return (c.hidden_size, c.hidden_size)


_L = "encoder.layer.{i}."
_T, _I, _O = (_transpose, _inv_transpose), (_identity, _inv_identity), (_out_kernel, _inv_out_kernel)
NAME_MAP: list[Entry] = [
    Entry(("embeddings.word_embeddings.weight",), ("word_embeddings",), lambda c: (c.vocab_size, c.hidden_size), *_I),
    Entry(("embeddings.position_embeddings.weight",), ("position_embeddings",),
          lambda c: (c.max_position_embeddings, c.hidden_size), *_I),
    Entry(("embeddings.token_type_embeddings.weight",), ("token_type_embeddings",),
          lambda c: (c.type_vocab_size, c.hidden_size), *_I),
    Entry(("embeddings.LayerNorm.weight",), ("embeddings_ln", "scale"), _e, *_I),
    Entry(("embeddings.LayerNorm.bias",), ("embeddings_ln", "bias"), _e, *_I),
    Entry(tuple(_L + f"attention.self.{p}.weight" for p in ("query", "key", "value")),
          ("encoder", "layers", "qkv_kernel"), _ee, _fuse_qkv_kernel, _split_qkv_kernel),
    Entry(tuple(_L + f"attention.self.{p}.bias" for p in ("query", "key", "value")),
          ("encoder", "layers", "qkv_bias"), _e, _fuse_qkv_bias, _split_qkv_bias),
    Entry((_L + "attention.output.dense.weight",), ("encoder", "layers", "out_kernel"), _ee, *_O),
    Entry((_L + "attention.output.dense.bias",), ("encoder", "layers", "out_bias"), _e, *_I),
    Entry((_L + "attention.output.LayerNorm.weight",), ("encoder", "layers", "attention_ln", "scale"), _e, *_I),
    Entry((_L + "attention.output.LayerNorm.bias",), ("encoder", "layers", "attention_ln", "bias"), _e, *_I),
    Entry((_L + "intermediate.dense.weight",), ("encoder", "layers", "mlp_in_kernel"),
          lambda c: (c.intermediate_size, c.hidden_size), *_T),
    Entry((_L + "intermediate.dense.bias",), ("encoder", "layers", "mlp_in_bias"), lambda c: (c.intermediate_size,), *_I),
    Entry((_L + "output.dense.weight",), ("encoder", "layers", "mlp_out_kernel"),
          lambda c: (c.hidden_size, c.intermediate_size), *_T),
    Entry((_L + "output.dense.bias",), ("encoder", "layers", "mlp_out_bias"), _e, *_I),
    Entry((_L + "output.LayerNorm.weight",), ("encoder", "layers", "output_ln", "scale"), _e, *_I),
    Entry((_L + "output.LayerNorm.bias",), ("encoder", "layers", "output_ln", "bias"), _e, *_I),
    Entry(("pooler.dense.weight",), ("pooler", "kernel"), _ee, *_T, when="pooler"),
    Entry(("pooler.dense.bias",), ("pooler", "bias"), _e, *_I, when="pooler"),
    Entry(("cls.predictions.transform.dense.weight",), ("mlm", "transform_kernel"), _ee, *_T, when="mlm"),
    Entry(("cls.predictions.transform.dense.bias",), ("mlm", "transform_bias"), _e, *_I, when="mlm"),
    Entry(("cls.predictions.transform.LayerNorm.weight",), ("mlm", "transform_ln", "scale"), _e, *_I, when="mlm"),
    Entry(("cls.predictions.transform.LayerNorm.bias",), ("mlm", "transform_ln", "bias"), _e, *_I, when="mlm"),
    Entry(("cls.predictions.bias",), ("mlm", "bias"), lambda c: (c.vocab_size,), *_I, when="mlm"),
]


def _entries(cfg: BertConfig):
    wanted = {"always": True, "pooler": cfg.has_pooler, "mlm": cfg.has_mlm_head}
    return [e for e in NAME_MAP if wanted[e.when]]


def _mapped(names: set[str], cfg: BertConfig):
    """(entry, layer index or None, checkpoint names of its HF tensors) of each parameter, legacy names resolved."""
    prefix = _hf_prefix(names)
    for entry in _entries(cfg):
        for i in range(cfg.num_hidden_layers) if entry.per_layer else [None]:
            yield entry, i, [_stored_name(_bert_name(n.format(i=i), prefix), names) for n in entry.hf]


def mapped_names(names, cfg: BertConfig) -> list[str]:
    """The checkpoint tensors (of tensor names `names`) that the name map reads."""
    return [name for _, _, hf_names in _mapped(set(names), cfg) for name in hf_names]


def iter_params(source, cfg: BertConfig):
    """Yield (our path, layer index or None, array in our layout), one parameter at a time.

    `source` has `keys()`, `shape(name)` and `get(name)` (see `hf_files.TensorSource`).
    Shapes are asserted against the config before any transform; tensors the model would not
    use (other than known task heads and buffers) are an error, not silently dropped.
    """
    names = set(source.keys())
    prefix = _hf_prefix(names)
    used = set()
    for entry, i, hf_names in _mapped(names, cfg):
        arrays = []
        for name in hf_names:
            if name not in names:
                raise CheckpointError(f"tensor {name!r} missing from the checkpoint")
            expected = entry.hf_shape(cfg)
            if tuple(source.shape(name)) != expected:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(source.shape(name))}, expected "
                                      f"{expected} from config.json")
            used.add(name)
            arrays.append(np.asarray(source.get(name)))
        yield entry.path, i, entry.to_ours(arrays, cfg)
    for tied, target in _TIED.items():
        name, target = _bert_name(tied, prefix), _bert_name(target, prefix)
        if name in names and cfg.has_mlm_head:
            if not np.array_equal(np.asarray(source.get(name)), np.asarray(source.get(target))):
                raise CheckpointError(f"tensor {name!r} differs from {target!r}; only a decoder tied to it is "
                                      "implemented")
            used.add(name)
    unknown = sorted(n for n in names - used
                     if not n.removeprefix(prefix).startswith(_IGNORED_PREFIXES)
                     and n.removeprefix(prefix) not in _IGNORED_NAMES)
    if unknown:
        raise CheckpointError(f"checkpoint has tensors this Bert does not use: {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''}")


def to_hf_state_dict(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Inverse of the name map: our (stacked) params -> HF tensors (`bert.` prefix when a head is
    present, as HF's BertForMaskedLM names them; bare BertModel names otherwise)."""
    prefix = "bert." if cfg.has_mlm_head else ""
    out = {}
    for entry in _entries(cfg):
        arr = params
        for key in entry.path:
            arr = arr[key]
        arr = np.asarray(arr)
        for i in range(cfg.num_hidden_layers) if entry.per_layer else [None]:
            pieces = entry.to_hf(arr if i is None else arr[i], cfg)
            for hf_name, piece in zip(entry.hf, pieces):
                assert piece.shape == entry.hf_shape(cfg), (hf_name, piece.shape)
                out[_bert_name(hf_name.format(i=i), prefix)] = np.ascontiguousarray(piece)
    return out
