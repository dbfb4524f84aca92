"""JAX's persistent compilation cache, on by default so a second process starts fast."""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "ENERGON_JAX_CACHE_DIR"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "energon-jax" / "jax-compilation-cache"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent cache at `path`, $ENERGON_JAX_CACHE_DIR or the user cache dir.

    Does nothing when the user already configured a cache dir or set the variable to "off".
    """
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    chosen = path or os.environ.get(ENV_VAR) or default_cache_dir()
    if str(chosen).lower() in ("off", "0", "none", ""):
        return None
    chosen = Path(chosen)
    chosen.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    # Small programs compile in well under JAX's default 1 s threshold but still cost start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return chosen
