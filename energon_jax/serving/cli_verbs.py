"""`energon serve MODEL ...` and Energon's `energon service init --config_file=cfg.py`."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import runpy
import signal
import socket
import sys
import threading
import types

from energon_jax.cli import add_parallel_args, flag_names, model_kind, named_as
from energon_jax.serving.api import check_host, check_port, check_shutdown_timeout
from energon_jax.serving.scheduler import check_timeout

log = logging.getLogger("energon_jax.serving")

# Energon's config-file keys (DESIGN.md), with the type each must have.
CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "model_class": str, "checkpoint": str, "model_type": str, "max_batch_size": int, "tp_init_size": int,
    "pp_init_size": int, "half": bool, "tokenizer_path": str, "server_host": str, "server_port": int,
    "log_level": str, "rm_padding": bool,
}
# energon-jax's own keys, beside Energon's: what `energon serve` takes as flags; a key left out
# takes the flag's default.
_SECONDS = (int, float)
EXTRA_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_queue": int, "max_seq_len": int, "request_timeout": _SECONDS, "shutdown_timeout": _SECONDS,
    "decode_steps": int, "max_prefill_tokens": int, "max_prefill_batch": int, "prefill_batch_tokens": int,
    "batch_wait": _SECONDS, "prefill_window": _SECONDS, "overlap": bool, "embed_max_wait": _SECONDS,
}
# Keys that may be None: the flag's default (request_timeout None: no timeout).
NONE_KEYS = ("request_timeout", "max_prefill_batch", "max_seq_len")
# Keys whose type does not settle their value: checked at reading with the library's own check.
VALUE_CHECKS = {"request_timeout": check_timeout, "shutdown_timeout": check_shutdown_timeout,
                "server_host": check_host, "server_port": check_port}
# Energon's torch-RPC keys: they configure worker processes that a JAX controller does not have.
IGNORED_KEYS = ("host", "port", "backend", "engine_server")
MODEL_TYPES = ("gpt", "bert")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# The Python names of the options (Server's, load_sharded_model's, serve_http's) -> `energon serve`'s
# flags and a config file's keys, for the errors they raise (cli.named_as).
SERVE_FLAGS = {**flag_names(["max_batch_size", "tp", "pp", "dp", "host", "port"]
                            + [k for k in EXTRA_KEYS if k not in ("overlap", "embed_max_wait")]),
               "overlap=False": "--no-overlap"}
CONFIG_NAMES = {**{k: k for k in ["max_batch_size", *EXTRA_KEYS]}, "tp": "tp_init_size", "pp": "pp_init_size",
                "host": "server_host", "port": "server_port"}


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP (Energon's and OpenAI-style routes)")
    s.add_argument("model", help="HF folder, converted folder or preset name")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8005, help="TCP port, 1-65535 (default 8005)")
    add_parallel_args(s)
    s.add_argument("--max-batch-size", type=int, default=16, help="decode slots (concurrent generations; default %(default)s)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the slots; more get 429 (default %(default)s)")
    s.add_argument("--max-seq-len", type=int, default=None, help="positions per slot (default: the model's)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds (> 0) before a request is ended (default: no timeout)")
    add_batching_args(s)
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds (>= 0) to let requests in flight finish (default %(default)s)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default %(default)s)")
    s.set_defaults(func=_serve)

    svc = sub.add_parser("service", help="Energon's service verbs")
    verbs = svc.add_subparsers(dest="service_verb", required=True)
    init = verbs.add_parser("init", help="start a server from an Energon config file")
    init.add_argument("--config_file", "--config-file", dest="config_file", required=True,
                      help="Python file with Energon's keys (" + ", ".join(CONFIG_KEYS) + ") and energon-jax's ("
                      + ", ".join(EXTRA_KEYS) + ")")
    init.set_defaults(func=_service_init)


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """The GPT `Server`'s batching flags (with its defaults), for `energon serve` and benchmarks/serve.py;
    `batching_options(args)` turns them into Server keywords."""
    p.add_argument("--decode-steps", type=int, default=8, help="most decode steps per dispatch, a power of two (default %(default)s)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens admitted per iteration while every slot is busy (default %(default)s)")
    p.add_argument("--max-prefill-batch", type=int, default=None,
                   help="prompts per prefill dispatch, a power of two (1: one at a time; default: 16 on GPUs, 1 on CPU)")
    p.add_argument("--prefill-batch-tokens", type=int, default=8192, help="rows x bucket tokens per prefill dispatch (default %(default)s)")
    p.add_argument("--batch-wait", type=float, default=0.02,
                   help="seconds an idle engine gathers a burst of arrivals (0: admit at once; default %(default)s)")
    p.add_argument("--prefill-window", type=float, default=0.1,
                   help="seconds an idle engine only prefills while a burst keeps arriving (0: off; default %(default)s)")
    p.add_argument("--no-overlap", action="store_true",
                   help="wait for each engine iteration's tokens before dispatching the next")


def batching_options(args: argparse.Namespace) -> dict:
    return dict(decode_steps=args.decode_steps, max_prefill_tokens=args.max_prefill_tokens,
                max_prefill_batch=args.max_prefill_batch, prefill_batch_tokens=args.prefill_batch_tokens,
                batch_wait=args.batch_wait, prefill_window=args.prefill_window, overlap=not args.no_overlap)


def check_http_ready(host: str, port: int) -> None:
    """Before a model loads: the HTTP packages are installed and (host, port) can be listened on.
    Found only by uvicorn, after the load and during the warm-up, either ended the process."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the HTTP server needs {' and '.join(missing)} (the serve extra): "
                         'pip install "energon-jax[serve]"')
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"host={host!r} is no address to listen on: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            from energon_jax.serving.http import host_port  # fastapi is there: checked above

            raise ValueError(f"cannot listen on {host_port(host, port)}: {e.strerror or e}") from None


