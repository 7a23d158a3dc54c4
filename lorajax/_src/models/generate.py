"""Greedy decoding with a :class:`Llama`, as one compiled program."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorajax._src.models.llama import Llama

__all__ = ["generate"]

# Buffer lengths are rounded up to a multiple of this, so prompts of similar lengths share
# one compiled program.
_BUCKET = 32


@functools.partial(jax.jit, static_argnums=0)
def _greedy(
    graphdef: Any, state: Any, buffer: jax.Array, start: jax.Array, stop: jax.Array, eos: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fills ``buffer[start:stop]`` greedily; stops early after writing ``eos``.

    Each step runs the model on the whole buffer: thanks to causal attention, the logits at
    position ``cur - 1`` depend only on ``buffer[:cur]``, whatever lies beyond.
    """
    model = nnx.merge(graphdef, state)

    def cond(carry: tuple) -> jax.Array:
        _, cur, done = carry
        return (cur < stop) & ~done

    def body(carry: tuple) -> tuple:
        buffer, cur, _ = carry
        logits = model(buffer[None])[0]
        last = jax.lax.dynamic_index_in_dim(logits, cur - 1, keepdims=False)
        token = jnp.argmax(last).astype(buffer.dtype)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, cur, 0)
        return buffer, cur + 1, token == eos

    buffer, cur, _ = jax.lax.while_loop(cond, body, (buffer, start, jnp.array(False)))
    return buffer, cur


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def generate(
    model: Llama,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt``: at each step the most likely next token.

    The whole loop is one compiled program over a fixed-length token buffer (the prompt
    length plus ``max_new_tokens``, rounded up to a multiple of 32); without a key/value
    cache, each step runs the model on the full buffer.

    Args:
        model: The language model.
        prompt: The prompt's token ids (at least one), e.g. from ``Tokenizer.encode``.
        max_new_tokens: The most tokens to generate (at least 1).
        eos_id: Stop after generating this id (it is included in the result). ``None``
            never stops early.

    Returns:
        The generated token ids only (not the prompt), at most ``max_new_tokens`` of them.

    Raises:
        TypeError: ``model`` is not a :class:`Llama`.
        ValueError: an empty prompt or one with ids outside the vocabulary, a
            ``max_new_tokens`` below 1, an ``eos_id`` outside the vocabulary, or a prompt
            that with the new tokens does not fit in ``config.max_position_embeddings``.

    Examples:
        >>> from flax import nnx
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.generate import generate
        >>> from lorajax._src.models.llama import Llama
        >>> cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> out = generate(Llama(cfg, rngs=nnx.Rngs(0)), [5, 6, 7], 4)
        >>> len(out), all(0 <= t < 97 for t in out)
        (4, True)
    """
    if not isinstance(model, Llama):
        raise TypeError(f"`model` must be a Llama, got {type(model).__name__}.")
    config = model.config
    vocab, context = config.vocab_size, config.max_position_embeddings
    if isinstance(prompt, (str, bytes)):
        raise TypeError("`prompt` must be a sequence of token ids; encode text first.")
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or not all(_is_int(t) for t in ids):
        raise ValueError(
            f"`prompt` must be a non-empty 1-D sequence of int token ids, got {prompt!r:.80}."
        )
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise ValueError(
            f"`prompt` holds ids outside [0, {vocab}) (the vocabulary size): {bad[:5].tolist()}."
        )
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab):
        raise ValueError(
            f"`eos_id` must be None or an int in [0, {vocab}) (the vocabulary size), "
            f"got {eos_id!r}."
        )
    n = ids.size
    if n > context:
        raise ValueError(
            f"`prompt` has {n} tokens, more than the model's context "
            f"(max_position_embeddings={context}); shorten the prompt."
        )
    total = n + max_new_tokens
    if total > context:
        raise ValueError(
            f"`prompt` ({n} tokens) plus `max_new_tokens` ({max_new_tokens}) exceed the "
            f"model's context (max_position_embeddings={context}); lower max_new_tokens to "
            f"at most {context - n}."
        )
    length = min(-(-total // _BUCKET) * _BUCKET, context)
    buffer = np.zeros(length, np.int32)
    buffer[:n] = ids
    graphdef, state = nnx.split(model)
    out, end = _greedy(
        graphdef,
        state,
        jnp.asarray(buffer),
        jnp.int32(n),
        jnp.int32(total),
        jnp.int32(-1 if eos_id is None else eos_id),
    )
    return np.asarray(out)[n : int(end)].tolist()
