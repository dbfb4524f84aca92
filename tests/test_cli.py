"""The `energon` command line's first-run behaviour: errors read as `energon VERB: error: ...`, never
as tracebacks, and an optional piece (the compilation cache) that cannot work is skipped with a warning."""
import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from energon_jax.cli import main
from energon_jax.loading import PRESETS_DIR
from energon_jax.runtime import compile_cache
from energon_jax.runtime.compile_cache import ENV_VAR, enable_compilation_cache

PRESET = "tiny-gpt2-pydoc"


@pytest.fixture
def no_cache_configured(monkeypatch):
    """No cache dir in jax's config (these tests must not turn one on) and no folder warned about yet."""
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(compile_cache, "_warned", set())
    monkeypatch.setenv(ENV_VAR, "off")  # restored afterwards, whatever main() sets it to
    yield
    assert not jax.config.jax_compilation_cache_dir


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_unusable_cache_folder_warns_and_carries_on(tmp_path, monkeypatch, caplog, no_cache_configured, kind):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    folder = blocker if kind == "file" else blocker / "sub"
    monkeypatch.setenv(ENV_VAR, str(folder))
    with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
        assert enable_compilation_cache() is None
        assert enable_compilation_cache() is None  # every load calls it: one warning, not one per load
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(folder) in warnings[0] and f"{ENV_VAR}=off" in warnings[0] and "--cache-dir off" in warnings[0]


def test_unwritable_default_cache_folder_still_loads(tmp_path, monkeypatch, caplog, no_cache_configured):
    blocker = tmp_path / "xdg"
    blocker.write_text("not a folder")
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    import energon_jax as ej

    with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
        model = ej.load_sharded_model(PRESET)
    assert model.generate([[1, 2, 3]], max_new_tokens=1)[0].token_ids
    assert any(str(blocker) in r.getMessage() for r in caplog.records)


def test_cli_cache_dir_that_is_a_file_warns_and_generates(tmp_path, capsys, caplog, no_cache_configured):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
        rc = main(["--cache-dir", str(blocker), "generate", PRESET, "The for statement", "--max-new-tokens", "2"])
    assert rc == 0
    assert "finish_reason" in capsys.readouterr().err
    assert any(str(blocker) in r.getMessage() for r in caplog.records)


def _unwritable_folder(tmp_path):
    """A folder this process cannot write into: a chmod'ed one, or /sys for root (whom modes do not stop)."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    sys_dir = Path("/sys")
    try:
        (sys_dir / ".energon-probe").mkdir()
    except OSError:
        return sys_dir
    (sys_dir / ".energon-probe").rmdir()
    pytest.skip("no unwritable folder here")


def test_convert_into_unwritable_folder_names_out_and_its_parent(tmp_path, capsys):
    parent = _unwritable_folder(tmp_path)
    out = parent / "foo"
    assert main(["convert", str(PRESETS_DIR / PRESET), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("energon convert: error: ") and "Traceback" not in err
    assert str(out) in err and f"parent folder {parent} is not writable" in err
    assert ".tmp-" not in err  # not the hidden temp folder beside OUT
    assert not out.exists()


def test_convert_under_a_file_says_which_is_not_a_folder(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub" / "out"
    assert main(["convert", str(PRESETS_DIR / PRESET), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("energon convert: error: ") and str(out) in err and f"{blocker} is not a folder" in err


def test_convert_makes_missing_parents_of_out(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    assert main(["convert", str(PRESETS_DIR / PRESET), str(out), "--quiet"]) == 0
    assert (out / "energon_config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no probe or temp folder left


@pytest.mark.parametrize("error, code", [(OSError(errno.EIO, "Input/output error"), 1),
                                         (PermissionError(errno.EACCES, "Permission denied", "/x/y"), 2)])
def test_os_errors_are_one_line_not_a_traceback(monkeypatch, capsys, error, code):
    from energon_jax.convert import orbax_io

    def fail(path):
        raise error

    monkeypatch.setattr(orbax_io, "describe", fail)
    assert main(["inspect", str(PRESETS_DIR / PRESET)]) == code
    err = capsys.readouterr().err
    assert err.startswith("energon inspect: error: ") and error.strerror in err and "Traceback" not in err


def test_inspect_into_a_closed_pipe_is_quiet():
    """`energon inspect X --json | head`: the reader leaves early; no BrokenPipeError traceback."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "energon_jax.cli", "inspect", str(PRESETS_DIR / PRESET), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("verb", ["inspect", "convert", "generate"])
