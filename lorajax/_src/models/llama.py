r"""A Llama-family decoder in Flax NNX, with the maths of Hugging Face ``LlamaForCausalLM``.

Each of the ``L`` layers computes, on the residual stream ``h`` (pre-norm):

.. math::

    h \leftarrow h + W_o\,\mathrm{attn}\big(\mathrm{rope}(W_q \bar h),\,
        \mathrm{rope}(W_k \bar h),\, W_v \bar h\big), \quad \bar h = \mathrm{rms}(h)\odot g_1,

    h \leftarrow h + W_{down}\big(\mathrm{silu}(W_{gate}\bar h) \odot W_{up}\bar h\big),
    \quad \bar h = \mathrm{rms}(h)\odot g_2,

with ``rms(x) = x / sqrt(mean(x²) + eps)`` in float32, rotary embeddings with frequencies
``θ^(-2i/head_dim)`` applied with the "rotate half" convention, causal grouped-query
attention (query head ``h`` reads key/value head ``h // (H / KV)``) with a float32 softmax,
then a final RMS norm and the output projection (the transposed embedding when tied).

Parameter paths (``nnx.state(model, nnx.Param)``) follow the Hugging Face names:
``model/embed_tokens/embedding``, ``model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel``,
``model/layers/<i>/mlp/{gate,up,down}_proj/kernel``,
``model/layers/<i>/{input,post_attention}_layernorm/scale``, ``model/norm/scale`` and
``lm_head/kernel`` (untied only). Kernels are ``(d_in, d_out)``. With ``scan_layers=True``
the ``<i>`` disappears and every layer leaf gets a leading axis of size ``L``.

References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023,
    https://arxiv.org/abs/2302.13971.
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
    https://arxiv.org/abs/2104.09864.
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", 2023, https://arxiv.org/abs/2305.13245.
    Shazeer, "GLU Variants Improve Transformer", 2020, https://arxiv.org/abs/2002.05202.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from lorajax._src.models.config import LlamaConfig

__all__ = ["Llama", "LlamaAttention", "LlamaDecoderLayer", "LlamaMLP", "LlamaModel", "RMSNorm"]

_INIT_STD = 0.02  # transformers' default `initializer_range`


def _check_dtype(name: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating dtype such as jnp.float32, got {value!r}.")
    return dtype


def _lead(x: Array, ndim: int) -> Array:
    """Reshapes a vector so that it broadcasts along the last axis of an ``ndim`` array."""
    return x.reshape((1,) * (ndim - 1) + x.shape)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale; statistics in float32.

    Args:
        dim: Feature size.
        eps: Added to the mean square.
        dtype: Output dtype.
        param_dtype: Storage dtype of ``scale``.
    """

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * _lead(self.scale[...].astype(jnp.float32), x.ndim)).astype(self.dtype)


def _linear(
    d_in: int, d_out: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, **kw
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(_INIT_STD),
        rngs=rngs,
        **kw,
    )


def rope_tables(
    positions: Int[Array, "batch seq"], head_dim: int, theta: float
) -> tuple[Float[Array, "batch seq head_dim"], Float[Array, "batch seq head_dim"]]:
    """Cosine and sine tables of the rotary embedding (float32), halves repeated."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[..., None] * _lead(inv_freq, 3)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x: (b, s, heads, hd)`` with ``cos, sin: (b, s, hd)`` in float32."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings and no biases."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv, hd
        self.dtype = dtype
        self.q_proj = _linear(d, heads * hd, dtype, param_dtype, rngs)
        self.k_proj = _linear(d, kv * hd, dtype, param_dtype, rngs)
        self.v_proj = _linear(d, kv * hd, dtype, param_dtype, rngs)
        self.o_proj = _linear(heads * hd, d, dtype, param_dtype, rngs)

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        b, s, _ = x.shape
        kv, hd = self.num_kv_heads, self.head_dim
        group = self.num_heads // kv
        q = self.q_proj(x).reshape(b, s, kv * group, hd)
        k = self.k_proj(x).reshape(b, s, kv, hd)
        v = self.v_proj(x).reshape(b, s, kv, hd)
        q = _apply_rope(q, cos, sin).reshape(b, s, kv, group, hd)
        k = _apply_rope(k, cos, sin)
        # Query head kv * group + g reads key/value head kv.
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores * (hd**-0.5)
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None, None]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, s, kv * group * hd)
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(d, f, dtype, param_dtype, rngs)
        self.up_proj = _linear(d, f, dtype, param_dtype, rngs)
        self.down_proj = _linear(f, d, dtype, param_dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm decoder layer: attention then MLP, each with a residual."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps, **kw)
        self.self_attn = LlamaAttention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, **kw)
        self.mlp = LlamaMLP(config, rngs=rngs, **kw)

    def __call__(self, h: Array, cos: Array, sin: Array) -> Array:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


def _run_layer(layer: LlamaDecoderLayer, h: Array, cos: Array, sin: Array) -> Array:
    return layer(h, cos, sin)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose every variable stacks the modules' variables on a new axis 0."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.state(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.merge(graphdef, stacked)


def _embed(table: Array, tokens: Array) -> Array:
    # Under an Explicit mesh the rows gathered for batch-sharded tokens are sharded the
    # same way; JAX asks for that out_sharding to be spelt out.
    spec = getattr(jax.typeof(tokens).sharding, "spec", ())
    if any(axis is not None for axis in spec):
        return table.at[tokens].get(out_sharding=P(*spec, None))
    return jnp.take(table, tokens, axis=0)


class LlamaModel(nnx.Module):
    """Embedding, decoder layers and final norm (Hugging Face ``LlamaModel``)."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        scan_layers: bool,
        remat: bool,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.scan_layers = scan_layers
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=nnx.initializers.normal(_INIT_STD),
            rngs=rngs,
            **kw,
        )
        # Layers draw from `rngs` in the same order either way, so a scanned model and an
        # unscanned one built from the same seed hold the same weights.
        layers = [
            LlamaDecoderLayer(config, rngs=rngs, **kw) for _ in range(config.num_hidden_layers)
        ]
        self.layers = stack_modules(layers) if scan_layers else nnx.List(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)

    def __call__(self, tokens: Array, positions: Array) -> Array:
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        run = nnx.remat(_run_layer) if self.remat else _run_layer
        h = _embed(self.embed_tokens.embedding[...], tokens).astype(self.embed_tokens.dtype)
        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h: Array, layer_state: Any) -> tuple[Array, None]:
                return run(nnx.merge(graphdef, layer_state), h, cos, sin), None

            h, _ = jax.lax.scan(body, h, state)
        else:
            for layer in self.layers:
                h = run(layer, h, cos, sin)
        return self.norm(h)


