"""JAX's persistent compilation cache, on by default so a second process starts fast.

The cache is optional: a folder that cannot be made or written (read-only home, a file in the
way, /proc) gets one warning naming it and the process carries on without a cache.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

ENV_VAR = "ENERGON_JAX_CACHE_DIR"
OFF_VALUES = ("off", "0", "none", "")

log = logging.getLogger(__name__)
_warned: set[str] = set()  # folders already warned about: one warning per folder per process


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "energon-jax" / "jax-compilation-cache"


def _unusable(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache (None when it can); made if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # PermissionError, FileExistsError (a file in the way), read-only fs, ...
        return f"{type(e).__name__}: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable"
    return None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent cache at `path`, $ENERGON_JAX_CACHE_DIR or the user cache dir.

    Does nothing when the user already configured a cache dir or set the variable to "off".
    Returns None (with a logged warning, once per folder) when the folder cannot be made or written.
    """
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    chosen = path or os.environ.get(ENV_VAR) or default_cache_dir()
    if str(chosen).lower() in OFF_VALUES:
        return None
    chosen = Path(chosen).expanduser()
    why = _unusable(chosen)
    if why is not None:
        if str(chosen) not in _warned:
            _warned.add(str(chosen))
            log.warning("energon-jax: compilation cache folder %s is unusable (%s); continuing without a "
                        "compilation cache. Pick another with %s=DIR or --cache-dir DIR, or turn it off with "
                        "%s=off or --cache-dir off", chosen, why, ENV_VAR, ENV_VAR)
        return None
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    # Small programs compile in well under JAX's default 1 s threshold but still cost start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return chosen
