"""Small frozen dataclasses: model sizes and the parallel layout.

Model configs are built from Hugging Face `config.json` dicts by the converters in
`energon_jax.convert`; every HF option that changes the numbers is either mapped here or
rejected there, so a config object always describes exactly what the module computes.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # every id that ends a generation: config.json's eos_token_id may be a list, and HF generate
    # also stops on generation_config.json's; eos_token_id is the first of them
    eos_token_ids: tuple[int, ...] = ()

    model_type = "gpt2"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        ids = tuple(int(i) for i in self.eos_token_ids)
        if self.eos_token_id is not None and int(self.eos_token_id) not in ids:
            ids = (int(self.eos_token_id),) + ids
        object.__setattr__(self, "eos_token_ids", ids)
        object.__setattr__(self, "eos_token_id", ids[0] if ids else None)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def max_seq_len(self) -> int:
        return self.n_positions

    def num_params(self) -> int:
        e, f, l = self.n_embd, self.mlp_dim, self.n_layer
        per_layer = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e)
        return self.vocab_size * e + self.n_positions * e + l * per_layer + 2 * e


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh sizes: tensor (Megatron 1-D), pipeline stages and data-parallel replicas."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp * self.dp
