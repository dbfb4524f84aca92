"""The continuous-batching scheduler with a fake engine (no jax, no model)."""
import threading
import time

import pytest

from energon_jax.serving.scheduler import (EngineOutput, QueueFull, SamplingOptions, Scheduler, SchedulerOutput,
                                           ShuttingDown, Status)


class FakeEngine:
    """Slot s generates prompt[-1] + 1, + 2, ... (so every output names its request)."""

    def __init__(self, num_slots):
        self.next = [None] * num_slots
        self.prefilled = []
        self.decode_calls = []

    def execute(self, out):
        firsts = {}
        for p in out.prefills:
            self.prefilled.append(p.request_id)
            firsts[p.request_id] = p.token_ids[-1] + 1
            self.next[p.slot] = p.token_ids[-1] + 2
        rows = []
        for _ in range(out.decode_steps):
            row = []
            for s, live in enumerate(out.active):
                row.append(self.next[s] if live else -1)
                if live:
                    self.next[s] += 1
            rows.append(row)
        self.decode_calls.append(out.decode_steps)
        return EngineOutput(firsts, rows)


def run(sched, engine, max_iters=100):
    for _ in range(max_iters):
        if not sched.has_work():
            return
        out = sched.schedule()
        sched.update_from_output(out, engine.execute(out))
    raise AssertionError("scheduler did not finish")


def detok(ids):
    return "".join(chr(ord("a") + t % 26) for t in ids)


def make(num_slots=2, **kw):
    kw.setdefault("context_len", 64)
    return Scheduler(num_slots, **kw), FakeEngine(num_slots)


def test_outputs_and_length_stop():
    sched, eng = make(2, decode_step_options=(1, 2, 4))
    reqs = [sched.add_request([10 * (i + 1)], SamplingOptions(max_tokens=5)) for i in range(3)]
    run(sched, eng)
    for i, r in enumerate(reqs):
        base = 10 * (i + 1)
        assert r.output_ids == [base + 1 + k for k in range(5)]
        assert r.finish_reason == "length" and r.status is Status.FINISHED


def test_finished_slot_refilled_next_step_fifo():
    sched, eng = make(2, decode_step_options=(1,))
    short = sched.add_request([1], SamplingOptions(max_tokens=2))
    long = sched.add_request([2], SamplingOptions(max_tokens=6))
    waiting = [sched.add_request([3 + i], SamplingOptions(max_tokens=1)) for i in range(3)]
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [short.request_id, long.request_id]
    sched.update_from_output(out, eng.execute(out))  # prefill + 1 decode step: short is done
    assert short.finished and not long.finished and sched.slots_in_use == 1
    out = sched.schedule()  # its slot goes to the oldest waiting request at once
    assert [p.request_id for p in out.prefills] == [waiting[0].request_id]
    assert out.prefills[0].slot == short.slot
    sched.update_from_output(out, eng.execute(out))
    run(sched, eng)
    assert eng.prefilled == [short.request_id, long.request_id] + [w.request_id for w in waiting]  # FIFO


def test_stop_token_and_stop_string():
    sched, eng = make(2, detokenize=detok)
    # prompt 40 -> 41, 42, 43 ...: stop token 43 is kept in token_ids but not in text
    a = sched.add_request([40], SamplingOptions(max_tokens=10, stop_token_ids=(43,)))
    # prompt 0 -> 1, 2, 3, 4 = "bcde": stop string "cd" cuts text to "b", keeps tokens through "d"
    b = sched.add_request([0], SamplingOptions(max_tokens=10, stop_strings=("cd",)))
    streamed = []
    b.sink = lambda d: streamed.append(d)
    run(sched, eng)
    assert a.output_ids == [41, 42, 43] and a.finish_reason == "stop" and a.text == detok([41, 42])
    assert b.finish_reason == "stop" and b.text == "b" and b.output_ids == [1, 2, 3]
    assert "".join(d.text for d in streamed) == "b"  # the held-back "c" never leaked out
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"


@pytest.mark.parametrize("steps", [(1,), (1, 2, 4, 8)])
def test_several_stop_strings_cut_where_the_first_is_complete(steps):
    """"bcde" starts before "cd" but ends after it: the served cut depended on how many tokens an
    update brought ("b" when "d" came alone, "" when "d" and "e" came together), and offline
    generate's said "". The match that ends first decides, however the tokens come."""
    from energon_jax.engine.sampling import cut_at_stop_string

    sched, eng = make(1, detokenize=detok, decode_step_options=steps)
    req = sched.add_request([0], SamplingOptions(max_tokens=10, stop_strings=("bcde", "cd")))
    run(sched, eng)
    assert (req.text, req.output_ids, req.finish_reason) == ("b", [1, 2, 3], "stop")
    assert cut_at_stop_string([1, 2, 3, 4, 5, 6], detok([1, 2, 3, 4, 5, 6]), ("bcde", "cd"), detok) == ("b", [1, 2, 3])
    # ending together: the one that starts first (the longer)
    assert cut_at_stop_string([1, 2, 3, 4], "bcde", ("de", "cde"), detok) == ("b", [1, 2, 3, 4])