class Llama(nnx.Module):
    """A Llama-family causal language model (Hugging Face ``LlamaForCausalLM``).

    Args:
        config: The hyperparameters.
        rngs: Random streams for initialisation (``params``): kernels and the embedding are
            drawn from N(0, 0.02²), norm scales are ones.
        dtype: Compute dtype. With ``jnp.bfloat16`` the matmuls run on bf16 kernels and
            activations; norm statistics, the softmax and the logits stay float32.
        param_dtype: Storage dtype of the parameters.
        scan_layers: Store the layers stacked (leading axis ``num_hidden_layers`` on every
            layer leaf) and run them with ``jax.lax.scan``: one compiled layer instead of L.
        remat: Recompute each layer's activations in the backward pass (gradient
            checkpointing with ``nnx.remat``); same values and gradients, less memory.

    Attributes:
        config: The :class:`LlamaConfig`.
        scan_layers: Whether the layers are stacked.
        remat: Whether layers are rematerialised.
        dtype: The compute dtype.
        param_dtype: The parameter dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.llama import Llama
        >>> cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = Llama(cfg, rngs=nnx.Rngs(0))
        >>> logits = model(jnp.array([[1, 2, 3]]))
        >>> logits.shape, logits.dtype
        ((1, 3, 97), dtype('float32'))
        >>> nnx.state(model, nnx.Param)["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"].shape
        (32, 16)
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
        remat: bool = False,
    ):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"`config` must be a LlamaConfig, got {type(config).__name__}.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"`rngs` must be an nnx.Rngs, e.g. nnx.Rngs(0), got {rngs!r}.")
        dtype = _check_dtype("dtype", dtype)
        param_dtype = _check_dtype("param_dtype", param_dtype)
        for name, value in (("scan_layers", scan_layers), ("remat", remat)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scan_layers = scan_layers
        self.remat = remat
        self.model = LlamaModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            remat=remat,
            rngs=rngs,
        )
        if not config.tie_word_embeddings:
            self.lm_head = _linear(
                config.hidden_size,
                config.vocab_size,
                dtype,
                param_dtype,
                rngs,
                preferred_element_type=jnp.float32,
            )

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Next-token logits for every position.

        Args:
            tokens: Token ids, ``(batch, seq)``.
            positions: Position of each token for the rotary embedding; defaults to
                ``0, 1, ..., seq - 1`` on every row. Attention is causal over the sequence
                axis whatever the positions.

        Returns:
            Float32 logits ``(batch, seq, vocab_size)``.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"`tokens` must be an int array of shape (batch, seq), got {tokens.dtype} "
                f"{tokens.shape}; add a batch axis with tokens[None] if needed."
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        else:
            positions = jnp.asarray(positions)
            if positions.shape != tokens.shape or not jnp.issubdtype(positions.dtype, jnp.integer):
                raise ValueError(
                    f"`positions` must be an int array shaped like `tokens` {tokens.shape}, "
                    f"got {positions.dtype} {positions.shape}."
                )
        h = self.model(tokens, positions)
        if self.config.tie_word_embeddings:
            table = self.model.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum(
                "bsd,vd->bsv", h.astype(self.dtype), table, preferred_element_type=jnp.float32
            )
        return self.lm_head(h).astype(jnp.float32)
