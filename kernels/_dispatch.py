"""How an attention kernel call is routed: Triton or XLA, sharded or not.

Shared by every kernel file: `resolve_impl` picks the implementation, `jax_triton` imports
jax-triton only when a kernel really runs on a GPU, `over_mesh` wraps a call in `shard_map`
so each device runs it on its own heads (a custom call cannot be partitioned by GSPMD), and
`interpreted` checks that the Triton interpreter is active before a CPU test launches a kernel.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

IMPLS = ("auto", "triton", "xla")
MESH_AXES = ("data", "stage", "tensor")

try:  # jax >= 0.7 exports shard_map at the top level and checks varying axes ("vma")
    _shard_map = jax.shard_map
    _NO_CHECK = {"check_vma": False}
except AttributeError:  # older jax: only the experimental one, which checks replication
    from jax.experimental.shard_map import shard_map as _shard_map

    _NO_CHECK = {"check_rep": False}


def resolve_impl(impl: str) -> str:
    """Map impl ("auto" | "triton" | "xla") to "triton" or "xla"; "auto" is Triton on a GPU."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "triton" if jax.default_backend() == "gpu" and _jax_triton_available() else "xla"
    return impl


@functools.lru_cache(maxsize=1)
def _jax_triton_available() -> bool:
    """A GPU jax without jax-triton still works on "auto", through the XLA references."""
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def jax_triton():
    """Import jax_triton lazily: on a CPU-only jax importing it raises, so only GPU calls do."""
    try:
        import jax_triton as jt
    except ImportError as e:
        raise ImportError(
            "impl='triton' needs jax-triton and a CUDA build of jax "
            "(pip install 'energon-jax[cuda12]' or '[cuda13]'); use impl='xla' elsewhere"
        ) from e
    return jt


def over_mesh(
    fn: Callable[..., Any],
    mesh: Mesh | None,
    in_specs: Sequence[PartitionSpec],
    out_spec: PartitionSpec,
    *args: Any,
) -> Any:
    """Run fn(*args), inside shard_map over mesh unless there is no mesh or only one device.

    Specs name mesh axes per array dimension; each sharded dimension must divide evenly.
    """
    if mesh is None or mesh.size == 1:
        return fn(*args)
    missing = [a for spec in in_specs for a in spec if a is not None and a not in mesh.shape]
    if missing:
        raise ValueError(
            f"mesh axes {tuple(mesh.axis_names)} lack {sorted(set(missing))}; expected {MESH_AXES}"
        )
    for arg, spec in zip(args, in_specs):
        for dim, axis in zip(arg.shape, spec):
            if axis is not None and dim % mesh.shape[axis]:
                raise ValueError(
                    f"dimension {dim} of an array of shape {arg.shape} does not divide over "
                    f"mesh axis {axis!r} of size {mesh.shape[axis]}"
                )
    sharded = _shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_spec, **_NO_CHECK)
    return sharded(*args)


def check_head_dim(d: int):
    """The Triton kernels tile the head dim whole (tl.arange, tl.dot): a power of two >= 16."""
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16, got {d}")


def interpreted(kernel):
    """Return kernel if Triton runs in interpreter mode, else raise: CPU tests launch through it.

    Triton reads TRITON_INTERPRET when it is first imported, so the variable must be set
    before anything imports triton (a test module's first lines, or conftest.py).
    """
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} when triton was imported; "
            "set TRITON_INTERPRET=1 before importing triton to launch kernels on CPU tensors"
        )
    _widen_bf16_dot_operands()
    return kernel


def _widen_bf16_dot_operands():
    """Make the interpreter's tl.dot right for bfloat16 (once per process).

    Triton's interpreter (seen in 3.9) holds bfloat16 values as their raw uint16 bits and
    hands those to np.matmul as integers; widening each operand to the float32 it stands
    for gives what the GPU computes (bf16 products are exact in float32).
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "widens_bf16", False):
        return
    create_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.view(np.uint16).astype(np.uint32) << 16  # bf16 is the top half of an f32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot_widened(self, a, b, d, *args):
        return create_dot(self, widen(a), widen(b), d, *args)

    create_dot_widened.widens_bf16 = True
    builder.create_dot = create_dot_widened


def to_torch(x: jax.Array):
    """A jax array as a contiguous torch CPU tensor of the same dtype (for interpreter launches)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "int32": torch.int32}[str(x.dtype)]
    # numpy has no bfloat16 torch can read: go through float32, exact for bf16/fp16 values
    wide = np.asarray(x.astype("float32") if dtype in (torch.bfloat16, torch.float16) else x)
    return torch.from_numpy(wide.copy()).to(dtype).contiguous()


def from_torch(t, dtype) -> jax.Array:
    """A torch CPU tensor back as a jax array of dtype."""
    return jnp.asarray(t.float().numpy() if t.is_floating_point() else t.numpy()).astype(dtype)