def check_serve_options(max_batch_size, max_queue, request_timeout, options: dict, flags: bool = True) -> None:
    """The GPT Server's options, checked before the model loads (a bad one cost the load): by the
    pure-Python Scheduler they configure and SlotEngine's power-of-two rule, the checks the
    Server runs. flags: name them as `energon serve`'s flags."""
    from energon_jax.runtime.checks import check_int
    from energon_jax.engine.slots import check_power_of_two
    from energon_jax.serving.scheduler import Scheduler

    with named_as(SERVE_FLAGS if flags else {}):
        check_int("max_batch_size", max_batch_size, 1)
        Scheduler(max_batch_size, max_queue=max_queue, context_len=1,
                  **{k: options[k] for k in ("max_prefill_tokens", "batch_wait", "prefill_window") if k in options})
        check_timeout(request_timeout, "request_timeout")
        check_power_of_two("decode_steps", options.get("decode_steps", 8))
        if options.get("max_prefill_batch") is not None:
            check_power_of_two("max_prefill_batch", options["max_prefill_batch"])
        check_int("prefill_batch_tokens", options.get("prefill_batch_tokens", 8192), 1)


def check_model_kind(path, options: dict) -> str | None:
    """Before the load: the kind of model `path` holds (cli.model_kind; None where its config cannot
    tell), with the Server options of the other kind refused as the Server would refuse them."""
    from energon_jax.serving import api

    kind = model_kind(path)
    if kind is not None:
        api.check_kind_options(kind, options)
    return kind


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO) if level != "trace" else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level not in ("debug", "trace"):  # jax's INFO lines (backends it did not find) are no news to a user
        logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLogger().level))


