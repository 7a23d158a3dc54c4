"""The hyperparameters of a Llama-family decoder, and their Hugging Face ``config.json`` form."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from lorajax._src.models.errors import ModelFileError

__all__ = ["LlamaConfig"]

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_REQUIRED_HF = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family decoder (``LlamaForCausalLM`` in Hugging Face).

    The config is frozen and hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Model width ``d``.
        intermediate_size: Width of the SwiGLU feed-forward block.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention); must
            divide ``num_attention_heads``.
        head_dim: Width of one head; ``None`` means ``hidden_size // num_attention_heads``
            and is resolved at construction.
        rope_theta: Base of the rotary position embedding frequencies.
        rms_norm_eps: Epsilon of the RMS norms.
        max_position_embeddings: Longest context the model was trained for (informative).
        tie_word_embeddings: Whether the output projection is the transposed embedding.
        bos_token_id: Beginning-of-sequence token id, if any.
        eos_token_id: End-of-sequence token id, if any.

    Raises:
        ValueError: a field has a value no model can have (the message names the field).

    Examples:
        >>> from lorajax._src.models.config import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> cfg.head_dim
        8
        >>> LlamaConfig.from_hf(cfg.to_hf()) == cfg
        True
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads:
            raise ValueError(
                f"`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` "
                f"({kv_heads}); pick a `num_key_value_heads` that divides it."
            )
        head_dim = self.head_dim
        if head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) is not a multiple of "
                    f"`num_attention_heads` ({heads}); pass `head_dim` explicitly."
                )
            head_dim = self.hidden_size // heads
            object.__setattr__(self, "head_dim", head_dim)
        if not _is_int(head_dim) or head_dim <= 0 or head_dim % 2:
            raise ValueError(
                f"`head_dim` must be a positive even int (rotary embeddings pair up "
                f"channels), got {head_dim!r}."
            )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"`tie_word_embeddings` must be a bool, got {self.tie_word_embeddings!r}."
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"`{name}` must be None or a non-negative int, got {value!r}.")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict (transformers 4.x or 5.x spelling).

        Both ``rope_theta`` at the top level (4.x) and
        ``rope_parameters={"rope_theta": ..., "rope_type": "default"}`` (5.x) are read.
        Keys that do not change the maths (``architectures``, ``torch_dtype``,
        ``use_cache``, ...) and unknown keys are ignored.

        Args:
            d: The parsed ``config.json``.
            source: Where ``d`` came from, for error messages.

        Returns:
            The config.

        Raises:
            ModelFileError: a required field is missing or has a bad value, or the config
                asks for something this model does not implement (another ``model_type``,
                an activation other than SiLU, rope scaling, attention/MLP biases, sliding
                window attention, ...). The message names the field and value.

        Examples:
            >>> from lorajax._src.models.config import LlamaConfig
            >>> cfg = LlamaConfig.from_hf({
            ...     "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
            ...     "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            ...     "num_key_value_heads": 2,
            ...     "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}})
            >>> cfg.rope_theta
            500.0
        """
        if not isinstance(d, Mapping):
            raise ModelFileError(
                f"{source}: expected a JSON object of config fields, got {type(d).__name__}."
            )

        def bad(field: str, value: Any, why: str) -> ModelFileError:
            return ModelFileError(f"{source}: `{field}` = {value!r} is not supported: {why}")

        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise bad(
                "model_type",
                model_type,
                "only Llama-family checkpoints (model_type 'llama') can be loaded; convert the "
                "model to the Llama architecture or use another loader.",
            )
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise bad("hidden_act", hidden_act, "the MLP is SwiGLU; only 'silu' is implemented.")
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field, False):
                raise bad(field, d[field], "the projections have no biases; use a model without.")
        if d.get("rope_scaling") is not None:
            raise bad(
                "rope_scaling",
                d["rope_scaling"],
                "only plain rotary embeddings are implemented; remove the scaling (set it to "
                "null) or use a model without it.",
            )
        if d.get("sliding_window") is not None or d.get("use_sliding_window", False):
            field = (
                "sliding_window" if d.get("sliding_window") is not None else "use_sliding_window"
            )
            raise bad(field, d[field], "attention is full causal; set it to null/false.")
        partial = d.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise bad("partial_rotary_factor", partial, "rotary embeddings cover every channel.")

        rope_theta = d.get("rope_theta")
        rope_parameters = d.get("rope_parameters")
        if rope_parameters is not None:
            if not isinstance(rope_parameters, Mapping):
                raise bad("rope_parameters", rope_parameters, "expected a JSON object.")
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default":
                raise bad(
                    "rope_parameters.rope_type",
                    rope_type,
                    "only the 'default' rotary embedding is implemented; use a model without "
                    "rope scaling.",
                )
            extra = sorted(set(rope_parameters) - {"rope_theta", "rope_type", "type"})
            if extra:
                raise bad(
                    "rope_parameters",
                    dict(rope_parameters),
                    f"unexpected rope settings {extra}; only 'rope_theta' is implemented.",
                )
            if "rope_theta" in rope_parameters:
                rope_theta = rope_parameters["rope_theta"]
        if rope_theta is None:
            rope_theta = 10000.0

        for field in _REQUIRED_HF:
            if field not in d:
                raise ModelFileError(
                    f"{source}: required field `{field}` is missing; a Llama config.json "
                    f"needs {', '.join(_REQUIRED_HF)}."
                )

        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            # Several stop tokens: the first is the one used to end generation.
            eos = eos[0] if eos else None
        kwargs = {field: d[field] for field in _REQUIRED_HF}
        kwargs.update(
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rope_theta=rope_theta,
            # transformers' own default when the file does not say.
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
        )
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ModelFileError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``LlamaConfig`` reads (4.x and 5.x).

        Returns:
            A JSON-serialisable dict.

        Examples:
            >>> from lorajax._src.models.config import LlamaConfig
            >>> d = LlamaConfig(97, 32, 48, 2, 4, 2, rope_theta=500.0).to_hf()
            >>> d["model_type"], d["rope_parameters"]
            ('llama', {'rope_theta': 500.0, 'rope_type': 'default'})
        """
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
