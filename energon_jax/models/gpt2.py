"""GPT-2 as a Flax Linen module with Hugging Face `GPT2LMHeadModel` semantics.

Reading order: Attention, MLP, Block, GPT2. Learned positions, pre-LN blocks, `gelu_new`,
LM head tied to the token embedding. Layers are stacked on a leading "layers" axis
(`nn.scan`) so that pipeline stages can own contiguous slices of them.

Two call modes (no jit here; `engine/` owns the jit boundaries):
* prefill: `cache=None`. Causal attention over `tokens` (right-padded, `lengths` real tokens
  per row). Returns the fresh KV fragment `{"k","v"}: [L, B, N, T, D]`.
* decode: `cache={"k","v"}: [L, B, N, S, D]`, one token per row written at `positions[:, 0]`
  and attending to cache positions `<= positions[b]`. Returns the updated cache.
* decode of a row group (a pipeline stage's microbatch): `cache={"k","v","group"}`, the cache
  read, not written; returns the new token's K/V `[L, B, N, 1, D]` for the caller to store
  (see `BlockStack`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from energon_jax.config import GPT2Config
from energon_jax.models.layers import (MASK_VALUE, LayerNorm, attention_scale, gelu_new, masked_attention, padded_rows,
                                      param, project)

Cache = dict  # {"k": [L, B, N, S, D], "v": [L, B, N, S, D]} (and "group": see BlockStack)


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """Fused attention handed in by the engine (see energon_jax/kernels); same contracts as the
    XLA code they replace.
    prefill(q_btnd, k_btnd, v_btnd, lengths_b, *, scale) -> [B, T, N, D] (causal, rows >= length zero)
    decode(q_bnd, k_bnsd, v_bnsd, lengths_b, *, scale) -> [B, N, D] (row b sees [0, lengths[b]))
    decode_step(qkv_b3nd, k_bnsd, v_bnsd, positions_b, *, scale) -> (out_bnd, k_bnsd, v_bnsd): writes
      row b's K/V at positions[b], then attends over [0, positions[b]]; replaces the cache write and
      `decode` where a layer's cache is its own array (no pipeline stages). None: write, then `decode`."""

    prefill: Callable
    decode: Callable
    decode_step: Callable | None = None


def write_kv_columns(cache_lbnsd, new_lbntd, pos_b, *, layer=0, group=0, skip_past_end=False):
    """cache[layer + l, b * G + group, :, pos[b] + t, :] = new[l, b, :, t, :] for every row b, where
    G = cache rows / new rows: the cache's rows are G interleaved groups (a pipeline's microbatches,
    engine/pipeline.py) and `new` belongs to group `group`; G = 1 is the whole batch. A row whose
    block would pass the cache's end (pos[b] + t > S) is moved back to end at it, as
    dynamic_update_slice does, or with `skip_past_end` not written at all (how a caller skips rows).

    One scatter whose batching dimension is the cache's own row axis (a per-row update under
    vmap moved that axis to the front, a transpose, i.e. a copy, of the whole cache once the
    cache holds more than one layer). With the batch split over "data" and heads over "tensor"
    XLA's SPMD partitioner handles it inside the pipeline's shard_map, where a plain
    advanced-index scatter fails to partition."""
    b = new_lbntd.shape[1]
    shape = cache_lbnsd.shape
    g = shape[1] // b
    zero = jnp.zeros_like(pos_b)
    if g > 1:
        cache = cache_lbnsd.reshape(shape[:1] + (b, g) + shape[2:])  # [L, B, G, N, S, D]: row i * G + j -> (i, j)
        new = new_lbntd[:, :, None]
        starts = [zero + layer, zero + group, zero, pos_b, zero]
    else:
        cache, new, starts = cache_lbnsd, new_lbntd, [zero + layer, zero, pos_b, zero]
    window = (0,) + tuple(range(2, cache.ndim))  # every axis but the rows, which pair with pos_b's
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=window, inserted_window_dims=(),
                                           scatter_dims_to_operand_dims=window, operand_batching_dims=(1,),
                                           scatter_indices_batching_dims=(0,))
    mode = jax.lax.GatherScatterMode.FILL_OR_DROP if skip_past_end else jax.lax.GatherScatterMode.CLIP
    out = jax.lax.scatter(cache, jnp.stack(starts, axis=1), new.astype(cache.dtype), dims, indices_are_sorted=True,
                          unique_indices=True, mode=mode)
    return out.reshape(shape)


