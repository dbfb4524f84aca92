"""The `energon` command line's first-run behaviour: errors read as `energon VERB: error: ...`, never
as tracebacks, and an optional piece (the compilation cache) that cannot work is skipped with a warning."""
import logging

import jax
import pytest

from energon_jax.cli import main
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