@pytest.mark.parametrize("name, names_folder", [("config.json", True), ("model.safetensors", True),
                                                ("notes.txt", False)])
def test_a_file_for_the_model_folder_says_pass_the_folder(tmp_path, capsys, verb, name, names_folder):
    file = tmp_path / name
    file.write_text("{}")
    argv = {"inspect": ["inspect", str(file)], "convert": ["convert", str(file), str(tmp_path / "out"), "--quiet"],
            "generate": ["generate", str(file), "hi"]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"energon {verb}: error: ") and "is a file; pass the folder that holds config.json" in err
    assert (f"(its folder: {str(tmp_path)!r})" in err) == names_folder, err


def test_load_sharded_model_of_a_file_says_pass_the_folder():
    import energon_jax as ej

    with pytest.raises(NotADirectoryError, match=r"is a file; pass the folder that holds config.json \(its folder"):
        ej.load_sharded_model(PRESETS_DIR / PRESET / "config.json")
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a preset name"):
        ej.load_sharded_model("no-such-preset")


def _generate(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out.rstrip("\n"), captured.err


def test_generate_stop_string_ends_the_text(capsys):
    rc, full, _ = _generate(capsys, PRESET, "The for statement", "--max-new-tokens", 24)
    assert rc == 0
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    rc, cut, err = _generate(capsys, PRESET, "The for statement", "--max-new-tokens", 24, "--stop", "zzqx",
                             "--stop", stop)  # repeatable: the one that occurs ends it
    assert rc == 0 and "finish_reason=stop" in err, err
    assert cut == full[: full.index(stop)], (cut, full)


def test_generate_stop_token_ids_without_a_tokenizer(tiny_gpt2_factory, capsys):
    folder, _ = tiny_gpt2_factory()
    rc, full, _ = _generate(capsys, folder, "5 17 3", "--max-new-tokens", 8)
    assert rc == 0
    ids = [int(t) for t in full.split()]
    first = ids.index(ids[3])  # the first new token equal to the 4th: generation stops there
    rc, cut, err = _generate(capsys, folder, "5 17 3", "--max-new-tokens", 8, "--stop", ids[3])
    assert rc == 0 and "finish_reason=stop" in err
    assert [int(t) for t in cut.split()] == ids[: first + 1]  # the stop token is kept, as generate keeps it
    rc, _, err = _generate(capsys, folder, "5 17 3", "--stop", "the end")
    assert rc == 2 and err.startswith("energon generate: error: ") and "--stop as token ids" in err


def test_generate_max_seq_len(capsys):
    rc, _, err = _generate(capsys, PRESET, "The for statement", "--max-new-tokens", 8, "--max-seq-len", 4)
    assert rc == 2 and "context of 4 tokens" in err, err
    rc, _, err = _generate(capsys, PRESET, "The for statement", "--max-new-tokens", 2, "--max-seq-len", 16)
    assert rc == 0, err


def test_generate_options_have_help_and_dtype_choices(capsys):
    import jax.numpy as jnp

    from energon_jax import cli, loading
    from energon_jax.convert import cli_verbs, hf_files

    # One list of names: --dtype's choices (generate / serve, convert) and what the loaders map to jnp dtypes.
    assert cli.DTYPES is hf_files.DTYPES and cli_verbs.DTYPES is hf_files.DTYPES
    assert tuple(loading.DTYPES) == hf_files.DTYPES  # the same names in the same order
    assert all(jnp.dtype(t) == jnp.dtype(name) for name, t in loading.DTYPES.items())
    with pytest.raises(SystemExit) as e:
        main(["generate", PRESET, "hi", "--dtype", "float64"])
    assert e.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ["0 is greedy", "(default 0)", "in (0, 1]; 1 is off (default 1)", "0 is off",
                     "[0, 2**32 - 1]", "repeatable", "token ids only", "max_new_tokens - 1 must fit",
                     "{bfloat16,float16,float32}"]:
        assert expected in text, expected


# ------------------------------------------- checked before the load, named as the user typed them
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_load(monkeypatch):
    """Make a model load fail the test: what is refused before it must not reach it."""
    import energon_jax as ej

    def load(*args, **kwargs):
        raise AssertionError(f"the model was loaded: load_sharded_model{args}")

    monkeypatch.setattr(ej, "load_sharded_model", load)


@pytest.mark.parametrize("argv, match", [
    (["x", "--top-p", "0", "--max-new-tokens", "-1", "--tp", "2"], "--max-new-tokens=-1 must be an int >= 0"),
    (["x", "--top-p", "0", "--tp", "2"], "--top-p=0.0 must be a number in (0, 1]"),
    (["x", "--temperature", "-1"], "--temperature=-1.0 must be a finite number >= 0"),
    (["x", "--top-k", "-1"], "--top-k=-1 must be an int in [0, "),
    (["x", "--seed", "-1"], "--seed=-1 must be an int in [0, 4294967295]"),
    ([""], "the prompt is empty ('')"),
    (["x", "--stop", "a", "--stop", ""], "--stop='' is empty; a stop string needs at least one character"),
])
def test_generate_checks_its_flags_before_loading(no_load, capsys, argv, match):
    rc, _, err = _generate(capsys, PRESET, *argv)
    assert rc == 2 and err.startswith("energon generate: error: ") and match in err, err


def test_generate_refuses_a_bert_before_loading(tiny_bert_factory, no_load, capsys):
    folder, _ = tiny_bert_factory()
    rc, _, err = _generate(capsys, folder, "hello")
    assert rc == 2 and f"{folder} is a Bert model (encoder)" in err and "energon serve" in err, err


def test_model_kind_reads_the_config_only(tiny_bert_factory, tmp_path):
    from energon_jax.cli import model_kind

    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "energon_config.json").write_text('{"architecture": "bert"}')
    assert model_kind(PRESET) == "gpt" and model_kind(tiny_bert_factory()[0]) == "bert"
    assert model_kind(converted) == "bert"
    assert model_kind("no-such-model") is None and model_kind(tmp_path) is None  # the load says why