def write_token(cache_lbnsd, new_bnd, layer, pos_b):
    """cache[layer, b, :, pos[b], :] = new[b] for every row b (pp = 1; pipeline stages write
    through `write_kv_columns`).

    Written as a per-row dynamic_update_slice under vmap, the form every GPU decode figure in
    BENCHMARKS.md was measured with. `write_kv_columns` does the same writes as one batched
    scatter; it was timed on the GPU only inside a pipeline stage, so the unpipelined decode
    keeps this form until it is timed there too."""
    def one_row(c_lnsd, u_nd, p):
        return jax.lax.dynamic_update_slice(c_lnsd, u_nd[None, :, None, :].astype(c_lnsd.dtype), (layer, 0, p, 0))
    if new_bnd.shape[0] == 1:
        # One row: the plain update, in place. The vmapped one is a scatter, which XLA lowers to an
        # update plus a kernel that reads back the old values (a select), each layer, each step.
        return jax.lax.dynamic_update_slice(cache_lbnsd, new_bnd[None, :, :, None, :].astype(cache_lbnsd.dtype),
                                            (layer, 0, 0, pos_b[0], 0))
    return jax.vmap(one_row, in_axes=(1, 0, 0), out_axes=1)(cache_lbnsd, new_bnd, pos_b)


def decode_attention_xla(q_bnd, k_bnsd, v_bnsd, lengths_b, *, scale):
    """One query per row against its cache; row b sees positions [0, lengths[b])."""
    s = k_bnsd.shape[2]
    mask_b1s = (jnp.arange(s)[None, :] < lengths_b[:, None])[:, None, :]
    k_bsnd = jnp.swapaxes(k_bnsd, 1, 2)
    v_bsnd = jnp.swapaxes(v_bnsd, 1, 2)
    return masked_attention(q_bnd[:, None], k_bsnd, v_bsnd, mask_b1s, scale)[:, 0]


def group_rows(c_bnsd, group, groups: int):
    """The rows of group `group` (rows i * groups + group) of a cache shared by interleaved groups."""
    if groups == 1:
        return c_bnsd
    return jax.lax.dynamic_index_in_dim(c_bnsd.reshape((-1, groups) + c_bnsd.shape[1:]), group, 1, keepdims=False)


def append_attention_xla(q_bnd, k_new_bnd, v_new_bnd, k_bnsd, v_bnsd, pos_b, *, scale):
    """One query per row against its cache's positions [0, pos[b]) and its own new K/V at pos[b],
    without writing the cache: slot pos[b] is replaced by the new K/V as it is read. The same
    scores as writing the token first and then `decode_attention_xla` over [0, pos[b]].

    Products and sums, not einsums: XLA can fuse the cache reads (a row group's slice, the new
    token swapped in) into the reductions, where a dot takes its operands materialised, a
    [B, N, S, D] copy per layer and operand. The CPU backend still materialises one such buffer
    at a time for its reduction kernels (tests/test_pipeline_memory.py)."""
    s = k_bnsd.shape[2]
    at_new_b1s1 = (jnp.arange(s)[None, :] == pos_b[:, None])[:, None, :, None]
    k_bnsd = jnp.where(at_new_b1s1, k_new_bnd[:, :, None, :].astype(k_bnsd.dtype), k_bnsd)
    scores_bns = jnp.sum(q_bnd[:, :, None, :].astype(jnp.float32) * k_bnsd.astype(jnp.float32), axis=-1) * scale
    mask_b1s = (jnp.arange(s)[None, :] <= pos_b[:, None])[:, None, :]
    scores_bns = jnp.where(mask_b1s, scores_bns, MASK_VALUE)
    # probabilities rounded to the cache dtype, as masked_attention rounds them before its einsum
    probs_bns1 = jnp.where(mask_b1s, jax.nn.softmax(scores_bns, axis=-1), 0.0).astype(v_bnsd.dtype)[..., None]
    # the new V is swapped into the products, not into V: they exist only after the softmax, so XLA
    # never holds a K-sized and a V-sized buffer at once where it does materialise them (CPU)
    pv_bnsd = jnp.where(at_new_b1s1, probs_bns1.astype(jnp.float32) * v_new_bnd[:, :, None, :].astype(jnp.float32),
                        probs_bns1.astype(jnp.float32) * v_bnsd.astype(jnp.float32))
    out_bnd = jnp.sum(pv_bnsd, axis=2)
    return out_bnd.astype(q_bnd.dtype)


