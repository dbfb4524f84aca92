"""GPT-2: parity with Hugging Face PyTorch, generation semantics, bucketing, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

import energon_jax as ej
from energon_jax.convert.gpt2 import UnsupportedConfigError
from energon_jax.convert.hf_files import CheckpointError

CONFIGS = [
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=101),
    dict(n_layer=3, n_head=2, n_embd=48, vocab_size=257, n_inner=80, layer_norm_epsilon=1e-6),
    dict(n_layer=1, n_head=8, n_embd=64, vocab_size=64, scale_attn_weights=False, n_positions=96,
         bos_token_id=63, eos_token_id=63),
]


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=hf.config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("overrides", CONFIGS, ids=["l2h4", "l3h2-inner", "l1h8-noscale"])
def test_parity_with_hf(tiny_gpt2_factory, overrides):
    folder, hf = tiny_gpt2_factory(**overrides)
    model = ej.load_sharded_model(folder)
    rng = np.random.RandomState(1)
    ids = rng.randint(0, overrides["vocab_size"], (3, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got = model.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4
    for prompt in (ids[0, :5].tolist(), ids[1].tolist()):
        ours = model.generate([prompt], max_new_tokens=32)[0]
        theirs = _hf_greedy(hf, prompt, 32)
        assert ours.token_ids == theirs
        assert ours.finish_reason == ("stop" if len(theirs) < 32 else "length")


@pytest.mark.parametrize("tp", [1, 2])
def test_token_logprobs_match_hf_log_softmax(tiny_gpt2_factory, tp):
    folder, hf = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder, tp=tp, dp=2)  # logits split over the vocabulary under tp
    ids = np.random.RandomState(5).randint(0, 101, 19).tolist()
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    got = model.token_logprobs(ids, top=4)
    assert got.chosen.shape == (18,) and got.top_ids.shape == got.top_logprobs.shape == (18, 4)
    assert np.abs(got.chosen - want[np.arange(18), ids[1:]]).max() <= 1e-4
    assert (got.top_ids == np.argsort(-want[:-1], axis=1)[:, :4]).all()
    assert np.abs(got.top_logprobs - np.sort(want[:-1], axis=1)[:, ::-1][:, :4]).max() <= 1e-4
    assert model.token_logprobs(ids[:1]).chosen.shape == (0,)  # one token: nothing to score
    # the context plus one: the last token is scored, never fed in (a generation at the limit ends so)
    full = np.random.RandomState(6).randint(0, 101, 129).tolist()
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([full[:128]])).logits[0].double(), -1).numpy()
    assert np.abs(model.token_logprobs(full).chosen - want[np.arange(128), full[1:]]).max() <= 1e-4
    for bad, kw, message in (([], {}, "token_ids is empty"), ([1, 101], {}, "token id 101 outside the vocabulary"),
                             ([1] * 130, {}, r"token_ids has 130 tokens; scoring them feeds 129 \(the last is not "
                                             r"fed in\) > the context of 128"),
                             ([1, 2], dict(top=102), r"top=102 must be an int in \[0, 101\]"),
                             ([1, 2], dict(top=True), "top=True")):
        with pytest.raises(ValueError, match=message):
            model.token_logprobs(bad, **kw)
    for bad in ("567", [5.9, 6.2], [True, 6], np.array([[5, 6]])):  # "567" and 5.9 were scored as ids
        with pytest.raises(TypeError, match="token_ids must be a list of int token ids"):
            model.token_logprobs(bad)


def test_gelu_pytorch_tanh_matches_hf(tiny_gpt2_factory):
    """HF's "gelu_pytorch_tanh" is gelu_new's formula: it was refused as an unsupported option."""
    folder, hf = tiny_gpt2_factory(activation_function="gelu_pytorch_tanh")
    ids = np.random.RandomState(4).randint(0, 101, (2, 13))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ej.load_sharded_model(folder).logits(ids) - ref).max() <= 1e-4


def test_attention_impl_is_checked_and_switches_the_compiled_steps(tiny_gpt2_factory):
    """A plain attribute took "bogus" and changed nothing: the steps stayed those of the first impl."""
    from energon_jax.engine.gpt import _compiled_steps

    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    before = model.generate([[1, 2, 3]], max_new_tokens=6)[0].token_ids
    with pytest.raises(ValueError, match=r"attention_impl='bogus' is not supported; accepted: \('auto', 'triton'"):
        model.attention_impl = "bogus"
    with pytest.raises(ValueError, match="attention_impl='triton': the Triton kernels need a power-of-two head dim"):
        model.attention_impl = "triton"  # head dim 8
    assert model.attention_impl == "auto"  # a refused switch leaves the model as it was
    model.attention_impl = "xla"
    assert model.compile_counts is _compiled_steps(model.config, model.dtype, model.mesh, "xla")[2]
    assert model.generate([[1, 2, 3]], max_new_tokens=6)[0].token_ids == before


def test_mixed_lengths_equal_alone(tiny_gpt2_factory):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, 100, n).tolist() for n in (1, 4, 9, 16, 23)]
    together = model.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, together):
        assert out.token_ids == model.generate([prompt], max_new_tokens=12)[0].token_ids


def test_single_prompt_padded_to_two_decode_rows(tiny_gpt2_factory, monkeypatch):
    """engine.gpt.min_decode_rows (1 today; 2 on GPUs before the [out, in] weights) can pad a lone
    prompt's decode with spare rows: the tokens, greedy and sampled, are those of the unpadded call."""
    import energon_jax.engine.gpt as gpt

    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    prompt = [5, 17, 3, 99]
    alone = [model.generate([prompt], max_new_tokens=10, temperature=t, seed=4)[0] for t in (0.0, 1.0)]
    monkeypatch.setattr(gpt, "min_decode_rows", lambda: 2)
    before = model.compile_counts["generate"]
    padded = [model.generate([prompt], max_new_tokens=10, temperature=t, seed=4)[0] for t in (0.0, 1.0)]
    assert model.compile_counts["generate"] == before + 1  # a 2-row program, once
    assert padded == alone


