"""Integer tensors where the model reads float weights (a quantized checkpoint's int8 matrix) are refused,
by `energon convert` before anything is written and by loads of Hugging Face and converted folders:
cast to a float dtype, the raw integers would silently be the weights. Integer buffers stay accepted."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import energon_jax as ej
from energon_jax.cli import main
from energon_jax.convert import orbax_io
from energon_jax.convert.hf_files import CheckpointError

REFUSAL = "quantized checkpoints are not supported"


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random HF GPT-2 (one layer), saved as model.safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=1, n_head=4,
                                       bos_token_id=100, eos_token_id=100)).eval()
    folder = tmp_path_factory.mktemp("gpt2_int") / "model"
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


def _copy_with(src, tmp_path, **changed):
    """A copy of folder `src` whose model.safetensors has the tensors ending in each key of `changed`
    (dots as "__") replaced by the value, a function of the old array; None adds nothing."""
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    tensors = load_file(folder / "model.safetensors")
    for suffix, fn in changed.items():
        suffix = suffix.replace("__", ".")
        names = [n for n in tensors if n.endswith(suffix)]
        assert len(names) == 1, (suffix, names)
        tensors[names[0]] = fn(tensors[names[0]])
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _int8(a):
    return np.clip(np.round(a * 127 / np.abs(a).max()), -127, 127).astype(np.int8)


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def _no_write(*args, **kwargs):
    raise AssertionError("the converter started writing")


@pytest.mark.parametrize("suffix, dtype", [("h.0.mlp.c_fc.weight", np.int8), ("h.0.attn.c_attn.weight", np.int32),
                                           ("wte.weight", np.int8)])
def test_integer_weight_is_refused_by_convert_before_writing(gpt2_folder, tmp_path, monkeypatch, capsys, suffix,
                                                             dtype):
    src = _copy_with(gpt2_folder, tmp_path, **{suffix.replace(".", "__"): lambda a: _int8(a).astype(dtype)})
    name = "transformer." + suffix
    out = tmp_path / "out"
    monkeypatch.setattr(orbax_io, "_write_params", _no_write)
    with pytest.raises(CheckpointError) as e:
        orbax_io.convert_checkpoint(src, out, progress=False)
    msg = str(e.value)
    for part in [str(src / "model.safetensors"), repr(name), np.dtype(dtype).name, "floating point", REFUSAL]:
        assert part in msg, (part, msg)
    assert _leftovers(out) == []
    assert main(["convert", str(src), str(out), "--quiet", "--dtype", "bfloat16"]) == 2  # --dtype does not help
    err = capsys.readouterr().err
    assert err.startswith("energon convert: error: ") and repr(name) in err and REFUSAL in err, err
    assert _leftovers(out) == []


def test_integer_weight_is_refused_by_the_hf_folder_load(gpt2_folder, tmp_path, capsys):
    src = _copy_with(gpt2_folder, tmp_path, h__0__mlp__c_fc__weight=_int8)
    for dtype in (None, "float32"):
        with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' is int8; .*"
                                                  + REFUSAL):
            ej.load_sharded_model(src, dtype=dtype)
    assert main(["generate", str(src), "1 2 3", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("energon generate: error: ") and "is int8" in err and REFUSAL in err, err


def test_every_integer_weight_is_counted(gpt2_folder, tmp_path):
    src = _copy_with(gpt2_folder, tmp_path, h__0__mlp__c_fc__weight=_int8, h__0__mlp__c_proj__weight=_int8,
                     h__0__attn__c_proj__weight=_int8)
    with pytest.raises(CheckpointError, match=r"is int8 \(and 2 more weights that are not floating point\)"):
        orbax_io.convert_checkpoint(src, tmp_path / "out", progress=False)


def test_integer_weight_in_pytorch_bin_is_refused(gpt2_folder, tmp_path):
    import torch

    folder = tmp_path / "src"
    shutil.copytree(gpt2_folder, folder)
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(folder / "model.safetensors").items()}
    name = next(k for k in state if k.endswith("h.0.mlp.c_proj.weight"))
    state[name] = torch.from_numpy(_int8(state[name].numpy()))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin: tensor '{name}' is int8; .*{REFUSAL}"):
        orbax_io.convert_checkpoint(folder, out, progress=False)
    assert _leftovers(out) == []


def test_integer_buffers_are_still_accepted(gpt2_folder, tmp_path):
    """Older GPT-2 checkpoints carry each layer's causal mask (attn.bias, uint8 or bool) and attn.masked_bias:
    buffers the model does not read as weights."""
    n = 64
    mask = np.tril(np.ones((n, n), np.uint8))[None, None]
    src = _copy_with(gpt2_folder, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = mask
    tensors["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    out = tmp_path / "out"
    orbax_io.convert_checkpoint(src, out, progress=False)
    tokens = [[5, 17, 3]]
    want = ej.load_sharded_model(gpt2_folder).generate(tokens, max_new_tokens=4)[0].token_ids
    assert ej.load_sharded_model(src).generate(tokens, max_new_tokens=4)[0].token_ids == want
    assert ej.load_sharded_model(out).generate(tokens, max_new_tokens=4)[0].token_ids == want


def _bert_with(tiny_bert_factory, tmp_path, suffix):
    """A one-layer HF Bert whose tensor ending in `suffix` is int8, with the int64 embeddings.position_ids buffer."""
    shared, _ = tiny_bert_factory(num_hidden_layers=1, vocab_size=50)
    src = _copy_with(shared, tmp_path, **{suffix.replace(".", "__"): _int8})
    tensors = load_file(src / "model.safetensors")
    tensors["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]  # an integer buffer: fine
    save_file(tensors, str(src / "model.safetensors"))
    return shared, src, next(n for n in tensors if n.endswith(suffix))


def test_bert_integer_weight_is_refused_and_position_ids_accepted(tiny_bert_factory, tmp_path):
    shared, src, name = _bert_with(tiny_bert_factory, tmp_path, "layer.0.intermediate.dense.weight")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is int8; .*{REFUSAL}"):
        orbax_io.convert_checkpoint(src, out, progress=False)
    assert _leftovers(out) == []
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is int8; .*{REFUSAL}"):  # load_bert names it too
        ej.load_sharded_model(src)
    tensors = load_file(src / "model.safetensors")
    tensors[name] = load_file(shared / "model.safetensors")[name]  # the float weight back: both work
    save_file(tensors, str(src / "model.safetensors"))
    orbax_io.convert_checkpoint(src, out, progress=False)
    a = ej.load_sharded_model(src).encode([[1, 2, 3]])
    b = ej.load_sharded_model(out).encode([[1, 2, 3]])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bert_hf_load_refuses_an_integer_query_weight(tiny_bert_factory, tmp_path):
    _, src, name = _bert_with(tiny_bert_factory, tmp_path, "layer.0.attention.self.query.weight")
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is int8; .*{REFUSAL}"):
        ej.load_sharded_model(src)


def test_converted_folder_holding_an_integer_weight_is_refused_at_load(gpt2_folder, tmp_path):
    """Converters before this check kept integer tensors as they were, and a load cast them to floats."""
    out = tmp_path / "out"
    orbax_io.convert_checkpoint(gpt2_folder, out, progress=False)
    meta = json.loads((out / orbax_io.CONFIG_FILE).read_text())
    meta["params"]["h/blocks/mlp/fc_kernel"]["dtype"] = "int8"
    (out / orbax_io.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"parameter 'h/blocks/mlp/fc_kernel' is stored as int8 .*{REFUSAL}"):
        ej.load_sharded_model(out)