class Attention(nn.Module):
    config: GPT2Config
    param_dtype: jnp.dtype = jnp.float32
    kernels: AttentionKernels | None = None  # fused attention; None = the XLA code below

    @nn.compact
    def __call__(self, x_bte, positions_bt, lengths_b, layer_cache):
        cfg = self.config
        e, n, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        # Projection weights are stored [out..., in] (see `project`).
        w_qkv = param(self, "qkv_kernel", (3, n, d, e), ("qkv", "heads", "kv", "embed"), dtype=self.param_dtype)
        b_qkv = param(self, "qkv_bias", (3, n, d), ("qkv", "heads", "kv"), nn.initializers.zeros, self.param_dtype)
        w_out = param(self, "out_kernel", (e, n, d), ("embed", "heads", "kv"), dtype=self.param_dtype)
        b_out = param(self, "out_bias", (e,), ("embed",), nn.initializers.zeros, self.param_dtype)

        qkv_btcnd = project(x_bte, w_qkv, 1, b_qkv)
        q_btnd, k_btnd, v_btnd = qkv_btcnd[:, :, 0], qkv_btcnd[:, :, 1], qkv_btcnd[:, :, 2]
        scale = attention_scale(d, cfg.scale_attn_weights)

        if layer_cache is None:  # prefill: causal within each row's real tokens
            t = x_bte.shape[1]
            causal_tt = jnp.tril(jnp.ones((t, t), dtype=bool))
            valid_bt = jnp.arange(t)[None, :] < lengths_b[:, None]
            mask_bts = causal_tt[None] & valid_bt[:, None, :]
            if self.kernels is not None:
                out_btnd = self.kernels.prefill(q_btnd, k_btnd, v_btnd, lengths_b, scale=scale)
            else:
                out_btnd = masked_attention(q_btnd, k_btnd, v_btnd, mask_bts, scale)
            new_kv = (jnp.swapaxes(k_btnd, 1, 2), jnp.swapaxes(v_btnd, 1, 2))  # [B, N, T, D]
        elif self.kernels is not None and self.kernels.decode_step is not None and layer_cache[0].shape[0] == 1:
            # decode, one layer's cache [1, B, N, S, D]: the write and the attention in one call
            k_all, v_all, _ = layer_cache
            out_bnd, k_bnsd, v_bnsd = self.kernels.decode_step(qkv_btcnd[:, 0], k_all[0], v_all[0], positions_bt[:, 0],
                                                               scale=scale)
            out_btnd = out_bnd[:, None]
            new_kv = (k_bnsd[None], v_bnsd[None])
        elif len(layer_cache) == 4:
            # decode of one row group: read the cache as it is, return this token's K/V [B, N, 1, D]
            k_all, v_all, layer, group = layer_cache
            groups = k_all.shape[1] // x_bte.shape[0]
            k_bnsd, v_bnsd = (group_rows(jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False), group, groups)
                              for c in (k_all, v_all))
            out_btnd = append_attention_xla(q_btnd[:, 0], k_btnd[:, 0], v_btnd[:, 0], k_bnsd, v_bnsd,
                                            positions_bt[:, 0], scale=scale)[:, None]
            new_kv = (jnp.swapaxes(k_btnd, 1, 2), jnp.swapaxes(v_btnd, 1, 2))  # [B, N, 1, D]
        else:  # decode: write this token's K/V into the cache, then attend over it
            k_all, v_all, layer = layer_cache
            pos = positions_bt[:, 0]
            k_all = write_token(k_all, k_btnd[:, 0], layer, pos)
            v_all = write_token(v_all, v_btnd[:, 0], layer, pos)
            k_bnsd = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
            v_bnsd = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
            attend = self.kernels.decode if self.kernels is not None else decode_attention_xla
            out_btnd = attend(q_btnd[:, 0], k_bnsd, v_bnsd, pos + 1, scale=scale)[:, None]
            new_kv = (k_all, v_all)
        out_bte = project(out_btnd, w_out, 2, b_out)
        return out_bte, new_kv


class MLP(nn.Module):
    config: GPT2Config
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bte):
        e, f = self.config.n_embd, self.config.mlp_dim
        w_fc = param(self, "fc_kernel", (f, e), ("mlp", "embed"), dtype=self.param_dtype)
        b_fc = param(self, "fc_bias", (f,), ("mlp",), nn.initializers.zeros, self.param_dtype)
        w_proj = param(self, "proj_kernel", (e, f), ("embed", "mlp"), dtype=self.param_dtype)
        b_proj = param(self, "proj_bias", (e,), ("embed",), nn.initializers.zeros, self.param_dtype)
        h_btf = project(x_bte, w_fc, 1, b_fc, gelu_new)
        return project(h_btf, w_proj, 1, b_proj)


