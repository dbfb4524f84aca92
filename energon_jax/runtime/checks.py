"""Argument checks shared by every layer: kept free of jax so the runtime (distributed's argument
parsing) and the engine and serving layers above it raise one wording for one mistake."""
from __future__ import annotations

import numpy as np


def check_int(name: str, value, low: int, high: int | None = None, note: str = "") -> int:
    """`value` as an int if it is one (numpy integers too, bools not) in [low, high], else a
    ValueError naming it and the accepted range."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value and (
            high is None or value <= high):
        return int(value)
    accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name}={value!r} must be an int {accepted}{note}")


def check_bool(name: str, value) -> bool:
    """`value` as a bool if it is one (numpy's too), else a ValueError naming it: "false" and None
    are not False (a truthy string normalised the embeddings)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}={value!r} must be True or False")