def test_the_cut_finds_its_tokens_in_a_few_decodes():
    """The fewest tokens holding the stop string were searched one prefix at a time from the first:
    a stop at token 2,000 decoded ~2M ids in one engine iteration."""
    from energon_jax.engine.sampling import cut_at_stop_string

    decoded = []

    def counting(ids):
        decoded.append(len(ids))
        return detok(ids)

    body = [0] * 1998 + [1, 2, 3, 4]  # "a" * 1998 + "bcde"
    assert cut_at_stop_string(body, detok(body), ("cd",), counting) == ("a" * 1998 + "b", body[:2001])
    assert sum(decoded) < 20 * len(body), sum(decoded)
    # a tokenizer whose longer prefixes stop holding the text: the bisection's answer fails its
    # check, and the scan from the first token finds the cut
    flaky = lambda ids: detok(ids) if len(ids) <= 2 else "zzz"
    assert cut_at_stop_string([0, 1, 2, 3, 4], "abcde", ("b",), flaky) == ("a", [0, 1])


def test_stop_string_keeps_the_token_that_completes_its_last_character():
    """A token that ends inside a UTF-8 character decodes to U+FFFD: that prefix is as long as the
    text up to the stop string's end without containing it, so the next token is kept as well."""
    sched = Scheduler(1, context_len=64, detokenize=lambda ids: bytes(ids).decode("utf-8", "replace"),
                      decode_step_options=(1, 2, 4))
    streamed = []
    req = sched.add_request([1], SamplingOptions(max_tokens=8, stop_strings=("\u00e9",)), sink=streamed.append)
    out = sched.schedule()
    seq = list("a\u00e9!b".encode())  # a, the two bytes of \u00e9 (0xC3 0xA9), !, b
    sched.update_from_output(out, EngineOutput({req.request_id: seq[0]}, [[t] for t in seq[1: 1 + out.decode_steps]]))
    assert req.finish_reason == "stop" and req.text == "a"
    assert req.output_ids == list("a\u00e9".encode())  # not [a, 0xC3]: its text holds the whole stop string
    assert "".join(d.text for d in streamed) == "a" and sum((d.token_ids for d in streamed), []) == req.output_ids


# ------------------------------------------------ incremental detokenization (Scheduler._text_of)
BPE_CORPUS = ["Un café naïve à Paris, s'il vous plaît.\n", "日本語のテキストと絵文字 🙂🚀 も。\n",
              "The quick brown fox jumps over the lazy dog.\n", "def add(a, b):\n    return a + b  # ½ ≠ π\n",
              "Ünïcödé ñ ß ø € 中文 한국어 🎉👍🏽\n"] * 4


@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE, trained here, whose merges split multibyte characters across tokens."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(BPE_CORPUS, vocab_size=320, min_frequency=1, show_progress=False)
    return tok


class FullDecodeScheduler(Scheduler):
    """The reference: the whole body decoded after every update (the scheduler before the window)."""

    def _text_of(self, req, body):
        return self.detokenize(body)


def stream_through(sched_cls, detokenize, tokens, sizes, stop_strings=()):
    """Feed `tokens` to a fresh scheduler in updates of `sizes` (the prefill brings the first);
    returns (request, every req.text after an update, the streamed deltas)."""
    sched = sched_cls(1, context_len=len(tokens) + 2, detokenize=detokenize)
    deltas = []
    req = sched.add_request([0], SamplingOptions(max_tokens=len(tokens), stop_strings=tuple(stop_strings)),
                            sink=deltas.append)
    out = sched.schedule()
    sched.update_from_output(out, EngineOutput({req.request_id: tokens[0]}))
    texts, i = [req.text], 1
    for k in sizes:
        if req.finished or i >= len(tokens):
            break
        step = SchedulerOutput([], k, [True], {0: req})
        sched.update_from_output(step, EngineOutput({}, [[t] for t in tokens[i: i + k]]))
        texts.append(req.text)
        i += k
    assert req.finished
    return req, texts, deltas


def check_exact(detokenize, tokens, sizes, stop_strings=()):
    """The windowed scheduler gives what decoding the whole body after every update gives; returns
    (its request, its deltas, ids it decoded, ids the reference decoded)."""
    counts = [0, 0]

    def counting(i):
        def decode(ids):
            counts[i] += len(ids)
            return detokenize(ids)
        return decode

    req, texts, deltas = stream_through(Scheduler, counting(0), tokens, sizes, stop_strings)
    ref, ref_texts, ref_deltas = stream_through(FullDecodeScheduler, counting(1), tokens, sizes, stop_strings)
    assert texts == ref_texts
    fields = lambda ds: [(d.text, d.token_ids, d.finished, d.finish_reason) for d in ds]  # noqa: E731
    assert fields(deltas) == fields(ref_deltas)
    assert (req.text, req.output_ids, req.finish_reason) == (ref.text, ref.output_ids, ref.finish_reason)
    if not stop_strings:
        assert req.text == detokenize(req.output_ids) and texts[-1] == req.text
    return req, deltas, counts[0], counts[1]


