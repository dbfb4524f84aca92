"""Bert as a Flax Linen module with Hugging Face `BertModel` semantics, over packed token streams.

Reading order: config, activations, packed attention, BertLayer, BertLayerStack, heads, Bert.
Word + position + token-type embeddings, embedding LayerNorm, post-LN blocks, optional pooler
(dense + tanh on [CLS]) and masked-LM head (decoder tied to the word embeddings).

Every activation is a packed stream without a batch axis: sequence i occupies tokens
[cu_seqlens[i], cu_seqlens[i+1]) of a [T] stream, `positions_t` restart at 0 for each
sequence, and `segments_t` holds the sequence index of each token (-1 on the padding that
fills the stream up to its bucket). Dense layers therefore see only real tokens (plus the
bucket's tail) and attention never crosses sequences. No jit here: `engine/bert.py` owns it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from energon_jax.models.layers import ACTIVATIONS, LayerNorm, attention_scale, masked_attention, padded_rows, param


def quick_gelu(x):
    """HF `quick_gelu`: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` values (transformers.activations.ACT2FN names) that this module reproduces.
# "gelu_fast" is the same tanh approximation as "gelu_new", written differently.
BERT_ACTIVATIONS: dict[str, Callable] = {
    **ACTIVATIONS,
    "gelu_fast": ACTIVATIONS["gelu_new"],
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    has_pooler: bool = True  # dense + tanh over [CLS] (HF `pooler_output`)
    has_mlm_head: bool = False  # HF `cls.predictions`: transform + tied decoder + bias

    model_type = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in BERT_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; accepted: {sorted(BERT_ACTIVATIONS)}")
        if self.type_vocab_size < 1:
            raise ValueError(f"type_vocab_size={self.type_vocab_size} must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings

    def num_params(self) -> int:
        e, f, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = (3 * e * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e) + 4 * e
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * e + 2 * e
        pooler = e * e + e if self.has_pooler else 0
        mlm = e * e + 3 * e + self.vocab_size if self.has_mlm_head else 0
        return emb + l * per_layer + pooler + mlm


# ---------------------------------------------------------------------------- attention
ATTENTION_IMPLS = ("xla", "auto", "triton")


def segment_window(t: int, max_seqlen: int, block: int = 128) -> int:
    """Keys each query of a t-token stream scores in `segment_attention_xla`: its window, or all t
    (the dense mask) for short streams or ones not divisible into blocks."""
    return t if t <= block + 2 * max_seqlen or t % block else block + 2 * max_seqlen


def segment_attention_xla(q_tnd, k_tnd, v_tnd, segments_t, scale: float, max_seqlen: int, block: int = 128):
    """Attention within sequences of a packed stream, by segment mask: [T, N, D] -> [T, N, D].

    Token q sees key k iff segments[q] == segments[k] >= 0; padding (segment -1) gives zeros.
    Since no sequence is longer than `max_seqlen` (static), the keys a block of `block`
    queries can see lie within `max_seqlen` tokens on either side of it: long streams attend
    block-by-window, O(T * (block + 2 * max_seqlen)) rather than O(T^2). Short streams (or
    ones not divisible into blocks) use the dense [T, T] mask.
    """
    t, n, d = q_tnd.shape
    w = max_seqlen
    if segment_window(t, w, block) == t:
        seg_k = segments_t[None, :]
        mask_tt = (segments_t[:, None] == seg_k) & (seg_k >= 0)
        return masked_attention(q_tnd[None], k_tnd[None], v_tnd[None], mask_tt[None], scale)[0]
    nb = t // block
    pad = ((w, w), (0, 0), (0, 0))
    k_pnd, v_pnd = jnp.pad(k_tnd, pad), jnp.pad(v_tnd, pad)  # [T + 2w, N, D]
    seg_p = jnp.pad(segments_t, (w, w), constant_values=-1)
    # window of query block j: padded tokens [j*block, j*block + block + 2w) = stream [j*block - w, (j+1)*block + w)
    idx_jk = (jnp.arange(nb) * block)[:, None] + jnp.arange(block + 2 * w)[None, :]
    seg_jq = segments_t.reshape(nb, block)
    seg_jk = seg_p[idx_jk]
    mask_jqk = (seg_jq[:, :, None] == seg_jk[:, None, :]) & (seg_jk[:, None, :] >= 0)
    out_jqnd = masked_attention(q_tnd.reshape(nb, block, n, d), k_pnd[idx_jk], v_pnd[idx_jk], mask_jqk, scale)
    return out_jqnd.reshape(t, n, d)


@dataclasses.dataclass(frozen=True)
class PackedAttention:
    """How attention runs over a packed stream. Static: part of the compiled program.

    max_seqlen: bound on every sequence's length in the stream (the engine buckets it).
    impl: "xla" (segment mask, here), or "auto" / "triton" for the fused varlen kernel of
    `energon_jax.kernels.varlen_attention` ("auto" = Triton on a GPU, its XLA reference elsewhere).
    mesh: passed to the kernel so it runs per device on its own heads.
    """

    max_seqlen: int
    impl: str = "xla"
    mesh: Any = None
    block: int = 128

    def __post_init__(self):
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.impl!r} is not supported; accepted: {ATTENTION_IMPLS}")
        if not isinstance(self.max_seqlen, int) or self.max_seqlen < 1:
            raise ValueError(f"max_seqlen={self.max_seqlen!r} must be an int >= 1")

    def __call__(self, q_tnd, k_tnd, v_tnd, segments_t, cu_seqlens_s, scale: float):
        if self.impl == "xla":
            return segment_attention_xla(q_tnd, k_tnd, v_tnd, segments_t, scale, self.max_seqlen, self.block)
        from energon_jax.kernels.varlen_attention import varlen_attention  # lazy: Triton only when asked

        return varlen_attention(q_tnd, k_tnd, v_tnd, cu_seqlens_s, scale=scale, max_seqlen=self.max_seqlen,
                                impl=self.impl, mesh=self.mesh)


def _residual_ln(ln: LayerNorm, x_te, h_te):
    """LayerNorm(x + h) with the residual sum in float32 (one rounding, not two, in bf16)."""
    return ln(x_te.astype(jnp.float32) + h_te.astype(jnp.float32)).astype(x_te.dtype)


# ---------------------------------------------------------------------------- encoder
class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + Attn(x)); x = LN(x + MLP(x)). Scanned over layers."""

    config: BertConfig
    param_dtype: jnp.dtype
    attention: PackedAttention

    @nn.compact
    def __call__(self, x_te, segments_t, cu_seqlens_s):
        cfg = self.config
        e, n, d, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        pd, zeros = self.param_dtype, nn.initializers.zeros
        w_qkv = param(self, "qkv_kernel", (e, 3, n, d), ("embed", "qkv", "heads", "kv"), dtype=pd)
        b_qkv = param(self, "qkv_bias", (3, n, d), ("qkv", "heads", "kv"), zeros, pd)
        w_o = param(self, "out_kernel", (n, d, e), ("heads", "kv", "embed"), dtype=pd)
        b_o = param(self, "out_bias", (e,), ("embed",), zeros, pd)
        w_in = param(self, "mlp_in_kernel", (e, f), ("embed", "mlp"), dtype=pd)
        b_in = param(self, "mlp_in_bias", (f,), ("mlp",), zeros, pd)
        w_out = param(self, "mlp_out_kernel", (f, e), ("mlp", "embed"), dtype=pd)
        b_out = param(self, "mlp_out_bias", (e,), ("embed",), zeros, pd)

        qkv_tcnd = jnp.einsum("TE,ECND->TCND", x_te, w_qkv) + b_qkv
        attn_tnd = self.attention(qkv_tcnd[:, 0], qkv_tcnd[:, 1], qkv_tcnd[:, 2], segments_t, cu_seqlens_s,
                                  attention_scale(d))
        h_te = jnp.einsum("TND,NDE->TE", attn_tnd, w_o) + b_o
        x_te = _residual_ln(LayerNorm(cfg.layer_norm_eps, pd, name="attention_ln"), x_te, h_te)
        h_tf = BERT_ACTIVATIONS[cfg.hidden_act](jnp.einsum("TE,EF->TF", x_te, w_in) + b_in)
        h_te = jnp.einsum("TF,FE->TE", h_tf, w_out) + b_out
        x_te = _residual_ln(LayerNorm(cfg.layer_norm_eps, pd, name="output_ln"), x_te, h_te)
        return x_te, None


class BertLayerStack(nn.Module):
    """`num_layers` Bert layers with parameters stacked on a leading "layers" axis.

    Callable on its own, so pipeline stages can each run a slice of the stack.
    """

    config: BertConfig
    num_layers: int
    param_dtype: jnp.dtype = jnp.float32
    attention: PackedAttention | None = None

    @nn.compact
    def __call__(self, x_te, segments_t, cu_seqlens_s):
        attention = self.attention or PackedAttention(self.config.max_position_embeddings)
        scanned = nn.scan(
            BertLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.config, self.param_dtype, attention, name="layers")
        x_te, _ = scanned(x_te, segments_t, cu_seqlens_s)
        return x_te


# ---------------------------------------------------------------------------- heads
class BertPooler(nn.Module):
    """HF `pooler_output`: tanh(dense(hidden state of [CLS]))."""

    config: BertConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cls_se):
        e = self.config.hidden_size
        w = param(self, "kernel", (e, e), ("embed", None), dtype=self.param_dtype)
        b = param(self, "bias", (e,), (None,), nn.initializers.zeros, self.param_dtype)
        return jnp.tanh(jnp.einsum("SE,EF->SF", cls_se, w, preferred_element_type=jnp.float32) + b)


class BertMLMHead(nn.Module):
    """HF `cls.predictions`: dense + act + LayerNorm, then the decoder tied to the word embeddings."""

    config: BertConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_te, word_embeddings_ve):
        cfg = self.config
        e, pd = cfg.hidden_size, self.param_dtype
        w = param(self, "transform_kernel", (e, e), ("embed", None), dtype=pd)
        b = param(self, "transform_bias", (e,), (None,), nn.initializers.zeros, pd)
        bias_v = param(self, "bias", (word_embeddings_ve.shape[0],), ("vocab",), nn.initializers.zeros, pd)
        h_te = BERT_ACTIVATIONS[cfg.hidden_act](jnp.einsum("TE,EF->TF", x_te, w) + b)
        h_te = LayerNorm(cfg.layer_norm_eps, pd, name="transform_ln")(h_te)
        logits_tv = jnp.einsum("TE,VE->TV", h_te, word_embeddings_ve, preferred_element_type=jnp.float32)
        return (logits_tv + bias_v.astype(jnp.float32))[:, : cfg.vocab_size]  # padded rows cut off


# ---------------------------------------------------------------------------- model
class Bert(nn.Module):
    """Pieces callable separately (`method=`): `embed`, `encoder` (BertLayerStack), `pool`, `mlm_logits`.

    `table_multiple` pads the word and position tables' rows (and the masked-LM bias) to a
    multiple of the devices they split over; padded rows are never looked up and padded
    logits are cut off, so the numbers do not change.
    """

    config: BertConfig
    param_dtype: jnp.dtype = jnp.float32
    attention: PackedAttention | None = None
    table_multiple: int = 1

    def setup(self):
        cfg, pd = self.config, self.param_dtype
        e, init = cfg.hidden_size, nn.initializers.normal(0.02)
        vocab = padded_rows(cfg.vocab_size, self.table_multiple)
        self.word_embeddings = param(self, "word_embeddings", (vocab, e), ("vocab", "embed"), init, pd)
        self.position_embeddings = param(self, "position_embeddings",
                                         (padded_rows(cfg.max_position_embeddings, self.table_multiple), e),
                                         ("positions", "embed"), init, pd)
        self.token_type_embeddings = param(self, "token_type_embeddings", (cfg.type_vocab_size, e),
                                           ("token_types", "embed"), init, pd)
        self.embeddings_ln = LayerNorm(cfg.layer_norm_eps, pd)
        self.encoder = BertLayerStack(cfg, cfg.num_hidden_layers, pd, self.attention)
        if cfg.has_pooler:
            self.pooler = BertPooler(cfg, pd)
        if cfg.has_mlm_head:
            self.mlm = BertMLMHead(cfg, pd)

    def embed(self, tokens_t, positions_t, token_types_t):
        """[T] ids -> [T, E]: LayerNorm(word + position + token type), summed in float32."""
        x_te = (jnp.take(self.word_embeddings, tokens_t, axis=0).astype(jnp.float32)
                + jnp.take(self.position_embeddings, positions_t, axis=0).astype(jnp.float32)
                + jnp.take(self.token_type_embeddings, token_types_t, axis=0).astype(jnp.float32))
        return self.embeddings_ln(x_te).astype(self.param_dtype)

    def pool(self, x_te, cu_seqlens_s):
        """Pooler output [S, E] float32 of each sequence's first token ([CLS])."""
        if not self.config.has_pooler:
            raise ValueError("this Bert checkpoint has no pooler (pooler.dense.* not in the checkpoint)")
        return self.pooler(jnp.take(x_te, cu_seqlens_s[:-1], axis=0, mode="clip"))

    def mlm_logits(self, x_te):
        """Masked-LM logits [T, vocab] float32."""
        if not self.config.has_mlm_head:
            raise ValueError("this Bert checkpoint has no masked-LM head (cls.predictions.* not in the checkpoint)")
        return self.mlm(x_te, self.word_embeddings)

    def __call__(self, tokens_t, positions_t, token_types_t, segments_t, cu_seqlens_s):
        """Packed stream -> last hidden states [T, E] (padding rows are meaningless)."""
        x_te = self.encoder(self.embed(tokens_t, positions_t, token_types_t), segments_t, cu_seqlens_s)
        if self.is_initializing():  # create the heads' parameters too
            if self.config.has_pooler:
                self.pool(x_te, cu_seqlens_s)
            if self.config.has_mlm_head:
                self.mlm_logits(x_te)
        return x_te