def test_generate_errors_after_the_load_name_the_flags(tiny_gpt2_factory, capsys):
    rc, _, err = _generate(capsys, PRESET, "x", "--max-seq-len", 1000)
    assert rc == 2 and "--max-seq-len=1000 must be an int in [1, 256]" in err, err
    rc, _, err = _generate(capsys, PRESET, "The for statement", "--max-new-tokens", 8, "--max-seq-len", 4)
    assert rc == 2 and "the prompt has 3 tokens; with --max-new-tokens=8 it needs 10 positions" in err, err
    rc, _, err = _generate(capsys, tiny_gpt2_factory()[0], ",")  # token-id mode: no ids
    assert rc == 2 and "the prompt is empty ([])" in err, err
    rc, _, err = _generate(capsys, PRESET, "x", "--tp", 0)
    assert rc == 2 and "--tp=0 must be a positive int" in err, err


def test_serve_refuses_gpt_options_for_a_bert_before_loading(tiny_bert_factory, no_load, capsys):
    folder, _ = tiny_bert_factory()
    for flags, match in ((["--batch-wait", "0", "--no-overlap"],
                          "--batch-wait=0.0, --no-overlap: only a GPT model's Server uses them; this model is bert"),
                         (["--request-timeout", "5"], "--request-timeout=5.0: only a GPT model's Server uses it")):
        assert main(["serve", str(folder), "--port", str(_free_port())] + flags) == 2
        err = capsys.readouterr().err
        assert f"energon serve: error: {match}" in err, err


def test_serve_errors_name_the_flags(no_load, capsys):
    assert main(["serve", PRESET, "--host", "no.such.host.invalid"]) == 2
    assert "energon serve: error: --host='no.such.host.invalid' is no address to listen on" in capsys.readouterr().err


def test_serve_load_errors_name_the_flags(capsys):
    assert main(["serve", PRESET, "--max-seq-len", "999", "--port", str(_free_port())]) == 2
    assert "energon serve: error: --max-seq-len=999 must be an int in [1, 256]" in capsys.readouterr().err


def _service_init(tmp_path, capsys, text):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"server_port = {_free_port()}\nlog_level = 'warning'\n" + text)
    rc = main(["service", "init", "--config_file", str(cfg)])
    return rc, capsys.readouterr().err.replace(str(cfg), "cfg.py")


