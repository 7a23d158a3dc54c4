"""A plain jax.numpy Llama forward pass written from a Hugging Face tensor dict and config.

It shares no code with lorajax's model: it is the oracle the tests compare against. The
computation is deliberately naive: key/value heads are repeated explicitly, each rotary
pair is rotated with its own cosine and sine, and the causal mask is built with -inf.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(x, w_hf):
    """``x @ W.T`` for a Hugging Face ``(d_out, d_in)`` weight."""
    return jnp.matmul(x, jnp.asarray(w_hf, jnp.float32).T, precision=HIGHEST)


def _rms_norm(x, weight, eps):
    mean_square = jnp.mean(x * x, axis=-1, keepdims=True)
    return x / jnp.sqrt(mean_square + eps) * jnp.asarray(weight, jnp.float32)[None, None, :]


def _rotate(x, positions, theta):
    """Rotary embedding of ``x: (b, heads, s, hd)``: channel ``i`` pairs with ``i + hd/2``."""
    hd = x.shape[-1]
    half = hd // 2
    freqs = np.array([theta ** (-(2.0 * i) / hd) for i in range(half)], dtype=np.float64)
    angles = (
        jnp.asarray(positions, jnp.float32)[:, :, None]
        * jnp.asarray(freqs, jnp.float32)[None, None, :]
    )
    cos = jnp.cos(angles)[:, None, :, :]
    sin = jnp.sin(angles)[:, None, :, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def forward(tensors: Mapping[str, np.ndarray], config: Mapping, tokens, positions=None):
    """Float32 logits ``(batch, seq, vocab)`` of a Llama given HF tensors and config dict."""
    tokens = np.asarray(tokens)
    b, s = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(s), (b, s))
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    hd = config.get("head_dim") or config["hidden_size"] // n_heads
    eps = config["rms_norm_eps"]
    theta = config["rope_theta"]
    embed = jnp.asarray(tensors["model.embed_tokens.weight"], jnp.float32)

    h = embed[jnp.asarray(tokens)]
    mask = np.triu(np.ones((s, s), dtype=bool), k=1)  # True above the diagonal: the future
    for i in range(config["num_hidden_layers"]):
        w = {k[len(f"model.layers.{i}.") :]: v for k, v in tensors.items()
             if k.startswith(f"model.layers.{i}.")}  # fmt: skip
        x = _rms_norm(h, w["input_layernorm.weight"], eps)
        q = _mm(x, w["self_attn.q_proj.weight"]).reshape(b, s, n_heads, hd).transpose(0, 2, 1, 3)
        k = _mm(x, w["self_attn.k_proj.weight"]).reshape(b, s, n_kv, hd).transpose(0, 2, 1, 3)
        v = _mm(x, w["self_attn.v_proj.weight"]).reshape(b, s, n_kv, hd).transpose(0, 2, 1, 3)
        q = _rotate(q, positions, theta)
        k = _rotate(k, positions, theta)
        k = jnp.repeat(k, n_heads // n_kv, axis=1)  # head j uses kv head j // (H / KV)
        v = jnp.repeat(v, n_heads // n_kv, axis=1)
        scores = jnp.matmul(q, k.transpose(0, 1, 3, 2), precision=HIGHEST) / np.sqrt(hd)
        scores = jnp.where(jnp.asarray(mask)[None, None], -jnp.inf, scores)
        probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = probs / probs.sum(axis=-1, keepdims=True)
        attn = jnp.matmul(probs, v, precision=HIGHEST).transpose(0, 2, 1, 3).reshape(b, s, -1)
        h = h + _mm(attn, w["self_attn.o_proj.weight"])
        x = _rms_norm(h, w["post_attention_layernorm.weight"], eps)
        gate = _mm(x, w["mlp.gate_proj.weight"])
        up = _mm(x, w["mlp.up_proj.weight"])
        h = h + _mm(gate / (1.0 + jnp.exp(-gate)) * up, w["mlp.down_proj.weight"])
    h = _rms_norm(h, tensors["model.norm.weight"], eps)
    head = embed if config.get("tie_word_embeddings") else tensors["lm_head.weight"]
    return _mm(h, head)


def random_tensors(config: Mapping, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 HF tensors for ``config`` (norm weights away from one)."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    hd = config.get("head_dim") or d // n_heads

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.3 * rng.standard_normal(d)).astype(np.float32)

    out = {"model.embed_tokens.weight": normal(v, d, scale=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm_weight()
        out[p + "self_attn.q_proj.weight"] = normal(n_heads * hd, d, scale=d**-0.5)
        out[p + "self_attn.k_proj.weight"] = normal(n_kv * hd, d, scale=d**-0.5)
        out[p + "self_attn.v_proj.weight"] = normal(n_kv * hd, d, scale=d**-0.5)
        out[p + "self_attn.o_proj.weight"] = normal(d, n_heads * hd, scale=(n_heads * hd) ** -0.5)
        out[p + "post_attention_layernorm.weight"] = norm_weight()
        out[p + "mlp.gate_proj.weight"] = normal(f, d, scale=d**-0.5)
        out[p + "mlp.up_proj.weight"] = normal(f, d, scale=d**-0.5)
        out[p + "mlp.down_proj.weight"] = normal(d, f, scale=f**-0.5)
    out["model.norm.weight"] = norm_weight()
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = normal(v, d, scale=d**-0.5)
    return out