def test_one_row_projection_equals_the_dot():
    """models.layers.project: a single row (multiply + reduce) against the same row among others
    (dot_general), for one and two contracted axes."""
    import jax
    import jax.numpy as jnp

    from energon_jax.models.layers import project

    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(ks[0], (3, 1, 4, 8))  # [B, T, N, D]
    w2 = jax.random.normal(ks[1], (24, 4, 8))  # [E, N, D]
    w1 = jax.random.normal(ks[2], (2, 3, 5, 32))  # [C, N, D, E]
    xe = x.reshape(3, 1, 32)
    b2 = jax.random.normal(ks[3], (24,))
    b1 = jax.random.normal(ks[3], (2, 3, 5))
    for xi, w, n_in, b in ((x, w2, 2, b2), (xe, w1, 1, b1)):
        for bias, act in ((None, None), (b, None), (b, jnp.tanh)):
            many = project(xi, w, n_in, bias, act)
            one = project(xi[1:2], w, n_in, bias, act)
            assert one.shape == many[1:2].shape
            np.testing.assert_allclose(np.asarray(one), np.asarray(many[1:2]), rtol=1e-5, atol=1e-5)
        expected = np.tanh(np.tensordot(np.asarray(xi), np.asarray(w), axes=(list(range(xi.ndim - n_in, xi.ndim)),
                                                                          list(range(w.ndim - n_in, w.ndim)))) + b)
        np.testing.assert_allclose(np.asarray(project(xi[1:2], w, n_in, b, jnp.tanh)), expected[1:2], rtol=1e-5,
                                   atol=1e-5)