def random_streams(rng, encode, vocab_size, count):
    """Token streams of real text (multibyte characters split as the BPE splits them) and of random ids
    (bytes that need not form UTF-8), mixed."""
    words = " ".join(BPE_CORPUS).split()
    for _ in range(count):
        if rng.random() < 0.5:
            ids = encode(" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))))
        else:
            ids = [rng.randrange(vocab_size) for _ in range(rng.randint(5, 80))]
        if rng.random() < 0.5:  # a random stretch spliced into real text
            ids[rng.randrange(len(ids)):0] = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 6))]
        yield ids


def random_sizes(rng, n):
    return [rng.randint(1, 8) for _ in range(n)]


def test_windowed_text_equals_the_full_decode_through_a_byte_level_bpe(bpe):
    import random

    rng = random.Random(0)
    decode, vocab = bpe.decode, bpe.get_vocab_size()
    decoded = full = 0
    for ids in random_streams(rng, lambda s: bpe.encode(s).ids, vocab, 300):
        stops = ()
        if rng.random() < 0.5:  # stop strings taken from the stream's text, so that most of them hit
            text = decode(ids).replace("\ufffd", "")
            starts = [rng.randrange(max(1, len(text))) for _ in range(rng.randint(1, 3))]
            stops = tuple(dict.fromkeys(text[a: a + rng.randint(1, 3)] for a in starts if text[a: a + 1]))
        req, deltas, windowed, reference = check_exact(decode, ids, random_sizes(rng, len(ids)), stops)
        assert "".join(d.text for d in deltas) == req.text  # a byte-level BPE never changes earlier text
        decoded, full = decoded + windowed, full + reference
    assert decoded < 0.7 * full  # the window was used, not only the fallback


def non_concatenative_detokenizers():
    """Ids 0-25 are letters, 26 a space, 27 a period, 28 an empty text; made non-concatenative by a
    rule on the whole text, each of which the window check must catch."""
    def base(ids):
        return "".join({26: " ", 27: ".", 28: ""}.get(t, chr(ord("a") + t % 26)) for t in ids)

    def merged(ids):  # "q" then "u" (adjacent ids 16, 20) is one character
        return base(ids).replace("qu", "\u01eb")

    return {
        "strips leading spaces": lambda ids: base(ids).lstrip(" "),
        "pair to one character": merged,
        "space clean-up": lambda ids: base(ids).replace(" .", ".").replace(" q", "Q"),
        "capitalized start": lambda ids: base(ids)[:1].upper() + base(ids)[1:],
    }


@pytest.mark.parametrize("name", list(non_concatenative_detokenizers()))
def test_a_detokenizer_that_is_not_concatenative_still_gives_the_full_decode(name):
    import random

    detokenize = non_concatenative_detokenizers()[name]
    rng = random.Random(1)
    weights = [1] * 26 + [8, 3, 2]  # many spaces, periods and empty texts around the letters
    weights[16] = weights[20] = 6
    for _ in range(300):
        ids = rng.choices(range(29), weights, k=rng.randint(2, 60))
        stops = rng.choice([(), (".",), ("Q", " a"), (detokenize(ids[3:5]),)])
        check_exact(detokenize, ids, random_sizes(rng, len(ids)), tuple(s for s in stops if s))


@pytest.mark.parametrize("steps", [(1,), (1, 2, 4, 8, 16)])
def test_decode_work_grows_with_the_tokens_not_their_square(steps):
    """Decoding the whole output after every update cost n^2 / 2 ids over n tokens (45,150 for 300
    tokens a token at a time); the window decodes each token a few times."""
    decoded = []

    def counting(ids):
        decoded.append(len(ids))
        return detok(ids)

    n = 300
    sched, eng = make(1, detokenize=counting, decode_step_options=steps, context_len=n + 2)
    req = sched.add_request([0], SamplingOptions(max_tokens=n))
    run(sched, eng, max_iters=n + 1)
    assert len(req.output_ids) == n and req.text == detok(req.output_ids)
    assert sum(decoded) <= 4 * n, sum(decoded)


def test_decode_steps_stop_where_a_waiting_request_can_enter():
    sched, eng = make(1, decode_step_options=(1, 2, 4, 8))
    first = sched.add_request([1], SamplingOptions(max_tokens=4))
    sched.add_request([2], SamplingOptions(max_tokens=20))
    out = sched.schedule()
    # first has 3 tokens left after its prefill and someone waits: 2 steps (no slot-step wasted), not 8
    assert out.decode_steps == 2
    sched.update_from_output(out, eng.execute(out))
    run(sched, eng)
    assert first.output_ids == [2, 3, 4, 5]
    # then nobody waits: the fewest dispatches that finish the 19 tokens left (8 + 8 + 4, not 8 + 8 + 8)
    assert eng.decode_calls == [2, 1, 8, 8, 4]


