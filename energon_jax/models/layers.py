"""Building blocks shared by the GPT-2 and Bert modules: layer norm, activations, attention math.

Every parameter is created with logical axis names (see `runtime/sharding.py`), so the
sharding of a model follows from its module tree and one rules table.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# Masked scores use a large finite negative (not -inf) so a fully masked row yields zeros, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
          init: Initializer = nn.initializers.normal(0.02), dtype=jnp.float32) -> jax.Array:
    """A parameter tagged with its logical axes."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class LayerNorm(nn.Module):
    """LayerNorm with statistics in float32 whatever the activation dtype."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, self.param_dtype)
        bias = param(self, "bias", (d,), ("embed",), nn.initializers.zeros, self.param_dtype)
        xf = x.astype(jnp.float32)
        if math.prod(x.shape[:-1]) == 1:
            # A single row (batch-1 decode): one pass for both statistics. The sum and the sum of
            # squares are sibling reductions of one input, so XLA computes them in one kernel,
            # where the variance of the two-pass form waits for the mean in a second one (GPT-2 XL
            # launched 3 small kernels per layer norm, ~1.5 us each). The row is first shifted by
            # its first element, so a mean far from zero does not cancel in E[x^2] - E[x]^2.
            # More rows keep the two-pass form, which XLA fuses better there: GPT-2 small at batch
            # 32 decodes at 0.60-0.61 ms/step with it against 0.63 with one pass (H200, session 9).
            xs = xf - jax.lax.stop_gradient(xf[..., :1])
            mean_s = xs.mean(-1, keepdims=True)
            var = jnp.maximum(jnp.square(xs).mean(-1, keepdims=True) - jnp.square(mean_s), 0.0)
            y = (xs - mean_s) * jax.lax.rsqrt(var + self.eps)
        else:
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def project(x, w, n_in: int, bias=None, activation: Callable | None = None):
    """activation(x's last n_in axes contracted with w's last n_in axes + bias); w is stored
    [out..., in...], bias [out...].

    Weights keep their input axes last, so each output's weights are contiguous. Decoding one
    token (a single row, B * T == 1) is then a reduction along contiguous memory: in GPT-2 XL
    batch-1 decode on an H200, XLA's reduce fusions read the 20 MB MLP matrices at ~2.9 TB/s and
    the QKV one at ~2.3, where 2-row GEMMs over [in, out] weights read them at 1.2-1.8 TB/s
    (benchmarks/profile_decode.py, BENCHMARKS.md session 8). A single row is written as that
    multiply + reduce (float32 products and sum, as a GEMM accumulates), because XLA keeps a
    one-row dot of 10M+ elements (GPT-2 XL's MLP) as a slow GEMV. Its bias and activation are
    applied to the float32 sum before the one rounding to the output dtype (XLA fuses them into
    the kernels that read the sum). More rows take a dot_general, rounded, then the bias and
    activation.
    """
    out_axes = w.ndim - n_in
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(out_axes, w.ndim)))
    activation = activation or (lambda y: y)
    dtype = jnp.result_type(x, w)
    if math.prod(x.shape[:-n_in]) == 1:
        xb = x.reshape(x.shape[:-n_in] + (1,) * out_axes + x.shape[-n_in:])
        y = jnp.sum(xb.astype(jnp.float32) * w.astype(jnp.float32), axis=tuple(range(-n_in, 0)))
        if bias is None:
            return activation(y).astype(dtype)
        return activation(y + bias.astype(jnp.float32)).astype(jnp.result_type(dtype, bias))
    y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=dtype)
    return activation(y if bias is None else y + bias)


def gelu_new(x):
    """GPT-2's tanh approximation of GELU (HF `gelu_new`)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    """Erf GELU (HF `gelu`, Bert's default)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu": gelu_exact,
    "relu": jax.nn.relu,
}


def attention_scale(head_dim: int, scaled: bool = True) -> float:
    return 1.0 / math.sqrt(head_dim) if scaled else 1.0


def masked_attention(q_btnd, k_bsnd, v_bsnd, mask_bts, scale: float):
    """Reference softmax attention. mask_bts: True where query t may see key s.

    Scores and softmax in float32 (as HF computes them for fp32 weights; for bf16 this is the
    numerically safer choice); the output is cast back to q's dtype.
    """
    scores_bnts = jnp.einsum("BTND,BSND->BNTS", q_btnd, k_bsnd,
                             preferred_element_type=jnp.float32) * scale
    scores_bnts = jnp.where(mask_bts[:, None, :, :], scores_bnts, MASK_VALUE)
    probs_bnts = jax.nn.softmax(scores_bnts, axis=-1)
    probs_bnts = jnp.where(mask_bts[:, None, :, :], probs_bnts, 0.0)
    out_btnd = jnp.einsum("BNTS,BSND->BTND", probs_bnts.astype(v_bsnd.dtype), v_bsnd,
                          preferred_element_type=jnp.float32)
    return out_btnd.astype(q_btnd.dtype)


def padded_rows(n: int, multiple: int) -> int:
    """n rounded up to a multiple: the rows of an embedding table split evenly over devices."""
    return -(-n // multiple) * multiple