def test_one_row_layer_norm_equals_the_two_pass_one():
    """LayerNorm computes a single row's statistics in one shifted pass and more rows' in two: the
    same numbers, also for a row whose mean is far from zero (where an unshifted E[x^2] - E[x]^2
    in float32 loses the variance)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from energon_jax.models.layers import LayerNorm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 257)).astype(np.float32)
    x[2] += 1e3  # mean 1e3, standard deviation 1: unshifted, E[x^2] - E[x]^2 is a few percent off
    x[3] *= 300.0
    ln = LayerNorm(1e-5)
    params = ln.init(jax.random.PRNGKey(0), jnp.asarray(x))
    params = nn.unbox(params)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    many = np.asarray(ln.apply(params, jnp.asarray(x)))
    xd = x.astype(np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5)
    ref = ref * np.asarray(params["params"]["scale"]) + np.asarray(params["params"]["bias"])
    for i in range(4):
        one = np.asarray(ln.apply(params, jnp.asarray(x[i:i + 1])))
        np.testing.assert_allclose(one, many[i:i + 1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(one, ref[i:i + 1], rtol=1e-4, atol=1e-4)


def test_write_token_one_row_and_many():
    """models.gpt2.write_token: row b's new K/V lands at [layer, b, :, pos[b], :], nothing else
    changes; a single row takes the plain dynamic_update_slice, more rows the vmapped one."""
    import jax.numpy as jnp

    from energon_jax.models.gpt2 import write_token

    rng = np.random.default_rng(1)
    for b in (1, 3):
        cache = rng.standard_normal((2, b, 4, 8, 5)).astype(np.float32)  # [L, B, N, S, D]
        new = rng.standard_normal((b, 4, 5)).astype(np.float32)
        pos = np.array([6, 0, 7][:b], np.int32)
        out = np.asarray(write_token(jnp.asarray(cache), jnp.asarray(new), jnp.int32(1), jnp.asarray(pos)))
        expected = cache.copy()
        for r in range(b):
            expected[1, r, :, pos[r], :] = new[r]
        np.testing.assert_array_equal(out, expected)


def test_seeds_and_top_k(tiny_gpt2_factory):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    prompts = [[1, 2, 3], [7, 8]]
    a = model.generate(prompts, max_new_tokens=16, temperature=1.0, seed=11)
    b = model.generate(prompts, max_new_tokens=16, temperature=1.0, seed=11)
    c = model.generate(prompts, max_new_tokens=16, temperature=1.0, seed=12)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    greedy = model.generate(prompts, max_new_tokens=16)
    top1 = model.generate(prompts, max_new_tokens=16, temperature=1.3, top_k=1, seed=5)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    tiny_p = model.generate(prompts, max_new_tokens=16, temperature=1.3, top_p=1e-6, seed=5)
    assert [o.token_ids for o in tiny_p] == [o.token_ids for o in greedy]


def test_seeds_are_ints_in_the_uint32_range(tiny_gpt2_factory, capsys):
    """Seeds go to the device as uint32: -1 and 2**40 raised numpy's OverflowError and 1.5 was
    taken; the Server (tests/test_serving.py) and the CLI take exactly the same seeds."""
    from energon_jax import cli

    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    kwargs = dict(max_new_tokens=4, temperature=1.0)
    for seed in (-1, 2**32, 2**40, 1.5, "3", True):
        with pytest.raises(ValueError, match=rf"seed={seed!r} must be an int in \[0, 4294967295\]"):
            model.generate([[1, 2]], seed=seed, **kwargs)
    assert model.generate([[1, 2]], seed=np.int64(3), **kwargs) == model.generate([[1, 2]], seed=3, **kwargs)
    assert len(model.generate([[1, 2]] * 2, seed=2**32 - 1, **kwargs)[1].token_ids) == 4
    capsys.readouterr()
    assert cli.main(["generate", str(folder), "1 2", "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert "energon generate: error: --seed=-1 must be an int in [0, 4294967295]" in err and "Traceback" not in err


def test_padded_vocabulary_is_never_sampled(tiny_gpt2_factory):
    """tp=2 pads the 101-row vocabulary to 102 rows; the padded row stays impossible at any
    temperature (a finite mask value divided by 1e38 came up level with the real logits)."""
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder, tp=2)
    assert model.params["wte"].shape[0] > model.config.vocab_size
    for temperature in (1e38, 3e38):
        outs = model.generate([[1, 2, 3]] * 8, max_new_tokens=100, temperature=temperature, seed=1)
        ids = np.array([t for o in outs for t in o.token_ids])
        assert ids.size > 100 and ids.max() < model.config.vocab_size, temperature


def test_sampling_settings_never_recompile(tiny_gpt2_factory):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    model.generate([[1, 2, 3]], max_new_tokens=8)
    before = model.compile_counts["generate"]
    for kwargs in (dict(temperature=0.7, top_k=5, seed=1), dict(temperature=1.5, top_p=0.5, seed=2),
                   dict(temperature=0.0)):
        model.generate([[1, 2, 3]], max_new_tokens=8, **kwargs)
    assert model.compile_counts["generate"] == before


def test_prompt_lengths_in_one_bucket_compile_once(tiny_gpt2_factory):
    folder, _ = tiny_gpt2_factory(n_embd=40)  # a config no other test compiles: counts start at 0
    model = ej.load_sharded_model(folder)
    for n in (3, 9, 14):  # all in the 16-token bucket
        model.generate([list(range(1, n + 1))], max_new_tokens=4)
    assert model.compile_counts["generate"] == 1
    for n in (2, 5, 11):
        model.logits(np.arange(1, n + 1)[None])
    assert model.compile_counts["forward"] == 1


def test_stop_token_ids_and_eos(tiny_gpt2_factory, tmp_path):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    free = model.generate([[5, 6, 7]], max_new_tokens=20)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    target = free.token_ids[6]
    first = free.token_ids.index(target)
    stopped = model.generate([[5, 6, 7]], max_new_tokens=20, stop=[target])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    # The same token declared as EOS in config.json stops generation without `stop`.
    eos_folder = tmp_path / "eos"
    shutil.copytree(folder, eos_folder)
    cfg = json.loads((eos_folder / "config.json").read_text())
    cfg["eos_token_id"] = int(target)
    (eos_folder / "config.json").write_text(json.dumps(cfg))
    eos_model = ej.load_sharded_model(eos_folder)
    out = eos_model.generate([[5, 6, 7], [5, 6, 7]], max_new_tokens=20)
    assert [o.token_ids for o in out] == [stopped.token_ids] * 2
    assert all(o.finish_reason == "stop" for o in out)


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_eos_id_stops_as_in_hf_generate(tiny_gpt2_factory, tmp_path, where):
    """config.json's eos_token_id may be a list, and HF generate stops on generation_config.json's
    ids (which take the place of config.json's): only the first id of config.json's used to stop
    a generation, and generation_config.json was not read. energon-jax stops on both files' ids."""
    from energon_jax.cli import main

    folder, _ = tiny_gpt2_factory()
    free = ej.load_sharded_model(folder).generate([[5, 6, 7]], max_new_tokens=20)[0].token_ids
    late = free[7]
    src = tmp_path / "eos"
    shutil.copytree(folder, src)
    path = src / where
    if where == "config.json":  # HF generate reads config.json's ids only without a generation config
        (src / "generation_config.json").unlink()
    cfg = json.loads(path.read_text())
    cfg["eos_token_id"] = [100, int(late)]  # 100 is never sampled here; the second id is
    path.write_text(json.dumps(cfg))
    model = ej.load_sharded_model(src)
    assert int(late) in model.config.eos_token_ids
    out = model.generate([[5, 6, 7]], max_new_tokens=20)[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(late) + 1]
    with torch.no_grad():  # HF, with the folder's own generation config
        from transformers import GPT2LMHeadModel

        ref = GPT2LMHeadModel.from_pretrained(src).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20,
                                                            do_sample=False)
    assert ref[0, 3:].tolist() == out.token_ids
    converted = tmp_path / "converted"  # the generation config travels with a converted folder
    assert main(["convert", str(src), str(converted), "--quiet"]) == 0
    assert ej.load_sharded_model(converted).generate([[5, 6, 7]], max_new_tokens=20)[0].token_ids == out.token_ids
    path.write_text(json.dumps({**cfg, "eos_token_id": "x"}))
    with pytest.raises(CheckpointError, match=r"eos_token_id='x' must be a token id >= 0, a list of them"):
        ej.load_sharded_model(src)