def test_cancel_frees_slot_and_ends_stream():
    sched, eng = make(1)
    deltas = []
    a = sched.add_request([1], SamplingOptions(max_tokens=50), sink=deltas.append)
    b = sched.add_request([5], SamplingOptions(max_tokens=3))
    out = sched.schedule()
    sched.update_from_output(out, eng.execute(out))
    assert sched.cancel(a.request_id)
    assert not sched.cancel(a.request_id)  # already finished
    assert deltas[-1].finished and deltas[-1].finish_reason == "cancelled"
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [b.request_id] and out.prefills[0].slot == a.slot
    sched.update_from_output(out, eng.execute(out))
    run(sched, eng)
    assert b.output_ids == [6, 7, 8]


def test_cancel_waiting_and_in_flight_output_is_dropped():
    sched, eng = make(1)
    a = sched.add_request([1], SamplingOptions(max_tokens=50))
    b = sched.add_request([9], SamplingOptions(max_tokens=2))
    sched.cancel(b.request_id)
    assert b.finish_reason == "cancelled" and sched.queue_depth == 1  # only a waits
    out = sched.schedule()
    result = eng.execute(out)
    sched.cancel(a.request_id)  # cancelled while its step was on the device
    sched.update_from_output(out, result)
    assert a.output_ids == [] and sched.slots_in_use == 0 and not sched.has_work()


def test_queue_bound_and_shutdown():
    sched, eng = make(2, max_queue=3)
    for i in range(5):  # 2 take the free slots, 3 wait
        sched.add_request([i + 1], SamplingOptions(max_tokens=2))
    with pytest.raises(QueueFull) as e:
        sched.add_request([1], SamplingOptions(max_tokens=2))
    assert e.value.retry_after >= 1
    run(sched, eng)
    sched.add_request([1], SamplingOptions(max_tokens=2))  # room again
    sched.stop_accepting()
    with pytest.raises(ShuttingDown):
        sched.add_request([1], SamplingOptions(max_tokens=2))
    sched.fail_all()
    assert not sched.has_work()


def test_deadline_expires_waiting_and_running():
    now = [0.0]
    sched, eng = make(1, clock=lambda: now[0])
    a = sched.add_request([1], SamplingOptions(max_tokens=50), timeout=5)
    b = sched.add_request([2], SamplingOptions(max_tokens=50), timeout=1)
    out = sched.schedule()
    sched.update_from_output(out, eng.execute(out))
    now[0] = 2.0
    sched.schedule()
    assert b.finish_reason == "timeout" and not a.finished
    now[0] = 6.0
    sched.schedule()
    assert a.finish_reason == "timeout" and a.output_ids and sched.slots_in_use == 0


def test_time_per_output_token_stops_at_the_last_token():
    """TPOT counted a cancelled or timed-out request's idle time after its last token as time
    between its tokens."""
    from energon_jax.serving.metrics import Metrics

    now = [0.0]
    sched, eng = make(1, clock=lambda: now[0], decode_step_options=(1,))
    metrics = Metrics()
    sched.on_finish = metrics.record_finished
    req = sched.add_request([1], SamplingOptions(max_tokens=50))
    for t in (1.0, 2.0, 3.0):  # the prefill's token and a decode step's at 1 s, then one a second
        now[0] = t
        out = sched.schedule()
        sched.update_from_output(out, eng.execute(out))
    now[0] = 100.0
    assert sched.cancel(req.request_id) and len(req.output_ids) == 4
    tpot = metrics.registry.get_sample_value("energon_time_per_output_token_seconds_sum")
    assert tpot == pytest.approx(2 / 3), tpot  # (3 - 1) s over 3 gaps, not (100 - 1) / 3
    assert metrics.registry.get_sample_value("energon_request_latency_seconds_sum") == pytest.approx(100.0)


def test_bad_requests():
    sched, _ = make(1, context_len=16)
    with pytest.raises(ValueError, match="empty"):
        sched.add_request([], SamplingOptions())
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request([1], SamplingOptions(max_tokens=0))
    with pytest.raises(ValueError, match="needs 17 positions .* > the context of 16"):
        sched.add_request([1] * 10, SamplingOptions(max_tokens=8))
    sched.add_request([1] * 10, SamplingOptions(max_tokens=7))  # 16 positions: the 7th token is not fed back
    with pytest.raises(ValueError, match="token-id mode"):
        sched.add_request([1], SamplingOptions(max_tokens=2, stop_strings=("x",)))
    with pytest.raises(ValueError, match="top_k=2147483648"):  # past int32: refused before the engine sees it
        sched.add_request([1], SamplingOptions(max_tokens=2, temperature=0.5, top_k=2**31))


def test_prefill_budget_grows_as_fewer_requests_run():
    sched, eng = make(8, max_prefill_tokens=10, decode_step_options=(1,))
    assert sched.prefill_budget(0) == float("inf")
    assert sched.prefill_budget(8) == 10 and sched.prefill_budget(2) == 40
    # nothing runs: every waiting request that has a slot is admitted, whatever its length
    first = [sched.add_request([1] * 30, SamplingOptions(max_tokens=20)) for _ in range(4)]
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [r.request_id for r in first]
    sched.update_from_output(out, eng.execute(out))
    # four of eight run: budget 10 * 8 / 4 = 20 tokens, two 8-token prompts fit, the third waits
    later = [sched.add_request([2] * 8, SamplingOptions(max_tokens=20)) for _ in range(3)]
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [later[0].request_id, later[1].request_id]
    assert later[2].status is Status.WAITING
    sched.update_from_output(out, eng.execute(out))
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [later[2].request_id]



