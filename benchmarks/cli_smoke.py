"""`energon serve` end to end, as a user starts it: the bundled preset (a real tokenizer) behind the
real CLI, then /health until ready, completions (plain, streamed, with a stop string, with
logprobs, a prompt scored with echo and max_tokens 0) and SIGTERM.

    python3 -P benchmarks/cli_smoke.py [--model tiny-gpt2-pydoc] [--port 8123]

The tests run the same routes on CPU in-process; this checks the installed command on the machine
it runs on (the GPU machine: `energon` is not on its PATH, so it runs `python -m energon_jax.cli`).
Prints one JSON line per check and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def request(url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # refused, reset: the server is gone
        return 0, repr(e)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt2-pydoc")
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    t0 = time.perf_counter()
    # -P: not the source tree in the working folder (its energon_jax has no kernels / convert subpackages)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "energon_jax.cli", "serve", args.model, "--port", str(args.port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = []

    def check(name: str, ok: bool, **info) -> None:
        results.append(ok)
        print(json.dumps({"check": name, "ok": ok, **info}), flush=True)

    try:
        status, ready_s = None, None
        while time.perf_counter() - t0 < 300 and proc.poll() is None:
            status, _ = request(base + "/health", timeout=5)
            if status == 200:
                ready_s = time.perf_counter() - t0
                break
            time.sleep(0.5)
        check("health 200", status == 200, seconds_to_ready=ready_s)
        prompt = "The with statement"
        body = {"model": args.model, "prompt": prompt, "max_tokens": 48, "temperature": 0}
        status, text = request(base + "/v1/completions", body)
        plain = json.loads(text)["choices"][0]["text"] if status == 200 else None
        check("completion", status == 200 and bool(plain), status=status, text=plain)
        status, text = request(base + "/v1/completions", {**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        check("streamed equals plain", status == 200 and streamed == plain and text.rstrip().endswith("[DONE]"),
              chunks=len(chunks))
        stop = plain[len(plain) // 3: len(plain) // 3 + 3] if plain else "x"
        status, text = request(base + "/v1/completions", {**body, "stop": [stop]})
        cut = json.loads(text)["choices"][0] if status == 200 else {}
        check("stop string", status == 200 and cut.get("finish_reason") == "stop"
              and plain.startswith(cut.get("text", "?")) and stop not in cut.get("text", stop),
              stop=stop, text=cut.get("text"))
        # logprobs: the greedy tokens scored by one forward pass (GPTModel.token_logprobs) on this device
        status, text = request(base + "/v1/completions", {**body, "logprobs": 3})
        got = json.loads(text)["choices"][0] if status == 200 else {}
        lp = got.get("logprobs") or {}
        own, tops = lp.get("token_logprobs", []), lp.get("top_logprobs", [])
        check("logprobs of the greedy completion", status == 200 and got.get("text") == plain
              and len(own) == len(got.get("token_ids", [])) > 0 and (lambda joined: joined == plain or "\ufffd" in joined)("".join(lp.get("tokens", [])))  # split UTF-8
              and all(x <= 0 and x >= max(d.values()) - 0.05 for x, d in zip(own, tops)),
              worst_gap=max((max(d.values()) - x for x, d in zip(own, tops)), default=None))
        status, text = request(base + "/v1/completions", {**body, "max_tokens": 0, "echo": True, "logprobs": 1})
        scored = json.loads(text)["choices"][0] if status == 200 else {}
        prompt_lp = (scored.get("logprobs") or {}).get("token_logprobs", [])
        status2, text2 = request(base + "/v1/completions", {**body, "echo": True, "logprobs": 1})
        both = (json.loads(text2)["choices"][0].get("logprobs") or {}).get("token_logprobs", []) if status2 == 200 else []
        check("echo scores the prompt", status == 200 and scored.get("text") == prompt and prompt_lp[:1] == [None]
              and len(prompt_lp) > 1 and both[len(prompt_lp):] == own and both[:1] == [None]
              and all(abs(a - b) < 1e-3 for a, b in zip(prompt_lp[1:], both[1:len(prompt_lp)])),
              prompt_tokens=len(prompt_lp))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    check("SIGTERM exit 143", proc.returncode in (143, -signal.SIGTERM), returncode=proc.returncode)
    check("ready line logged", "ready: http://127.0.0.1" in out, log_tail=out.strip().splitlines()[-3:])
    return 0 if all(results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