class Block(nn.Module):
    """Pre-LN transformer block; scanned over layers with carry (x, k_cache, v_cache, layer).
    `group` (an int32 scalar, or None) decodes one row group of a cache read as it is (`BlockStack`)."""

    config: GPT2Config
    param_dtype: jnp.dtype = jnp.float32
    kernels: AttentionKernels | None = None

    @nn.compact
    def __call__(self, carry, positions_bt, lengths_b, group=None):
        x_bte, k_all, v_all, layer = carry
        eps = self.config.layer_norm_epsilon
        layer_cache = None if k_all is None else (k_all, v_all, layer) + (() if group is None else (group,))
        h_bte, new_kv = Attention(self.config, self.param_dtype, self.kernels, name="attn")(
            LayerNorm(eps, self.param_dtype, name="ln_1")(x_bte), positions_bt, lengths_b, layer_cache)
        x_bte = x_bte + h_bte
        x_bte = x_bte + MLP(self.config, self.param_dtype, name="mlp")(
            LayerNorm(eps, self.param_dtype, name="ln_2")(x_bte))
        if k_all is None or group is not None:
            return (x_bte, k_all, v_all, layer + 1), new_kv  # per-layer fresh K/V stacked as ys
        return (x_bte, new_kv[0], new_kv[1], layer + 1), None


class BlockStack(nn.Module):
    """`num_layers` blocks with parameters stacked on a leading "layers" axis.

    A cache with a "group" entry (int32 scalar g) is shared by G = cache rows / B interleaved row
    groups (row i * G + g is group g's row i; a pipeline stage's microbatches) and this call decodes
    group g: the cache is read, never written or copied, and kv is the new token's K/V
    [L, B, N, 1, D], as prefill returns its fresh K/V, for the caller to store (`write_kv_columns`)."""

    config: GPT2Config
    num_layers: int
    param_dtype: jnp.dtype = jnp.float32
    kernels: AttentionKernels | None = None

    @nn.compact
    def __call__(self, x_bte, positions_bt, lengths_b, cache: Cache | None):
        scanned = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.config, self.param_dtype, self.kernels, name="blocks")
        k_all = None if cache is None else cache["k"]
        v_all = None if cache is None else cache["v"]
        group = None if cache is None else cache.get("group")
        (x_bte, k_all, v_all, _), ys = scanned((x_bte, k_all, v_all, jnp.int32(0)), positions_bt, lengths_b, group)
        if cache is None or group is not None:
            k_lbntd, v_lbntd = ys
            return x_bte, {"k": k_lbntd, "v": v_lbntd}
        return x_bte, {"k": k_all, "v": v_all}


class GPT2(nn.Module):
    """`table_multiple` pads the embedding tables' rows so they split evenly over devices;
    padded vocabulary entries get logits of -inf, which no temperature makes samplable (a finite
    mask value divided by a huge temperature came up to ~0, level with the real logits)."""

    config: GPT2Config
    param_dtype: jnp.dtype = jnp.float32
    kernels: AttentionKernels | None = None
    table_multiple: int = 1

    def setup(self):
        cfg = self.config
        self.wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                              (padded_rows(cfg.vocab_size, self.table_multiple), cfg.n_embd), self.param_dtype)
        self.wpe = self.param("wpe", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("positions", "embed")),
                              (padded_rows(cfg.n_positions, self.table_multiple), cfg.n_embd), self.param_dtype)
        self.h = BlockStack(cfg, cfg.n_layer, self.param_dtype, self.kernels)
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, self.param_dtype)

    def embed(self, tokens_bt, positions_bt):
        return jnp.take(self.wte, tokens_bt, axis=0) + jnp.take(self.wpe, positions_bt, axis=0)

    def head(self, x_bte):
        """Final layer norm and the tied LM head; logits in float32."""
        logits_btv = jnp.einsum("BTE,VE->BTV", self.ln_f(x_bte), self.wte, preferred_element_type=jnp.float32)
        if self.wte.shape[0] > self.config.vocab_size:
            logits_btv = jnp.where(jnp.arange(self.wte.shape[0]) < self.config.vocab_size, logits_btv, -jnp.inf)
        return logits_btv


    def __call__(self, tokens_bt, positions_bt, lengths_b=None, cache: Cache | None = None, logit_index_b=None):
        """Returns (logits, kv). `logit_index_b` [B] picks one position per row (saves the
        [B, T, vocab] matmul when only the next token is needed)."""
        if lengths_b is None:
            lengths_b = jnp.full((tokens_bt.shape[0],), tokens_bt.shape[1], jnp.int32)
        x_bte = self.embed(tokens_bt, positions_bt)
        x_bte, kv = self.h(x_bte, positions_bt, lengths_b, cache)
        if logit_index_b is not None:
            x_bte = jnp.take_along_axis(x_bte, logit_index_b[:, None, None], axis=1)  # [B, 1, E]
        return self.head(x_bte), kv


def stage_stack(model: GPT2, num_layers: int) -> BlockStack:
    """A standalone stack of `num_layers` blocks of `model` (one pipeline stage's worth);
    its parameters are a slice of `params["h"]`."""
    return BlockStack(model.config, num_layers, model.param_dtype, model.kernels, parent=None)