# ---------------------------------------------------------------- overlapped schedule / update
def run_overlapped(sched, engine, max_iters=200):
    """The engine loop's overlap: iteration n+1 is scheduled and run before n's output is applied."""
    pending = None
    for _ in range(max_iters):
        if not sched.has_work() and pending is None:
            return
        out = sched.schedule()
        result = None if out.empty else engine.execute(out)
        if pending is not None:
            sched.update_from_output(*pending)
        pending = None if out.empty else (out, result)
    raise AssertionError("scheduler did not finish")


def mixed_requests(sched):
    return [sched.add_request([40], SamplingOptions(max_tokens=10, stop_token_ids=(43,))),
            sched.add_request([0], SamplingOptions(max_tokens=12, stop_strings=("cd",))),
            sched.add_request([5], SamplingOptions(max_tokens=1)),
            sched.add_request([7], SamplingOptions(max_tokens=9)),
            sched.add_request([60], SamplingOptions(max_tokens=3)),
            sched.add_request([90], SamplingOptions(max_tokens=20, stop_token_ids=(101,)))]


def test_overlapped_updates_give_the_same_outputs():
    results = []
    for runner in (run, run_overlapped):
        sched, eng = make(2, detokenize=detok, decode_step_options=(1, 2, 4, 8))
        reqs = mixed_requests(sched)
        streamed = {r.request_id: [] for r in reqs}
        for r in reqs:
            r.sink = lambda d, rid=r.request_id: streamed[rid].append(d)
        runner(sched, eng)
        assert not sched.has_work() and sched.slots_in_use == 0
        results.append([(r.output_ids, r.text, r.finish_reason, [t for d in streamed[r.request_id] for t in d.token_ids])
                        for r in reqs])
    assert results[0] == results[1]
    assert results[0][2][0] == [6] and results[0][0][0] == [41, 42, 43]
    assert all(out == ids for out, _, _, ids in results[0])  # the stream carries exactly the kept tokens


def test_on_tokens_counts_the_tokens_requests_keep():
    """Not the tokens computed: steps past max_tokens, tokens after a stop token or string, and a
    dispatch that arrives after its request stopped are not counted."""
    sched, eng = make(2, detokenize=detok, decode_step_options=(1, 2, 4, 8))
    counted = []
    sched.on_tokens = counted.append
    reqs = mixed_requests(sched)
    run_overlapped(sched, eng)
    assert sum(counted) == sum(len(r.output_ids) for r in reqs) == 3 + 3 + 1 + 9 + 3 + 11


def test_slot_with_all_tokens_scheduled_is_refilled_before_they_arrive():
    sched, eng = make(1, decode_step_options=(1, 2, 4))
    a = sched.add_request([1], SamplingOptions(max_tokens=3))
    b = sched.add_request([20], SamplingOptions(max_tokens=2))
    out1 = sched.schedule()  # a: prefill + 2 decode steps = all 3 of its tokens
    assert out1.decode_steps == 2 and a.scheduled == 3
    res1 = eng.execute(out1)
    out2 = sched.schedule()  # before a's tokens are back, b takes the slot
    assert [p.request_id for p in out2.prefills] == [b.request_id] and out2.prefills[0].slot == a.slot
    assert not out2.active[a.slot] or out2.slot_requests[a.slot] is b
    res2 = eng.execute(out2)
    sched.update_from_output(out1, res1)  # a finishes; b keeps the slot
    assert a.output_ids == [2, 3, 4] and a.finish_reason == "length" and sched.slots[b.slot] is b
    sched.update_from_output(out2, res2)
    run(sched, eng)
    assert b.output_ids == [21, 22]


def test_stop_token_found_late_drops_the_extra_dispatch():
    sched, eng = make(1, decode_step_options=(1, 2))
    a = sched.add_request([1], SamplingOptions(max_tokens=10, stop_token_ids=(3,)))
    out1 = sched.schedule()
    res1 = eng.execute(out1)  # tokens 2, 3, 4: the stop token is on the way
    out2 = sched.schedule()  # not known yet: a decodes 2 more steps
    res2 = eng.execute(out2)
    sched.update_from_output(out1, res1)
    assert a.finished and a.output_ids == [2, 3] and sched.slots_in_use == 0
    sched.update_from_output(out2, res2)  # a has finished: these tokens are dropped
    assert a.output_ids == [2, 3] and not sched.has_work()