class _Terminated(BaseException):
    """SIGTERM, as an exception in the main thread (a BaseException, as KeyboardInterrupt is)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _flush_logs() -> None:
    """Before a process leaves without the interpreter's exit (os._exit, or the signal's default action)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def _run(model, *, host, port, max_batch_size, max_queue, decode_steps=8, request_timeout=None,
         shutdown_timeout=30.0, log_level="info", name=None, **server_options) -> int:
    """server_options: further `Server` keywords (prefill sizes, batch_wait, prefill_window, overlap)."""
    from energon_jax.serving.api import Server
    from energon_jax.serving.http import http_url, listening_note  # the serve extra: check_http_ready said so

    server = Server(model, max_batch_size=max_batch_size, max_queue=max_queue, decode_steps=decode_steps,
                    request_timeout=request_timeout, name=name, **server_options)
    # Start-up, in order: this line; uvicorn's; the engine's compile line(s); the Server's
    # "warmed up in S s: N slots, queue Q" (api.Server.start); the one "ready: URL (routes)"
    # line once every bucket is compiled (http.ready_message). URLs from http.http_url.
    note = listening_note(host)
    log.info("serving %s on %s (%scompiling before /health reports ready)", server.name, http_url(host, port),
             f"{note}; " if note else "")
    code = 0
    # uvicorn raises SIGTERM again after its graceful shutdown, under the handler it found: the
    # default one ends the process inside serve_http, before the stop and the lines below run.
    # Only the main thread handles signals (off it, uvicorn installs no handlers either).
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if handles else None
    try:
        if handles:
            signal.signal(signal.SIGTERM, _raise_terminated)
        server.serve_http(host=host, port=port, log_level=log_level if log_level != "trace" else "debug",
                          shutdown_timeout=shutdown_timeout)
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its graceful shutdown
        log.info("interrupted; stopped")
        code = 130
    except _Terminated:
        log.info("terminated (SIGTERM); stopped")
        code = 143
    except OSError as e:  # the port was taken between the check and the bind
        print(f"energon serve: error: {e}", file=sys.stderr)
        code = 2
    finally:
        if handles:  # None: a handler not set from Python; the default is the nearest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    server.stop()
    warm = getattr(server, "warmup_thread", None)
    compiling = warm is not None and warm.is_alive()
    if compiling:
        log.info("exiting during the warm-up")
    if compiling or code == 143:
        # Leave without the interpreter's exit: under a warm-up thread inside an XLA compile (which
        # nothing interrupts) it aborts in C++ ("terminate called ..."); and after SIGTERM by the
        # signal, as uvicorn left (README: 143 to a shell; a supervisor sees SIGTERM, not a failure).
        _flush_logs()
        if code == 143:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        os._exit(code or 130)
    return code


def _serve(args) -> int:
    import energon_jax as ej

    check_host(args.host, "--host")  # before the model loads: a typo should not cost a load
    check_port(args.port, "--port")
    check_shutdown_timeout(args.shutdown_timeout, "--shutdown-timeout")
    check_serve_options(args.max_batch_size, args.max_queue, args.request_timeout, batching_options(args))
    with named_as(SERVE_FLAGS):
        check_model_kind(args.model, dict(batching_options(args), request_timeout=args.request_timeout))
        check_http_ready(args.host, args.port)
        _setup_logging(args.log_level)
        model = ej.load_sharded_model(args.model, tp=args.tp, pp=args.pp, dp=args.dp, dtype=args.dtype,
                                      max_seq_len=args.max_seq_len)
        return _run(model, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                    max_queue=args.max_queue, request_timeout=args.request_timeout,
                    shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, name=str(args.model),
                    **batching_options(args))


