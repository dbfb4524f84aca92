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


def check_layout(mesh: Mesh, **sizes: int) -> None:
    """Fail before any compile when a model dimension does not split over its mesh axis.

    sizes: heads=, mlp= (split over "tensor"), layers= (split over "stage")."""
    axis_of = {"heads": "tensor", "mlp": "tensor", "layers": "stage"}
    for name, value in sizes.items():
        axis = axis_of[name]
        n = mesh.shape[axis]
        if value % n:
            flag = {"tensor": "tp", "stage": "pp"}[axis]
            raise ValueError(f"{name}={value} is not divisible by {flag}={n}; choose {flag} among "
                             f"{[d for d in range(1, value + 1) if value % d == 0]}")


def resolve_mesh(mesh: Mesh | None, tp: int, pp: int, dp: int) -> Mesh:
    """`mesh` if given (it must have the axes data/stage/tensor), else a fresh (dp, pp, tp) mesh."""
    if mesh is None:
        return make_mesh(tp=tp, pp=pp, dp=dp)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r} must be a jax.sharding.Mesh with axes {MESH_AXES} (see energon_jax.make_mesh) "
                         f"or None")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {MESH_AXES} (see energon_jax.make_mesh)")
    given = (mesh.shape["tensor"], mesh.shape["stage"], mesh.shape["data"])
    if (tp, pp, dp) != (1, 1, 1) and (tp, pp, dp) != given:
        raise ValueError(f"tp={tp}, pp={pp}, dp={dp} disagree with the mesh given (tp={given[0]}, pp={given[1]}, "
                         f"dp={given[2]}); pass one or the other")
    return mesh
