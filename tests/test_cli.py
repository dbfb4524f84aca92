"""The `energon` command line's first-run behaviour: errors read as `energon VERB: error: ...`, never
as tracebacks, and an optional piece (the compilation cache) that cannot work is skipped with a warning."""
import errno
import logging
import os
import subprocess
import sys
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