def test_a_prompt_at_the_full_context_still_gets_its_token(tiny_gpt2_factory):
    """The last new token is never fed back, so a prompt of the whole context gets one token, and
    L + N - 1 positions are enough for N tokens: greedy tokens equal the logits' argmax."""
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    rng = np.random.default_rng(0)
    for length, new in ((128, 1), (125, 4)):
        prompt = rng.integers(0, 100, length).tolist()
        out = model.generate([prompt], max_new_tokens=new)[0].token_ids
        assert len(out) == new or out[-1] == 100
        teacher = model.logits([(prompt + out)[:128]])[0]
        assert out == teacher[length - 1: length - 1 + len(out), :101].argmax(-1).tolist()


def test_stop_id_counts_never_recompile(tiny_gpt2_factory):
    """stop ids went to the device as an array of their own length: each new count compiled anew."""
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    free = model.generate([[5, 6, 7]], max_new_tokens=12)[0].token_ids
    before = model.compile_counts["generate"]
    for stop in ([free[5]], [free[5], 3], [1, 2, 3, 4, free[5], free[5], 5]):  # duplicates count once
        out = model.generate([[5, 6, 7]], max_new_tokens=12, stop=stop)[0]
        assert out.finish_reason == "stop" and out.token_ids == free[: free.index(free[5]) + 1]
    assert model.compile_counts["generate"] == before