def test_a_slot_free_at_the_next_dispatch_admits_a_request_without_a_queue():
    """max_queue=0: a slot whose occupant has all its tokens scheduled goes to a waiting request at
    the next schedule(), so admission counts it free (it answered QueueFull one dispatch early);
    one slot frees, so only one request is admitted (no overcommit)."""
    sched, eng = make(1, max_queue=0, decode_step_options=(1, 2))
    a = sched.add_request([1], SamplingOptions(max_tokens=3))
    out1 = sched.schedule()  # a: prefill + 2 decode steps, all 3 of its tokens on the way
    assert a.scheduled == 3 and sched.slots[a.slot] is a
    res1 = eng.execute(out1)
    b = sched.add_request([20], SamplingOptions(max_tokens=5))
    with pytest.raises(QueueFull):
        sched.add_request([30], SamplingOptions(max_tokens=2))
    out2 = sched.schedule()
    assert [p.request_id for p in out2.prefills] == [b.request_id] and out2.prefills[0].slot == a.slot
    res2 = eng.execute(out2)
    assert b.scheduled == 3
    with pytest.raises(QueueFull):  # b has tokens left to schedule: its slot is not free
        sched.add_request([30], SamplingOptions(max_tokens=2))
    sched.update_from_output(out1, res1)
    sched.update_from_output(out2, res2)
    run(sched, eng)
    assert a.output_ids == [2, 3, 4] and b.output_ids == [21, 22, 23, 24, 25]


class FakeLaunchExecutor(FakeEngine):
    """launch / collect as the slot executor: outputs come back one call later, in order."""

    def __init__(self, num_slots):
        super().__init__(num_slots)
        self.in_flight = self.most_in_flight = 0

    def launch(self, out):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return self.execute(out)

    def collect(self, launched):
        self.in_flight -= 1
        return launched

    def reset(self):
        pass


@pytest.mark.parametrize("overlap", [True, False])
def test_engine_loop_overlapped_and_not(overlap):
    from energon_jax.serving.loop import EngineLoop

    sched = Scheduler(2, context_len=64, detokenize=detok, decode_step_options=(1, 2, 4, 8))
    executor = FakeLaunchExecutor(2)
    reqs = mixed_requests(sched)
    loop = EngineLoop(sched, executor, overlap=overlap)
    loop.start()
    try:
        for r in reqs:
            for _ in range(500):
                if r.finished:
                    break
                time.sleep(0.01)
        assert all(r.finished for r in reqs)
    finally:
        loop.stop()
    reference, eng = make(2, detokenize=detok, decode_step_options=(1, 2, 4, 8))
    expected = mixed_requests(reference)
    run(reference, eng)
    assert [(r.output_ids, r.finish_reason) for r in reqs] == [(r.output_ids, r.finish_reason) for r in expected]
    assert executor.most_in_flight == (2 if overlap else 0)


def wait_until(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)
    return condition()


class FailingExecutor(FakeLaunchExecutor):
    """Fails any step that prefills the prompt [666]; its reset wipes every slot's state, as the
    slot engine's does."""

    def __init__(self, num_slots):
        super().__init__(num_slots)
        self.resets = 0

    def execute(self, out):
        if any(p.token_ids == [666] for p in out.prefills):
            raise RuntimeError("device fault")
        return super().execute(out)

    def reset(self):
        self.resets += 1
        self.next = [0] * len(self.next)


@pytest.mark.parametrize("overlap", [True, False])
def test_engine_failure_ends_every_request_whose_state_the_reset_wiped(overlap):
    from energon_jax.serving.loop import EngineLoop

    # a frozen clock inside a long burst window: decode stays held, so a is in no dispatch after its prefill
    sched = Scheduler(3, context_len=64, prefill_window=100.0, burst_gap=100.0, clock=lambda: 0.0)
    executor = FailingExecutor(3)
    loop = EngineLoop(sched, executor, overlap=overlap)
    loop.start()
    try:
        a = sched.add_request([1], SamplingOptions(max_tokens=20))
        assert wait_until(lambda: a.output_ids == [2])
        b = sched.add_request([666], SamplingOptions(max_tokens=4))
        assert wait_until(lambda: b.finished and a.finished)
        # _fail ends the requests before it resets the executor: wait for the reset too
        assert wait_until(lambda: executor.resets == 1)
        assert loop.alive and executor.resets == 1
    finally:
        loop.stop()
    assert b.finish_reason == "error" and b.error == "engine error: RuntimeError: device fault"
    # a was not in the failed step, but the reset wiped its cache: it ends instead of decoding garbage
    assert a.finish_reason == "error" and "decode state was lost" in a.error and a.output_ids == [2]


class GatedExecutor(FakeLaunchExecutor):
    """The first launch that prefills `hold_prompt` waits for `resume`; the first collect sets
    `collecting`, then waits for `release` (and raises if `fail`): the test acts while a dispatch's
    tokens are on the way."""

    def __init__(self, num_slots, hold_prompt=None, fail=False):
        super().__init__(num_slots)
        self.hold_prompt, self.fail = hold_prompt, fail
        self.launching, self.resume = threading.Event(), threading.Event()
        self.collecting, self.release = threading.Event(), threading.Event()

    def launch(self, out):
        if self.hold_prompt is not None and any(p.token_ids == self.hold_prompt for p in out.prefills):
            self.hold_prompt = None
            self.launching.set()
            assert self.resume.wait(10)
        return super().launch(out)

    def collect(self, launched):
        if not self.collecting.is_set():
            self.collecting.set()
            assert self.release.wait(10)
            if self.fail:
                raise RuntimeError("device fault")
        return super().collect(launched)


