"""The device mesh: axes ("data", "stage", "tensor")."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from energon_jax.config import ParallelConfig
from energon_jax.runtime.sharding import MESH_AXES


def make_mesh(tp: int = 1, pp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A (dp, pp, tp) mesh. Tensor-parallel neighbours are adjacent devices (fastest links).

    Over several processes (after `initialize_distributed`) the devices are taken host by host,
    so a tensor group lies within one host where tp divides its devices, a stage next, and "data"
    (then "stage") crosses hosts; each process gives the mesh the same number of its own devices."""
    par = ParallelConfig(tp=tp, pp=pp, dp=dp)
    if devices is None:
        devices = _default_devices(par.num_devices, (tp, pp, dp))
    devices = list(devices)
    if par.num_devices > len(devices):
        raise ValueError(f"tp*pp*dp = {tp}*{pp}*{dp} = {par.num_devices} devices asked for, "
                         f"but only {len(devices)} exist ({devices[0].platform})")
    grid = np.array(devices[: par.num_devices], dtype=object).reshape(dp, pp, tp)
    return Mesh(grid, MESH_AXES)


def _default_devices(n: int, sizes: tuple) -> list:
    """jax.devices() for one process. For several: each process's first n / P devices, process by
    process (jax.devices() is global then; its order is not promised to group hosts)."""
    procs = jax.process_count()
    if procs == 1:
        return jax.devices()
    by_proc = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_proc.setdefault(d.process_index, []).append(d)
    local = min(len(v) for v in by_proc.values())
    if n % procs or n // procs > local:
        tp, pp, dp = sizes
        raise ValueError(f"tp*pp*dp = {tp}*{pp}*{dp} = {n} devices cannot split evenly over the {procs} processes "
                         f"({local} devices each): every process must hold the same share of the mesh; use a multiple "
                         f"of {procs} up to {procs * local} devices")
    tp = sizes[0]
    per = n // procs
    if tp > per or per % tp:
        import warnings

        warnings.warn(f"tp={tp} does not fit in one process's {per} mesh devices: tensor-parallel collectives "
                      f"cross hosts (slow); prefer tp dividing {per}", stacklevel=3)
    return [d for p in sorted(by_proc) for d in by_proc[p][:per]]


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