def test_stop_strings_without_a_tokenizer_are_refused(tiny_gpt2_factory):
    """They were dropped without a word (nothing to match them in), while the Server refused them."""
    from energon_jax.serving.scheduler import SamplingOptions, Scheduler

    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    with pytest.raises(ValueError, match=r"stop=\['x'\]: stop strings need a tokenizer") as offline:
        model.generate([[5, 6, 7]], max_new_tokens=4, stop=["x", 9])
    with pytest.raises(ValueError) as served:
        Scheduler(1, context_len=64).add_request([1], SamplingOptions(stop_strings=("x",)))
    assert str(offline.value) == str(served.value)
    assert model.generate([[5, 6, 7]], max_new_tokens=4, stop=[9])[0].token_ids  # token-id stops still work


def test_stop_strings_with_tokenizer(gpt2_with_tokenizer):
    model = ej.load_sharded_model(gpt2_with_tokenizer)
    free = model.generate(["the cat"], max_new_tokens=24)[0]
    assert isinstance(free.text, str) and free.text
    assert free.token_ids and free.finish_reason == "length"
    # choose a stop string that occurs in the free text, after its first character
    stop = free.text[3:6]
    out = model.generate(["the cat"], max_new_tokens=24, stop=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert stop in model.tokenizer.decode(out.token_ids)


class _ByteTokenizer:
    """Token i is byte i: a non-ASCII character spans several tokens."""

    eos_token_id = None

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


def test_text_whose_tokens_lie_past_the_vocabulary_is_refused(gpt2_with_tokenizer, tmp_path):
    """A token added to the tokenizer after training has an id past the model's vocabulary: text
    holding it generated garbage (an embedding lookup out of range) instead of an error."""
    from transformers import AutoTokenizer

    folder = tmp_path / "added"
    shutil.copytree(gpt2_with_tokenizer, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    tok.save_pretrained(folder)
    model = ej.load_sharded_model(folder)
    assert model.generate(["the cat"], max_new_tokens=2)[0].token_ids  # in the vocabulary: fine
    with pytest.raises(ValueError, match=rf"prompts\[1\]: token id {vocab} outside the vocabulary \[0, {vocab}\)"):
        model.generate(["the cat", "<|user|> the cat"], max_new_tokens=2)


def test_non_ascii_stop_string_keeps_the_token_that_completes_it(tiny_gpt2_factory):
    """The tokens kept must decode to text holding the stop string: a prefix ending inside its
    UTF-8 bytes decodes to U+FFFD, as long as the text up to its end, so the length test of the
    old cut kept one token too few (the scheduler's cut_at_stop_string, shared now)."""
    model = ej.load_sharded_model(tiny_gpt2_factory(vocab_size=256, bos_token_id=None, eos_token_id=None)[0])
    model.tokenizer = _ByteTokenizer()
    kwargs = dict(max_new_tokens=48, temperature=1.0)
    free = model.generate(["ab"] * 8, seed=0, **kwargs)  # row i samples as a lone prompt with seed i
    row, stop = next((i, c) for i, o in enumerate(free) for c in o.text if ord(c) > 127 and c != "\ufffd")
    out = model.generate(["ab"], seed=row, stop=[stop], **kwargs)[0]
    assert out.finish_reason == "stop" and out.text == free[row].text[: free[row].text.index(stop)]
    assert out.token_ids == free[row].token_ids[: len(out.token_ids)]
    assert model.tokenizer.decode(out.token_ids).endswith(stop)


def test_bad_input(tiny_gpt2_factory, tmp_path):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder)
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        model.generate([[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"needs 129 positions \(the last new token is not fed back\) > the context of 128"):
        model.generate([[1] * 100], max_new_tokens=30)
    with pytest.raises(ValueError, match="without a tokenizer"):
        model.generate(["hello"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[1, 101]])
    with pytest.raises(ValueError, match="top_p=0"):
        model.generate([[1]], top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k=2147483648 must be an int in \[0, 2147483647\]"):
        model.generate([[1]], temperature=1.0, top_k=2**31)  # past int32: refused, not an OverflowError
    with pytest.raises(TypeError, match="wrap a single prompt"):
        model.generate("hello")
    with pytest.raises(ValueError, match="dtype='int8'"):
        ej.load_sharded_model(folder, dtype="int8")
    with pytest.raises(FileNotFoundError, match="nor a preset"):
        ej.load_sharded_model(tmp_path / "nope")

    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(folder / "config.json", missing)
    with pytest.raises(CheckpointError, match="no weight file"):
        ej.load_sharded_model(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors"):
        ej.load_sharded_model(corrupt)

    for option, value in (("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                          ("activation_function", "relu")):
        bad = tmp_path / f"bad_{option}"
        shutil.copytree(folder, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[option] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedConfigError, match=option):
            ej.load_sharded_model(bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=None), r"temperature=None must be a finite number >= 0"),
    (dict(temperature="0.5"), r"temperature='0.5' must be a finite number >= 0"),
    (dict(temperature=float("inf")), r"temperature=inf must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be a finite number >= 0"),
    (dict(temperature=1e39), r"temperature=1e\+39 must be .* at most 3.403e\+38\)"),  # inf in float32
    (dict(top_p="0.5"), r"top_p='0.5' must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p=nan must be a number in \(0, 1\]"),
    (dict(top_k=True), r"top_k=True must be an int in \[0, 2147483647\]"),
    (dict(top_k=3.0), r"top_k=3.0 must be an int"),
    (dict(max_new_tokens=True), r"max_new_tokens=True must be an int >= 0"),
    (dict(max_new_tokens=2.0), r"max_new_tokens=2.0 must be an int >= 0"),
])
def test_bad_sampling_settings_name_the_value(tiny_gpt2_factory, kwargs, match):
    """None and strings gave raw TypeErrors from comparisons, inf and NaN were taken, and bools
    passed as 1."""
    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    with pytest.raises(ValueError, match=match):
        model.generate([[1, 2]], **kwargs)


def test_numpy_settings_are_taken_and_bools_and_ragged_rows_are_not(tiny_gpt2_factory):
    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    kwargs = dict(max_new_tokens=6, temperature=0.8, seed=4)
    assert (model.generate([[1, 2]], top_k=np.int64(3), top_p=np.float32(0.5), **kwargs)
            == model.generate([[1, 2]], top_k=3, top_p=0.5, **kwargs))
    with pytest.raises(TypeError, match="stop entries must be str or int token ids, got bool True"):
        model.generate([[1, 2]], stop=True)
    assert model.generate([[1, 2]], max_new_tokens=3, stop=np.int64(100))[0].token_ids
    with pytest.raises(ValueError, match=r"token_ids must be a rectangular \[B, T\] int array \(rows of equal length"
                                         r".*got rows of lengths \[2, 1\]"):
        model.logits([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"rectangular \[B, T\].*got shape \(3,\)"):
        model.logits([1, 2, 3])


@pytest.mark.parametrize("stop", [b"\\", {92: "x"}, np.array(5), {5, 6}])
def test_stop_of_another_type_is_refused(tiny_gpt2_factory, stop):
    """stop was iterated whatever it was: b"\\" became the stop token 92 and ended generation at
    its first token, a dict gave its keys, a 0-d array numpy's iteration error."""
    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    with pytest.raises(TypeError, match=rf"stop=.* must be a str, an int token id, or a list of them; got "
                                        rf"{type(stop).__name__}"):
        model.generate([[1, 2]], stop=stop)
    assert model.stop_token_ids(np.array([5, 6]))[0][-2:] == [5, 6]  # a 1-d array is a list of ids


def test_prompts_of_bools_or_not_a_list_are_refused(tiny_gpt2_factory):
    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    with pytest.raises(TypeError, match=r"prompts\[0\] is list; expected str or list\[int\]"):
        model.generate([[True, False, True]])  # was the prompt [1, 0, 1]
    for bad in (None, 5, 3.5):  # was Python's "'NoneType' object is not iterable"
        with pytest.raises(TypeError, match=rf"prompts must be a list of str or a list of token-id lists, got "
                                            rf"{type(bad).__name__}"):
            model.generate(bad)


def test_a_prompt_past_the_context_is_refused_with_max_new_tokens_0(tiny_gpt2_factory):
    model = ej.load_sharded_model(tiny_gpt2_factory()[0])  # 128 positions
    assert model.generate([[1] * 128], max_new_tokens=0)[0].token_ids == []
    with pytest.raises(ValueError, match=r"prompts\[0\] has 129 tokens, more than the context of 128"):
        model.generate([[1] * 129], max_new_tokens=0)  # was let through


def test_pytorch_bin_and_sharded_safetensors(tiny_gpt2_factory, tmp_path):
    folder, hf = tiny_gpt2_factory()
    ids = np.arange(1, 12)[None]
    expected = ej.load_sharded_model(folder).logits(ids)
    (tmp_path / "bin").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # transformers 5 writes only safetensors
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for sub in ("bin", "sharded"):
        np.testing.assert_allclose(ej.load_sharded_model(tmp_path / sub).logits(ids), expected, atol=1e-6)


def test_a_folder_with_stale_shards_or_a_stale_index_reads_what_hf_reads(tiny_gpt2_factory, tmp_path):
    """save_pretrained leaves files of an earlier save: an index beside a new model.safetensors was
    refused (its shards were gone), and a model.safetensors beside new shards was passed over for
    them. Hugging Face reads model.safetensors first; so does the loader."""
    from transformers import GPT2LMHeadModel

    folder, hf = tiny_gpt2_factory()
    _, other = tiny_gpt2_factory(seed=7)
    ids = np.arange(1, 12)[None]
    stale_index = tmp_path / "stale_index"
    other.save_pretrained(stale_index, max_shard_size="20KB")
    hf.save_pretrained(stale_index)  # deletes the shards, keeps the index
    assert (stale_index / "model.safetensors.index.json").is_file()
    stale_single = tmp_path / "stale_single"
    hf.save_pretrained(stale_single)
    other.save_pretrained(stale_single, max_shard_size="20KB")  # leaves model.safetensors as it was
    assert (stale_single / "model.safetensors").is_file()
    for sub in (stale_index, stale_single):
        with torch.no_grad():
            want = GPT2LMHeadModel.from_pretrained(sub).eval()(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(ej.load_sharded_model(sub).logits(ids), want, atol=1e-5)


def test_hf_alias_names_of_the_sizes(tiny_gpt2_factory, tmp_path):
    """HF's GPT2Config takes num_attention_heads (and hidden_size, num_hidden_layers,
    max_position_embeddings) for n_head (...): read as absent, the head count fell back to 12,
    which no tensor shape contradicts, and the logits were wrong."""
    from transformers import GPT2LMHeadModel

    folder, _ = tiny_gpt2_factory()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["n_head"] != 12
    src = tmp_path / "alias"
    shutil.copytree(folder, src)
    aliased = {k: v for k, v in cfg.items() if k not in ("n_head", "n_embd", "n_layer", "n_positions")}
    aliased.update(num_attention_heads=cfg["n_head"], hidden_size=cfg["n_embd"], num_hidden_layers=cfg["n_layer"],
                   max_position_embeddings=cfg["n_positions"])
    (src / "config.json").write_text(json.dumps(aliased))
    ids = np.arange(1, 12)[None]
    with torch.no_grad():
        want = GPT2LMHeadModel.from_pretrained(src).eval()(torch.tensor(ids)).logits.numpy()
    model = ej.load_sharded_model(src)
    assert model.config.n_head == cfg["n_head"]
    np.testing.assert_allclose(model.logits(ids), want, atol=1e-5)
    (src / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": cfg["n_head"] + 2}))
    with pytest.raises(ValueError, match=rf"n_head={cfg['n_head']} and num_attention_heads={cfg['n_head'] + 2} "
                                         "are one setting and disagree"):
        ej.load_sharded_model(src)


def test_bfloat16_load(tiny_gpt2_factory):
    folder, _ = tiny_gpt2_factory()
    model = ej.load_sharded_model(folder, dtype="bfloat16")
    assert str(model.dtype) == "bfloat16"
    ref = ej.load_sharded_model(folder).logits(np.arange(1, 9)[None])
    assert np.abs(model.logits(np.arange(1, 9)[None]) - ref).max() < 0.5
    assert len(model.generate([[1, 2]], max_new_tokens=5)[0].token_ids) == 5
