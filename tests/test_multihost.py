"""Several hosts, for real: two processes on the loopback, 4 CPU devices each, joined by
`ej.initialize_distributed` (gloo collectives), load one checkpoint over the 8 global devices and
must return exactly what one process with 8 devices returns.

The same file is the worker: `python tests/test_multihost.py SPEC_JSON OUT_JSON` with the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment set.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
WORKER_TIMEOUT_S = 120  # a worker takes ~15 s on 2 idle cores; a hang is cut off and its stderr shown
# One layout each, as compiles cost most of the time: GPT's data axis crosses the hosts (each
# process holds 2 replicas of tp=2), Bert's stage axis does (a cross-process ppermute inside the step).
GPT_LAYOUT = dict(tp=2, dp=4)
BERT_LAYOUT = dict(tp=4, pp=2)
# A converted GPT folder loads with its stage axis across the hosts too: each process holds one
# stage, and Orbax reads only that stage's layers there.
GPT_PP_LAYOUT = dict(tp=4, pp=2)
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [42], [5, 6]]
TEXTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [3]]  # Bert token ids (no tokenizer)
MAX_NEW = 10


# ---------------------------------------------------------------------------------------- worker
def _worker(spec_path: str, out_path: str) -> None:
    import jax

    import energon_jax as ej

    spec = json.loads(Path(spec_path).read_text())
    ej.initialize_distributed()  # everything from the environment
    pid = jax.process_index()
    address = os.environ["JAX_COORDINATOR_ADDRESS"]
    ej.initialize_distributed(address, NUM_PROCESSES, pid)  # again, the same: nothing happens
    out = {"process_index": pid, "process_count": jax.process_count(), "device_count": jax.device_count(),
           "local_device_count": jax.local_device_count()}
    try:
        ej.initialize_distributed(address, NUM_PROCESSES, 1 - pid)
    except RuntimeError as e:
        out["rejoin_error"] = str(e)
    try:
        ej.make_mesh(dp=3)
    except ValueError as e:
        out["mesh_error"] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ej.make_mesh(tp=8)  # a tensor group over both hosts works, with a warning
    out["mesh_warnings"] = [str(w.message) for w in caught]
    mesh = ej.make_mesh(tp=2, dp=4)
    out["tensor_groups_processes"] = [sorted({d.process_index for d in group}) for group in
                                      mesh.devices.reshape(-1, mesh.shape["tensor"])]
    model = ej.load_sharded_model(spec["gpt"], **GPT_LAYOUT)
    out["gpt"] = _gpt_results(model)
    per_device = model.param_bytes_per_device()  # all 8 devices, in the mesh's order
    out["weight_bytes"] = [per_device.get(d) for d in model.mesh.devices.flat]
    out["memory_report_lines"] = len(model.memory_report().splitlines())
    # a random seed is drawn on process 0 and used by all (same shapes as above: no new compile)
    out["unseeded"] = [o.token_ids for o in model.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0)]
    try:  # different prompts on each process: an error on both, not a hang
        model.generate([PROMPTS[0][:-1] + [pid]] + PROMPTS[1:], max_new_tokens=MAX_NEW)
    except ValueError as e:
        out["mismatch_error"] = str(e)
    # a folder written by `energon convert`: Orbax restores each process's shards
    converted = ej.load_sharded_model(spec["converted"], **GPT_LAYOUT)
    out["converted_greedy"] = [o.token_ids for o in converted.generate(PROMPTS, max_new_tokens=MAX_NEW)]
    out["bert"] = _bert_results(ej.load_sharded_model(spec["bert"], **BERT_LAYOUT))
    # converted folders with pp=2, one stage per process (Bert: the same program as above)
    staged = ej.load_sharded_model(spec["converted"], **GPT_PP_LAYOUT)
    out["converted_pp"] = _greedy_and_logits(staged)
    qkv = staged.params["h"]["blocks"]["attn"]["qkv_kernel"]
    out["converted_pp_layers"] = sorted({s.index[0].indices(qkv.shape[0]) for s in qkv.addressable_shards})
    out["bert_converted_pp"] = _bert_results(ej.load_sharded_model(spec["bert_converted"], **BERT_LAYOUT))
    Path(out_path).write_text(json.dumps(out))


def _gpt_results(model) -> dict:
    """What the test compares (lists, so JSON carries them exactly). Every call has one batch
    shape: one generate and one forward program."""
    greedy = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    sampled = model.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, top_k=5, seed=3)
    logits = model.logits([p + [0] * (5 - len(p)) for p in PROMPTS])
    return {"greedy": [o.token_ids for o in greedy], "reasons": [o.finish_reason for o in greedy],
            "sampled": [o.token_ids for o in sampled], "logits": logits.tolist()}


def _greedy_and_logits(model) -> dict:
    greedy = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    logits = model.logits([p + [0] * (5 - len(p)) for p in PROMPTS])
    return {"greedy": [o.token_ids for o in greedy], "logits": logits.tolist()}


def _bert_results(model) -> list:
    return [x.tolist() for x in model.encode(TEXTS, pooling="none")]  # every token's last hidden state


# ---------------------------------------------------------------------------------------- tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, spec: dict) -> list:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    procs = []
    for pid in range(NUM_PROCESSES):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "ENERGON_JAX_CACHE_DIR": "off",
               "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"]),
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
               "JAX_PROCESS_ID": str(pid), "PYTHONPATH": str(Path(__file__).parents[1])}
        procs.append(subprocess.Popen([sys.executable, __file__, str(spec_path), str(tmp_path / f"out{pid}.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _collect(tmp_path, procs) -> list[dict]:
    logs, failed = [], False
    for pid, p in enumerate(procs):
        try:
            stdout, stderr = p.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            stdout, stderr = p.communicate()
            stderr += f"\n[timed out after {WORKER_TIMEOUT_S} s]"
        failed |= p.returncode != 0
        stdout = re.sub(r"\[Gloo\][^\[\n]*\n?", "", stdout)  # gloo's connection chatter
        logs.append(f"--- process {pid} (exit {p.returncode}) stdout:\n{stdout[-3000:]}\n--- stderr:\n{stderr[-6000:]}")
    if failed:
        pytest.fail("a worker failed:\n" + "\n".join(logs), pytrace=False)
    return [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(NUM_PROCESSES)]


def _hf_greedy(hf, prompt, n):
    import torch

    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_two_processes_equal_one(tiny_gpt2_factory, tiny_bert_factory, tmp_path):
    import energon_jax as ej

    gpt_folder, hf = tiny_gpt2_factory()
    bert_folder, _ = tiny_bert_factory(vocab_size=64)
    from energon_jax.convert import orbax_io

    orbax_io.convert_checkpoint(gpt_folder, tmp_path / "converted", progress=False)
    orbax_io.convert_checkpoint(bert_folder, tmp_path / "bert_converted", progress=False)
    procs = _start_workers(tmp_path, {"gpt": str(gpt_folder), "bert": str(bert_folder),
                                      "converted": str(tmp_path / "converted"),
                                      "bert_converted": str(tmp_path / "bert_converted")})
    try:  # one process, 8 devices, the same mesh shapes; computed while the workers run
        one_gpt = _gpt_results(ej.load_sharded_model(gpt_folder, **GPT_LAYOUT))
        one_bert = _bert_results(ej.load_sharded_model(bert_folder, **BERT_LAYOUT))
        hf_tokens = [_hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]
    finally:
        results = _collect(tmp_path, procs)

    for pid, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (pid, 2, 8, 4)
        assert "already joined" in r["rejoin_error"] and "process_id" in r["rejoin_error"]
        assert "cannot split evenly over the 2 processes" in r["mesh_error"]
        assert len(r["mesh_warnings"]) == 1 and "tp=8 does not fit in one process's 4" in r["mesh_warnings"][0]
        assert r["tensor_groups_processes"] == [[0]] * 2 + [[1]] * 2  # tensor groups stay within a host
        assert "processes [1] were called with inputs that differ" in r["mismatch_error"]
    # every process returns the same, to the last bit
    for key in ("gpt", "unseeded", "converted_greedy", "bert", "converted_pp", "bert_converted_pp", "weight_bytes"):
        assert results[0][key] == results[1][key], key
    # each process reports every device's weights, as one process with the same mesh does
    one = ej.load_sharded_model(gpt_folder, **GPT_LAYOUT)
    assert results[0]["weight_bytes"] == [one.param_bytes_per_device()[d] for d in one.mesh.devices.flat]
    assert results[0]["memory_report_lines"] == 2 + 8
    got = results[0]["gpt"]
    assert got["greedy"] == one_gpt["greedy"] == hf_tokens == results[0]["converted_greedy"]
    assert got["reasons"] == one_gpt["reasons"]
    assert got["sampled"] == one_gpt["sampled"]
    np.testing.assert_allclose(got["logits"], one_gpt["logits"], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0]["bert"], one_bert):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # pp=2 from a converted folder, stages on different processes: each process holds only its
    # own stage's layer (2 layers over 2 stages), and the results are one process's (whose mesh
    # differs: a one-process pp=2 load of the same folder would cost one more compile)
    assert [r["converted_pp_layers"] for r in results] == [[[0, 1, 1]], [[1, 2, 1]]]
    assert results[0]["converted_pp"]["greedy"] == one_gpt["greedy"] == hf_tokens
    np.testing.assert_allclose(results[0]["converted_pp"]["logits"], one_gpt["logits"], rtol=1e-5, atol=1e-5)
    assert results[0]["bert_converted_pp"] == results[0]["bert"]  # the same program on the same weights


# ------------------------------------------------------------------ argument checks, one process
@pytest.mark.parametrize("kwargs, env, message", [
    (dict(coordinator_address="10.0.0.1"), {}, "coordinator_address='10.0.0.1' must be 'HOST:PORT'"),
    (dict(coordinator_address="10.0.0.1:0"), {}, "a free TCP port on it in [1, 65535]"),
    (dict(coordinator_address="::1:1234"), {}, "[bracketed] IPv6"),
    (dict(coordinator_address=1234), {}, "coordinator_address=1234 must be"),
    (dict(num_processes=0), {}, "num_processes=0 must be an int >= 1"),
    (dict(num_processes=True), {}, "num_processes=True must be an int >= 1"),
    (dict(num_processes=2, process_id=2), {}, "process_id=2 must be an int in [0, 1] (num_processes=2)"),
    (dict(process_id=-1), {}, "process_id=-1 must be an int >= 0"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an int >= 1"),
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     "JAX_PROCESS_ID=5 must be an int in [0, 1] (num_processes=2)"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "host"}, "JAX_COORDINATOR_ADDRESS='host' must be 'HOST:PORT'"),
])
def test_bad_arguments_are_named(monkeypatch, kwargs, env, message):
    from energon_jax.runtime import distributed

    for name in distributed.ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as e:
        distributed.initialize(**kwargs)
    assert message in str(e.value)


def test_good_arguments_and_environment(monkeypatch):
    from energon_jax.runtime.distributed import _resolve

    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert _resolve("[::1]:1234", None, None) == {"coordinator_address": "[::1]:1234", "num_processes": 4,
                                                  "process_id": 3}
    assert _resolve("host-0:80", np.int64(2), 1) == {"coordinator_address": "host-0:80", "num_processes": 2,
                                                     "process_id": 1}  # arguments win over the environment


def test_after_jax_work_is_a_clear_error():
    import jax

    from energon_jax.runtime import distributed

    jax.numpy.zeros(1).block_until_ready()  # the backend runs: joining is too late (JAX checks before connecting)
    with pytest.raises(RuntimeError, match="must run before any jax computation"):
        distributed.initialize("127.0.0.1:1", 2, 0)
    assert not jax.distributed.is_initialized()


def test_one_process_is_unchanged():
    """Without initialize the helpers are plain: no collectives, numpy straight from the arrays."""
    import jax

    from energon_jax.runtime import distributed

    assert not distributed.is_multiprocess()
    assert distributed.same_seed(7) == 7
    distributed.check_same_call("generate", [[1, 2]], np.arange(3))  # nothing to compare against
    x = jax.numpy.arange(4)
    assert distributed.to_host(x).tolist() == [0, 1, 2, 3]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