def test_drain_waits_for_the_tokens_of_a_request_whose_slot_was_reused():
    """a's only token is on the way when b takes its slot and is cancelled: no slot and no queue
    hold a then, but its token is still to be delivered, so a drain waits for it (it ended at once,
    and the stop that follows a drain failed a with "the server stopped")."""
    from energon_jax.serving.loop import EngineLoop

    sched = Scheduler(1, context_len=64)
    executor = GatedExecutor(1, hold_prompt=[1])
    loop = EngineLoop(sched, executor)
    loop.start()
    try:
        a = sched.add_request([1], SamplingOptions(max_tokens=1))
        assert executor.launching.wait(10)  # a's prefill is being dispatched; the next schedule() follows
        b = sched.add_request([20], SamplingOptions(max_tokens=5))
        executor.resume.set()
        assert executor.collecting.wait(10)  # b was dispatched into a's slot; a's token is not back
        assert sched.slots[a.slot] is b and sched.cancel(b.request_id)
        assert not a.finished and sched.has_work()
        assert not loop.drain(0.05)  # a's token cannot arrive while the gate is shut
        executor.release.set()
        assert loop.drain(10)
    finally:
        executor.resume.set()
        executor.release.set()
        loop.stop()
    assert a.finish_reason == "length" and a.output_ids == [2]


def test_an_engine_failure_ends_the_request_in_the_step_not_a_later_one_with_its_id():
    """A request id is free again once its request finished: a failed step ends the requests that
    were in it, not the waiting request that took the id since (it was cancelled by id)."""
    from energon_jax.serving.loop import EngineLoop

    sched = Scheduler(1, context_len=64)
    executor = GatedExecutor(1, fail=True)
    loop = EngineLoop(sched, executor)
    loop.start()
    try:
        a = sched.add_request([1], SamplingOptions(max_tokens=20), request_id="x")
        assert executor.collecting.wait(10)  # a's first dispatch is on the way, and will fail
        assert sched.cancel("x")
        done = threading.Event()
        b = sched.add_request([50], SamplingOptions(max_tokens=3), request_id="x",
                              sink=lambda d: d.finished and done.set())
        executor.release.set()
        assert done.wait(10)
    finally:
        executor.release.set()
        loop.stop()
    assert a.finish_reason == "cancelled"
    assert b.finish_reason == "length" and b.output_ids == [51, 52, 53]


def test_an_error_outside_the_engine_calls_ends_the_loop_and_every_request(monkeypatch):
    from energon_jax.serving.loop import EngineLoop

    sched = Scheduler(1, context_len=64)
    loop = EngineLoop(sched, FakeLaunchExecutor(1))

    def broken(out, result):
        raise KeyError("bug")

    monkeypatch.setattr(sched, "update_from_output", broken)
    loop.start()
    try:
        reqs = [sched.add_request([i + 1], SamplingOptions(max_tokens=4)) for i in range(3)]  # 1 runs, 2 wait
        assert wait_until(lambda: not loop.alive)
        assert loop.failure == "KeyError: 'bug'"
        assert all(r.finish_reason == "error" and "the engine loop stopped: KeyError" in r.error for r in reqs)
        with pytest.raises(ShuttingDown):  # nobody would serve it
            sched.add_request([1], SamplingOptions(max_tokens=4))
    finally:
        loop.stop()


def test_admission_delay_gathers_a_burst_while_idle():
    now = [0.0]
    sched, eng = make(4, batch_wait=0.02, arrival_gap=0.002, clock=lambda: now[0])
    assert sched.admission_delay() == 0.0  # nothing waits
    sched.add_request([1], SamplingOptions(max_tokens=4))
    assert sched.admission_delay() == pytest.approx(0.002)  # a lone request waits one gap
    for t in (0.001, 0.002):  # arrivals keep coming: the wait follows the last one
        now[0] = t
        sched.add_request([2], SamplingOptions(max_tokens=4))
        assert sched.admission_delay() == pytest.approx(0.002)
    now[0] = 0.003
    sched.add_request([2], SamplingOptions(max_tokens=4))
    assert sched.admission_delay() == 0.0  # 4 waiting fill the 4 slots: no reason to wait
    out = sched.schedule()
    assert len(out.prefills) == 4
    sched.update_from_output(out, eng.execute(out))
    assert sched.slots_in_use == 4
    sched.add_request([3], SamplingOptions(max_tokens=4))
    assert sched.admission_delay() == 0.0  # requests run: a newcomer is not held back
    run(sched, eng)
    # a steady trickle is held at most batch_wait after the oldest arrival
    now[0] = 1.0
    sched.add_request([4], SamplingOptions(max_tokens=4))
    now[0] = 1.019
    sched.add_request([5], SamplingOptions(max_tokens=4))
    assert sched.admission_delay() == pytest.approx(0.001)
    now[0] = 1.0205
    assert sched.admission_delay() == 0.0
    with pytest.raises(ValueError, match="batch_wait"):
        Scheduler(2, context_len=8, batch_wait=-1)
    assert Scheduler(2, context_len=8).admission_delay() == 0.0


