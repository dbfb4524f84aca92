"""What every loaded model has: config, params (sharded jax.Arrays), mesh, tokenizer."""
from __future__ import annotations

import collections
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from energon_jax.runtime.distributed import put_global


def token_matrix(token_ids) -> np.ndarray:
    """`token_ids` as a non-empty [B, T] integer array, or a ValueError saying what was given
    (numpy's own message for ragged rows, "inhomogeneous shape", names neither)."""
    try:
        arr = np.asarray(token_ids)
        got = f"shape {arr.shape} dtype {arr.dtype}"
    except ValueError:
        arr, got = None, f"rows of lengths {[len(r) if hasattr(r, '__len__') else '-' for r in token_ids]}"
    if arr is None or arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be a rectangular [B, T] int array (rows of equal length, at least one "
                         f"token), got {got}")
    return arr


class ShardedModel:
    def __init__(self, config, params, mesh, tokenizer, *, max_seq_len: int, source: str = ""):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.source = source

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def __repr__(self) -> str:
        shape = dict(self.mesh.shape)
        return (f"{type(self).__name__}({self.config.model_type}, {self.num_params() / 1e6:.1f}M params, "
                f"dtype={self.dtype}, mesh={shape}, tokenizer={'yes' if self.tokenizer else 'no'})")

    @property
    def dp(self) -> int:
        return self.mesh.shape["data"]

    def put_rows(self, rows: np.ndarray) -> jax.Array:
        """Host array with a leading batch axis -> device array split over "data" (over several
        processes, each copies its own devices' rows of the array every process holds)."""
        return put_global(rows, NamedSharding(self.mesh, PartitionSpec("data")))

    def put_replicated(self, value: np.ndarray) -> jax.Array:
        """Host array -> device array replicated over the mesh (a global array over several processes)."""
        return put_global(np.asarray(value), NamedSharding(self.mesh, PartitionSpec()))

    def param_bytes_per_device(self) -> dict:
        """Bytes of parameters held by each device of the mesh, this process's and the other
        processes' alike: from each array's sharding (the index every device holds), so nothing is
        read and no process needs another's shards."""
        per_device = collections.Counter()
        for arr in jax.tree.leaves(self.params):
            for device, index in arr.sharding.devices_indices_map(arr.shape).items():
                per_device[device] += arr.dtype.itemsize * math.prod(
                    len(range(*part.indices(dim))) for part, dim in zip(index, arr.shape))
        return dict(per_device)

    def kv_cache_bytes_per_device(self, batch: int, length: int) -> int:
        """Bytes of KV cache per device for `batch` rows of `length` tokens (0 for encoders)."""
        return 0

    def memory_report(self, batch: int = 1, length: int | None = None) -> str:
        """Weights and KV cache per device of the mesh (every process's), as text (one line per device)."""
        length = length or self.max_seq_len
        kv = self.kv_cache_bytes_per_device(batch, length)
        lines = [f"{self!r}", f"mesh {dict(self.mesh.shape)}; KV cache for batch={batch}, length={length}"]
        for device, nbytes in sorted(self.param_bytes_per_device().items(), key=lambda kv_: kv_[0].id):
            lines.append(f"  {device}: weights {nbytes / 2**20:9.2f} MiB   kv cache {kv / 2**20:9.2f} MiB")
        return "\n".join(lines)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what}: this model was loaded without a tokenizer ({self.source}); "
                             f"pass token ids (list[int]) instead of str")
        return self.tokenizer
