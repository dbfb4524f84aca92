"""The bundled `tiny-gpt2-pydoc` preset: it loads by name, fits the size budget, and writes text.

The text checks are loose on purpose (a 4M-parameter model trained for seconds) but fail for
noise: random weights or a wrong weight layout give byte soup or runs of one token.
"""
import io
import json
import keyword
import re
from contextlib import redirect_stdout

import pytest

import energon_jax as ej
from energon_jax.loading import PRESETS_DIR

NAME = "tiny-gpt2-pydoc"
FOLDER = PRESETS_DIR / NAME
MAX_BYTES = 10_000_000
PROMPTS = ["The for statement", "A list comprehension", "The with statement"]
# Words the Python language reference uses everywhere (prose, and the keywords and grammar
# names of its syntax blocks); a continuation of it should contain some.
WORDS = {"the", "is", "a", "of", "to", "in", "and", "an", "be", "are", "function", "statement", "object",
         "list", "value", "expression", "method", "name", "type", "used", "iterator", "sequence", "clause",
         "argument", "arguments", "attribute", "exception", "suite", "stmt", "target", "executed"}
WORDS |= {k.lower() for k in keyword.kwlist}


@pytest.fixture(scope="module")
def model():
    return ej.load_sharded_model(NAME)


def _looks_like_english(text: str) -> None:
    assert text.strip(), f"empty generation: {text!r}"
    letters_spaces = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert letters_spaces / len(text) >= 0.75, f"mostly not letters/spaces: {text!r}"
    words = re.findall(r"[A-Za-z]+", text.lower())
    assert sum(w in WORDS for w in words) >= 2, f"no English/Python words: {text!r}"
    assert len(set(words)) >= 4, f"too few distinct words: {text!r}"


def test_preset_folder_is_listed_and_small():
    assert NAME in ej.list_presets()
    files = {f.name: f.stat().st_size for f in FOLDER.iterdir() if f.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= MAX_BYTES, files
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["val_loss"] < 5.0 and record["train_loss"] < record["val_loss"] + 1.0, record


def test_preset_loads_by_name(model):
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert model.config.vocab_size == cfg["vocab_size"] and model.config.n_layer == cfg["n_layer"]
    assert model.tokenizer is not None
    assert model.tokenizer.eos_token_id == cfg["eos_token_id"]
    assert model.tokenizer.decode(model.tokenizer.encode("The for statement")) == "The for statement"


def test_greedy_generation_reads_as_english(model):
    outs = model.generate(PROMPTS, max_new_tokens=32)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.token_ids) >= 8, (prompt, out)
        _looks_like_english(out.text)
    # Greedy batched rows equal each prompt alone (the contract), here on real weights.
    alone = model.generate([PROMPTS[1]], max_new_tokens=32)[0]
    assert alone.token_ids == outs[1].token_ids


def test_sampled_generation_is_seeded_and_readable(model):
    kwargs = dict(max_new_tokens=32, temperature=0.8, top_k=40, seed=7)
    a = model.generate([PROMPTS[0]], **kwargs)[0]
    b = model.generate([PROMPTS[0]], **kwargs)[0]
    assert a.token_ids == b.token_ids
    _looks_like_english(a.text)


def test_model_predicts_its_corpus_better_than_chance(model):
    import jax
    import numpy as np

    ids = model.tokenizer.encode('The "for" statement is used to iterate over the elements of a sequence')
    logp = np.asarray(jax.nn.log_softmax(model.logits([ids])[0], axis=-1))
    nll = -np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)])
    assert nll < 0.5 * np.log(model.config.vocab_size), nll  # uniform guessing is log(V) ~ 8.3


def test_cli_generate_prints_text():
    from energon_jax import cli

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["generate", NAME, "The for statement", "--max-new-tokens", "16"])
    assert rc == 0
    _looks_like_english(buf.getvalue())


def test_cli_inspect_and_convert_take_the_preset_name(tmp_path, capsys):
    """Every verb takes a preset by name, as generate and serve do."""
    from energon_jax import cli

    assert cli.main(["inspect", NAME, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(FOLDER) and info["architecture"] == "gpt2"
    out = tmp_path / "pydoc-energon"
    assert cli.main(["convert", NAME, str(out), "--quiet"]) == 0
    meta = json.loads((out / "energon_config.json").read_text())
    assert meta["source"]["folder"] == str(FOLDER)
    assert ej.load_sharded_model(out).config.vocab_size == json.loads((FOLDER / "config.json").read_text())["vocab_size"]