def test_prefill_window_holds_decode_while_a_burst_arrives():
    now = [0.0]
    sched, eng = make(4, decode_step_options=(1, 2, 4), prefill_window=0.05, burst_gap=0.01,
                      clock=lambda: now[0])
    a = sched.add_request([1], SamplingOptions(max_tokens=4))
    out = sched.schedule()  # an idle engine admits a: the burst starts, decode is held
    assert len(out.prefills) == 1 and out.decode_steps == 0
    sched.update_from_output(out, eng.execute(out))
    assert a.output_ids == [2]  # the prefill's token streams at once
    assert sched.admission_delay() == pytest.approx(0.01)  # nobody waits: sleep until the gap ends
    now[0] = 0.008
    b = sched.add_request([5], SamplingOptions(max_tokens=4))
    assert sched.admission_delay() == 0.0  # a newcomer is prefilled at once, still without decode
    out = sched.schedule()
    assert [p.request_id for p in out.prefills] == [b.request_id] and out.decode_steps == 0
    sched.update_from_output(out, eng.execute(out))
    now[0] = 0.0185  # 10.5 ms since the last arrival: the burst is over, decode runs for both
    out = sched.schedule()
    assert out.decode_steps == 4 and sum(out.active) == 2  # 3 tokens left each: one dispatch of 4
    sched.update_from_output(out, eng.execute(out))
    run(sched, eng)
    assert a.output_ids == [2, 3, 4, 5] and b.output_ids == [6, 7, 8, 9]

    # the hold ends after prefill_window even if arrivals keep coming, or once the slots are full
    now[0] = 1.0
    first = sched.add_request([1], SamplingOptions(max_tokens=8))
    sched.update_from_output(out := sched.schedule(), eng.execute(out))
    for t in (1.009, 1.018):
        now[0] = t
        sched.add_request([1], SamplingOptions(max_tokens=8))
        out = sched.schedule()
        assert out.decode_steps == 0 and len(out.prefills) == 1
        sched.update_from_output(out, eng.execute(out))
    now[0] = 1.027
    sched.add_request([1], SamplingOptions(max_tokens=8))
    out = sched.schedule()  # the 4th request fills the slots: it is prefilled and all decode
    assert len(out.prefills) == 1 and out.decode_steps > 0 and all(out.active)
    sched.update_from_output(out, eng.execute(out))
    run(sched, eng)
    assert first.finished and len(first.output_ids) == 8

    now[0] = 0.0
    short, eng = make(4, prefill_window=0.015, burst_gap=0.01, clock=lambda: now[0])
    short.add_request([1], SamplingOptions(max_tokens=8))
    short.update_from_output(out := short.schedule(), eng.execute(out))
    now[0] = 0.009
    short.add_request([1], SamplingOptions(max_tokens=8))
    short.update_from_output(out := short.schedule(), eng.execute(out))
    assert out.decode_steps == 0
    now[0] = 0.016  # 7 ms after the last arrival, but past the 15 ms window: decode
    assert short.admission_delay() == 0.0 and short.schedule().decode_steps > 0
    with pytest.raises(ValueError, match="prefill_window"):
        Scheduler(2, context_len=8, prefill_window=-1)
    off, eng2 = make(2)  # off by default: the first iteration decodes
    off.add_request([1], SamplingOptions(max_tokens=4))
    assert off.schedule().decode_steps > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_slots=2.5), r"num_slots=2.5 must be an int >= 1"),  # passed `< 1`, then [None] * 2.5 raised TypeError
    (dict(num_slots=True), r"num_slots=True must be an int >= 1"),  # was taken as 1 slot
    (dict(num_slots=0), r"num_slots=0 must be an int >= 1"),
    (dict(num_slots="4"), r"num_slots='4' must be an int >= 1"),  # a TypeError from `<` before
    (dict(max_queue=2.5), r"max_queue=2.5 must be an int >= 0"),  # a queue of 2.5 requests was accepted
    (dict(max_queue=True), r"max_queue=True must be an int >= 0"),
    (dict(max_queue=-1), r"max_queue=-1 must be an int >= 0"),
    (dict(context_len=16.0), r"context_len=16.0 must be an int >= 1"),
    (dict(max_prefill_tokens=True), r"max_prefill_tokens=True must be an int >= 1"),
])
def test_slot_and_queue_sizes_must_be_ints(kwargs, match):
    """Scheduler is public: its sizes are checked as Server checks max_batch_size and max_queue."""
    import numpy as np

    kw = {**dict(num_slots=2, context_len=16), **kwargs}
    with pytest.raises(ValueError, match=match):
        Scheduler(kw.pop("num_slots"), **kw)
    sched = Scheduler(np.int64(3), max_queue=np.int32(0), context_len=16)  # numpy ints are ints
    assert (sched.num_slots, sched.max_queue, len(sched.slots)) == (3, 0, 3)
    assert type(sched.num_slots) is int and type(sched.max_queue) is int
