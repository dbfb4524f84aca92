"""One table maps logical axis names to mesh axes; nothing else in the code names mesh axes.

Megatron 1-D tensor parallelism: heads, MLP width and vocabulary are split over "tensor";
stacked layers over "stage"; the batch over "data". Everything else is replicated.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "stage", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("mlp", "tensor"),
    # Embedding tables are split over tensor x stage, so with pipeline stages no device holds
    # a whole vocabulary matrix (the lookup and LM head run outside the pipeline, under GSPMD).
    ("vocab", ("tensor", "stage")),
    ("positions", ("tensor", "stage")),
    ("token_types", None),
    ("layers", "stage"),
    ("cache_layers", "stage"),
    ("cache_batch", "data"),
    ("cache_heads", "tensor"),
    ("cache_length", None),
    ("cache_kv", None),
)


CACHE_AXES = ("cache_layers", "cache_batch", "cache_heads", "cache_length", "cache_kv")


def table_multiple(mesh: Mesh) -> int:
    """Embedding tables are padded to a multiple of this many rows (tensor x stage devices)."""
    return mesh.shape["tensor"] * mesh.shape["stage"]


def logical_to_spec(axes) -> PartitionSpec:
    """Logical names (a tuple, None for an unnamed axis) -> PartitionSpec over MESH_AXES."""
    return nn.logical_to_mesh_axes(tuple(axes), LOGICAL_AXIS_RULES)


def logical_to_sharding(axes, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes))


def tree_shardings(logical_tree, mesh: Mesh):
    """Map a pytree of logical-axis tuples (leaves are PartitionSpec-like tuples) to NamedShardings."""
    return jax.tree.map(
        lambda axes: logical_to_sharding(axes, mesh),
        logical_tree,
        is_leaf=lambda x: isinstance(x, (tuple, PartitionSpec)),
    )
