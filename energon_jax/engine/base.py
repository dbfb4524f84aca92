"""What every loaded model has: config, params (sharded jax.Arrays), mesh, tokenizer."""
from __future__ import annotations

import numpy as np
import jax


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

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what}: this model was loaded without a tokenizer ({self.source}); "
                             f"pass token ids (list[int]) instead of str")
        return self.tokenizer
