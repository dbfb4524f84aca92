"""The device mesh: axes ("data", "stage", "tensor")."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from energon_jax.config import ParallelConfig
from energon_jax.runtime.sharding import MESH_AXES


def make_mesh(tp: int = 1, pp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A (dp, pp, tp) mesh. Tensor-parallel neighbours are adjacent devices (fastest links)."""
    par = ParallelConfig(tp=tp, pp=pp, dp=dp)
    devices = list(jax.devices() if devices is None else devices)
    if par.num_devices > len(devices):
        raise ValueError(f"tp*pp*dp = {tp}*{pp}*{dp} = {par.num_devices} devices asked for, "
                         f"but only {len(devices)} exist ({devices[0].platform})")
    grid = np.array(devices[: par.num_devices], dtype=object).reshape(dp, pp, tp)
    return Mesh(grid, MESH_AXES)