def read_config(path: str) -> dict:
    """An Energon config file -> {key: value}, checked: unknown keys and wrong types raise ValueError."""
    if os.path.isdir(path):
        raise ValueError(f"config file {str(path)!r} is a folder; pass the Python file that sets the keys")
    try:
        raw = runpy.run_path(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid Python: {e.msg}") from None
    except Exception as e:  # the file runs as a script: an import or a name in it may fail
        raise ValueError(f"{path}: running it failed: {type(e).__name__}: {e}") from None
    accepted = {**CONFIG_KEYS, **EXTRA_KEYS}
    # modules, classes and functions (imported or helpers) are no settings, unless under a key's name
    keys = {k: v for k, v in raw.items() if not k.startswith("_") and (
        k in accepted or k in IGNORED_KEYS or not isinstance(v, (types.ModuleType, type, types.FunctionType,
                                                                 types.BuiltinFunctionType)))}
    unknown = sorted(set(keys) - set(accepted) - set(IGNORED_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; accepted: Energon's {sorted(CONFIG_KEYS)} "
                         f"and energon-jax's {sorted(EXTRA_KEYS)}")
    for k in IGNORED_KEYS:
        if keys.pop(k, None) is not None:
            log.warning("%s: %r configures Energon's RPC workers; a JAX controller has none, so it is ignored", path, k)
    for k, v in keys.items():
        want = accepted[k]
        if k == "model_class" and callable(v):
            raise ValueError(f"{path}: model_class={v!r} is an Energon model builder; give a model folder or "
                             "preset name (str), or use checkpoint=")
        if v is None and k in NONE_KEYS:
            continue
        if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
            kind = "a number" if want == _SECONDS else want.__name__
            raise ValueError(f"{path}: {k}={v!r} must be {kind}{' or None' if k in NONE_KEYS else ''}")
        if k in VALUE_CHECKS:
            try:
                VALUE_CHECKS[k](v, k)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    if "model_class" not in keys and "checkpoint" not in keys:
        raise ValueError(f"{path}: needs model_class (a preset name or folder) or checkpoint (a folder)")
    if keys.get("model_type", "gpt") not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type={keys['model_type']!r}; accepted: {list(MODEL_TYPES)}")
    if keys.get("log_level", "info").lower() not in LOG_LEVELS:
        raise ValueError(f"{path}: log_level={keys['log_level']!r}; accepted: {list(LOG_LEVELS)}")
    return keys


def _lower_case(path) -> bool:
    """A Bert model folder's (or preset's) sentence_bert_config.json do_lower_case."""
    from energon_jax.convert.bert import sentence_lower_case
    from energon_jax.loading import resolve_path

    return sentence_lower_case(resolve_path(path))


def _check_model_type(cfg: dict, config_file: str, path, kind: str | None) -> None:
    if kind is not None and cfg.get("model_type", kind) != kind:
        raise ValueError(f"{config_file}: model_type={cfg['model_type']!r} but {path} holds a {kind} model")


def _service_init(args) -> int:
    cfg = read_config(args.config_file)
    with named_as(CONFIG_NAMES, prefix=f"{args.config_file}: "):
        return _serve_config(cfg, args.config_file)


def _serve_config(cfg: dict, config_file: str) -> int:
    import energon_jax as ej
    from energon_jax.loading import resolve_path
    from energon_jax.tokenizer import Tokenizer

    options = {k: cfg[k] for k in EXTRA_KEYS if k in cfg}
    check_serve_options(cfg.get("max_batch_size", 16), cfg.get("max_queue", 64), cfg.get("request_timeout"),
                        options, flags=False)
    path = cfg.get("checkpoint") or cfg["model_class"]
    kind = check_model_kind(path, options)  # before the load, as the checks below
    _check_model_type(cfg, config_file, path, kind)
    tok = None
    if "tokenizer_path" in cfg:  # a folder or a preset name, as the model's path
        try:
            folder = resolve_path(cfg["tokenizer_path"])
        except OSError as e:
            raise type(e)(f"{config_file}: tokenizer_path: {e}") from None
        # the model folder's sentence-transformers do_lower_case holds whichever files tokenize
        tok = Tokenizer.from_folder(folder, lower_case=kind != "gpt" and _lower_case(path))
        if tok is None:
            raise FileNotFoundError(f"{config_file}: tokenizer_path={cfg['tokenizer_path']!r} ({folder}) has no "
                                    "tokenizer files")
    check_http_ready(cfg.get("server_host", "127.0.0.1"), cfg.get("server_port", 8005))
    level = cfg.get("log_level", "info").lower()
    _setup_logging(level)
    if "checkpoint" in cfg and "model_class" in cfg and cfg["model_class"] != cfg["checkpoint"]:
        log.info("model_class=%r and checkpoint=%r: loading the checkpoint", cfg["model_class"], cfg["checkpoint"])
    model = ej.load_sharded_model(path, tp=cfg.get("tp_init_size", 1), pp=cfg.get("pp_init_size", 1),
                                  dtype="float16" if cfg.get("half") else None, max_seq_len=cfg.get("max_seq_len"))
    kind = "gpt" if hasattr(model, "generate") else "bert"
    _check_model_type(cfg, config_file, path, kind)  # again: the config may not have told
    if tok is not None:
        model.tokenizer = tok
    if cfg.get("rm_padding") is False and kind == "bert":
        log.info("rm_padding=False: sequences are packed anyway (the results equal padded encoding)")
    options = {k: v for k, v in options.items() if k not in ("max_seq_len", "max_queue")}
    return _run(model, host=cfg.get("server_host", "127.0.0.1"), port=cfg.get("server_port", 8005),
                max_batch_size=cfg.get("max_batch_size", 16), max_queue=cfg.get("max_queue", 64), log_level=level,
                name=str(path), **options)