@pytest.mark.parametrize("text, match", [
    ("model_class = 'tiny-gpt2-pydoc'\ndecode_steps = 3\n", "cfg.py: decode_steps=3 must be a power of two >= 1"),
    ("model_class = 'tiny-gpt2-pydoc'\nmodel_type = 'bert'\n",
     "cfg.py: model_type='bert' but tiny-gpt2-pydoc holds a gpt model"),
    ("model_class = 'tiny-gpt2-pydoc'\nserver_host = 'no.such.host.invalid'\n",
     "cfg.py: server_host='no.such.host.invalid' is no address to listen on"),
    ("model_class = 'tiny-gpt2-pydoc'\ntokenizer_path = 'no-such-tokenizer'\n",
     "cfg.py: tokenizer_path: 'no-such-tokenizer' not found: it is neither a model folder nor a preset name"),
    ("model_class = 'tiny-gpt2-pydoc'\ntokenizer_path = '/'\n",
     "cfg.py: tokenizer_path='/' (/) has no tokenizer files"),
])
def test_service_init_refuses_before_loading_naming_the_key(tmp_path, no_load, capsys, text, match):
    rc, err = _service_init(tmp_path, capsys, text)
    assert rc == 2 and err.startswith("energon service: error: ") and match in err, err


def test_service_init_refuses_gpt_options_for_a_bert_before_loading(tiny_bert_factory, tmp_path, no_load, capsys):
    rc, err = _service_init(tmp_path, capsys, f"checkpoint = {str(tiny_bert_factory()[0])!r}\nbatch_wait = 0\n"
                                              "overlap = False\n")
    assert rc == 2 and "cfg.py: batch_wait=0, overlap=False: only a GPT model's Server uses them" in err, err


@pytest.mark.parametrize("text, match", [
    ("tp_init_size = 0\n", "cfg.py: tp_init_size=0 must be a positive int"),
    ("pp_init_size = 0\n", "cfg.py: pp_init_size=0 must be a positive int"),
    ("max_seq_len = 1000\n", "cfg.py: max_seq_len=1000 must be an int in [1, 256]"),
])
def test_service_init_load_errors_name_the_key(tmp_path, capsys, text, match):
    rc, err = _service_init(tmp_path, capsys, f"model_class = {PRESET!r}\n" + text)
    assert rc == 2 and match in err, err


def test_service_init_takes_a_tokenizer_preset_and_no_request_timeout(tiny_gpt2_factory, tmp_path, monkeypatch,
                                                                       capsys):
    from energon_jax.serving import cli_verbs
    from energon_jax.tokenizer import Tokenizer

    seen = {}
    monkeypatch.setattr(cli_verbs, "_run", lambda model, **kw: seen.update(kw, tokenizer=model.tokenizer) or 0)
    rc, err = _service_init(tmp_path, capsys, f"checkpoint = {str(tiny_gpt2_factory()[0])!r}\n"
                                              f"tokenizer_path = {PRESET!r}\nrequest_timeout = None\n")
    assert rc == 0, err
    assert seen["request_timeout"] is None  # no timeout, as the error for a bad one says
    want = Tokenizer.from_folder(PRESETS_DIR / PRESET).encode("The for statement")
    assert seen["tokenizer"] is not None and seen["tokenizer"].encode("The for statement") == want
    (tmp_path / "cfg.py").write_text("checkpoint = 'x'\nrequest_timeout = 'soon'\n")
    with pytest.raises(ValueError, match="request_timeout='soon' must be a number or None"):
        cli_verbs.read_config(tmp_path / "cfg.py")


def test_ctrl_c_inside_a_gc_callback_is_not_lost():
    """A Ctrl-C that came while jax's gc callback ran raised KeyboardInterrupt inside the callback,
    where Python prints and drops it: `energon generate` went on and exited 0. Run in a child
    process, as `energon` installs its handler: a gc callback sends SIGINT and lets it be handled
    inside itself; the interrupt must still reach the main code."""
    code = textwrap.dedent("""
        import gc, os, signal, sys, time
        from energon_jax import cli
        signal.signal(signal.SIGINT, cli._interrupt)
        fired = []
        def callback(phase, info):
            if phase == "start" and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # bytecodes: the handler runs here, inside the callback
                    pass
        gc.callbacks.append(callback)
        try:
            gc.collect()
            gc.callbacks.remove(callback)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except KeyboardInterrupt:
            print("interrupted", bool(fired))
            sys.exit(0)
        print("lost")
        sys.exit(1)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted True", (done.stdout, done.stderr)


def test_importing_the_package_does_not_import_jax():
    """The `energon` command installs its Ctrl-C handler (cli.run) after importing energon_jax.cli;
    jax registers its gc callback on import, so a package that imported jax eagerly left the import
    itself open to a lost Ctrl-C. The public names still resolve."""
    code = ("import sys, energon_jax, energon_jax.cli\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n"
            "from energon_jax import load_sharded_model, Server, initialize_distributed\n"
            "assert set(energon_jax.__all__) <= set(dir(energon_jax))\n"
            "print(initialize_distributed.__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "energon_jax.runtime.distributed", done.stderr
