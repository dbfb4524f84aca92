"""`energon` command line: thin verbs over the library.

Each verb lives with its level: `generate` here, `convert`/`inspect` in `energon_jax.convert.cli_verbs`,
`serve`/`service` in `energon_jax.serving.cli_verbs`. A module registers its verbs with
`add_parsers(subparsers)`; each parser sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
import time

# --dtype's choices: the one list of names (hf_files imports no jax; loading.DTYPES maps the same names)
from energon_jax.convert.hf_files import DTYPES

VERB_MODULES = ("energon_jax.convert.cli_verbs", "energon_jax.serving.cli_verbs")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")


def flag_names(names) -> dict[str, str]:
    """Python names (`max_new_tokens`) -> the flags a verb takes for them (`--max-new-tokens`)."""
    return {n: "--" + n.replace("_", "-") for n in names}


@contextlib.contextmanager
def named_as(names: dict[str, str], prefix: str = ""):
    """A ValueError raised inside, its library names (`max_new_tokens=-1 must be ...`, a message that
    begins `prompts[0] is empty`) rewritten as the user typed them (`--max-new-tokens=-1`, a config
    file's key) and `prefix` (the file) put first; other errors pass unchanged.

    names: Python name -> the user's; a name holding "=" (`overlap=False`) is replaced whole."""
    try:
        yield
    except ValueError as e:
        text, found = str(e), 0
        for name, user in names.items():
            end = r"(?![\w.])" if "=" in name else "(?==)"  # `name=value` anywhere, `name ...`/`name:` first
            pattern = rf"(?:^|(?<=[\s,(])){re.escape(name)}{end}|^{re.escape(name)}(?=[\s:])"
            text, n = re.subn(pattern, lambda m: user, text)
            found += n
        if not found:
            raise
        raise ValueError(text if text.startswith(prefix) else prefix + text) from None


def model_kind(path) -> str | None:
    """"gpt" or "bert" (as `Server.kind` names them): what the model folder or preset `path` holds,
    read from its config file without loading it; None where that file cannot tell (the load says why)."""
    from energon_jax.convert.hf_files import read_config, read_json_object
    from energon_jax.loading import CONVERTED_MARKER, resolve_path

    try:
        folder = resolve_path(path)
        if (folder / CONVERTED_MARKER).is_file():
            model_type = read_json_object(folder / CONVERTED_MARKER, "converted-folder metadata").get("architecture")
        else:
            model_type = read_config(folder).get("model_type")
    except (OSError, ValueError):
        return None
    return {"gpt2": "gpt", "bert": "bert"}.get(model_type)


# generate's Python names -> its flags (and the prompt argument), for named_as
GENERATE_NAMES = {**flag_names(("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "max_seq_len",
                                "tp", "pp", "dp")), "prompts[0]": "the prompt"}


def _bert_refusal(model) -> ValueError:
    return ValueError(f"{model} is a Bert model (encoder); it embeds text rather than generating it: use "
                      f"`energon serve {model}` (POST /v1/embeddings) or BertModel.encode()")


def _generate(args) -> int:
    from energon_jax.engine.sampling import resolve_seed, validate_sampling
    from energon_jax.runtime.checks import check_int

    with named_as(GENERATE_NAMES):  # before the model loads: a bad flag should not cost a load
        check_int("max_new_tokens", args.max_new_tokens, 0)
        validate_sampling(args.temperature, args.top_k, args.top_p)
        if args.seed is not None:  # None: generate draws one
            resolve_seed(args.seed)
        if not args.prompt:
            raise ValueError("the prompt is empty ('')")
        if "" in args.stop:  # the model's own check comes after the load
            raise ValueError("--stop='' is empty; a stop string needs at least one character")
        if model_kind(args.model) == "bert":
            raise _bert_refusal(args.model)
        return _load_and_generate(args)


def _load_and_generate(args) -> int:
    import energon_jax as ej

    t0 = time.perf_counter()
    model = ej.load_sharded_model(args.model, tp=args.tp, pp=args.pp, dp=args.dp, dtype=args.dtype,
                                  max_seq_len=args.max_seq_len)
    if not isinstance(model, ej.GPTModel):
        raise _bert_refusal(args.model)
    prompt, stop = args.prompt, args.stop
    if model.tokenizer is None:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{args.model} has no tokenizer: give the prompt as token ids, e.g. \"1 2 3\"") from None
        try:  # token-id mode: a stop is a token id (stop strings need a tokenizer to match)
            stop = [int(s) for s in stop]
        except ValueError:
            raise ValueError(f"{args.model} has no tokenizer: give --stop as token ids, e.g. --stop 50256") from None
    out = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop or None)[0]
    print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, {time.perf_counter() - t0:.2f} s "
          f"including load and compile]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energon", description="Serve GPT-2 / Bert models sharded over a JAX mesh.")
    parser.add_argument("--cache-dir", default=None,
                        help="JAX persistent compilation cache folder ('off' disables; default: user cache dir)")
    sub = parser.add_subparsers(dest="verb", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("model", help="HF folder, converted folder or preset name (e.g. tiny-gpt2-pydoc)")
    g.add_argument("prompt", help="text; for a model without a tokenizer, token ids (\"1 2 3\" or \"1,2,3\")")
    g.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate, >= 0 (default 32)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, >= 0; 0 is greedy, the top_k/top_p filters then do nothing (default 0)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens, >= 0; 0 is off (default 0)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p, in (0, 1]; "
                        "1 is off (default 1)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling, an int in [0, 2**32 - 1] (default: a fresh one each run)")
    g.add_argument("--stop", action="append", default=[], metavar="STOP",
                   help="end generation where this appears; repeatable. With a tokenizer every STOP is a string "
                        "matched in the text (--stop 42 stops at the text \"42\"); a model without one takes "
                        "token ids only. EOS always stops")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="positions to load the model for; prompt tokens + max_new_tokens - 1 must fit "
                        "(default: the model's, as `energon inspect` shows)")
    add_parallel_args(g)
    g.set_defaults(func=_generate)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cache_dir is not None:
            import os

            from energon_jax.runtime.compile_cache import ENV_VAR, enable_compilation_cache

            # Through the variable, so every later load (and a child process) takes the same choice,
            # "off" and an unusable folder included, rather than falling back to the default folder.
            os.environ[ENV_VAR] = args.cache_dir
            enable_compilation_cache(args.cache_dir)
        code = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below rather than at interpreter exit
        return code
    except BrokenPipeError:  # `energon inspect X --json | head`: the reader left; nothing more to say
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a process the closed pipe ended
    # Exit 2: the command line asked for something that cannot be (a bad value, a path that is
    # missing, in the way or not ours to write): change the arguments. Exit 1: the system failed
    # a good command (disk full, I/O error): an OSError of another kind.
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, NotImplementedError, TypeError) as e:
        print(f"energon {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"energon {args.verb}: error: {e}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit does not report the broken pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in tests)
        pass


def _in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside one of gc.callbacks (jax registers one)."""
    import gc

    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame) -> None:
    """SIGINT's handler under `energon`: KeyboardInterrupt, as Python's own, except inside a gc
    callback. An exception raised there is printed as "Exception ignored in ..." and dropped, so a
    Ctrl-C that came while jax's callback ran (often, while a model loads) was lost: the command went
    on and exited 0. There the interrupt is sent again from a thread, to be raised once the callback
    has returned."""
    if _in_gc_callback(frame):
        import _thread
        import threading

        threading.Timer(0.01, _thread.interrupt_main, (signum,)).start()
        return
    raise KeyboardInterrupt


def run() -> None:
    """The `energon` command: main(), with a Ctrl-C that main passes on (to its Python callers)
    ending the process by SIGINT, as the shell's 130 says, without the interpreter's traceback
    (the verb has said what was interrupted)."""
    import os
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it
        signal.signal(signal.SIGINT, _interrupt)
    try:
        code = main()
    except KeyboardInterrupt:
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130  # where SIGINT does not end a process
    sys.exit(code)


if __name__ == "__main__":
    run()
