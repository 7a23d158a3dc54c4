"""Hugging Face checkpoint directories: ``config.json`` + safetensors, read and written.

A checkpoint directory holds ``config.json`` and either ``model.safetensors``, a sharded
set listed by ``model.safetensors.index.json`` (``{"weight_map": {tensor: shard}}``), or
other ``*.safetensors`` files. Every file is checked (header, offsets, sizes, tensor names
and shapes against the config) before any parameter is built.

References:
    The safetensors format: https://huggingface.co/docs/safetensors (an 8-byte little-endian
    header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the data).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from lorajax._src.files import write_atomic
from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.convert import hf_tensors_from_model, model_from_hf_tensors
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.llama import Llama

__all__ = ["load_hf", "read_hf", "save_hf"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, Any] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _corrupt(path: pathlib.Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"{path}: not a valid safetensors file ({why}). The file is truncated or corrupt; "
        f"download or save it again."
    )


class _LazyTensor:
    """A tensor of a validated safetensors file, read (as float32) only when converted."""

    def __init__(self, path: pathlib.Path, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.name, self.dtype, self.shape = path, name, dtype, shape

    def _read(self) -> np.ndarray:
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                return f.get_tensor(self.name)
        except Exception:
            if self.dtype != np.dtype(ml_dtypes.bfloat16):
                raise
        # Older safetensors cannot hand bf16 to numpy: decode the raw bytes instead.
        header_size, header = _read_header(self.path)
        begin, _ = header[self.name]["data_offsets"]
        count = math.prod(self.shape)
        raw = np.fromfile(
            self.path, dtype=np.dtype(np.uint16).newbyteorder("<"), count=count,
            offset=8 + header_size + begin,
        )  # fmt: skip
        return raw.astype(np.uint16).view(ml_dtypes.bfloat16).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        try:
            array = self._read()
        except ModelFileError:
            raise
        except Exception as e:
            raise ModelFileError(
                f"{self.path}: reading tensor {self.name!r} failed ({e}); the file is corrupt, "
                f"download or save it again."
            ) from e
        return np.asarray(array, dtype=np.float32 if dtype is None else dtype)


def _read_header(path: pathlib.Path) -> tuple[int, dict[str, Any]]:
    """Parses and checks a safetensors header: sizes, offsets and dtypes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, _MAX_HEADER):
            raise _corrupt(
                path, f"the header claims {header_size} bytes but the file has {size - 8} after "
                f"the length prefix"
            )  # fmt: skip
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_size = size - 8 - header_size
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(n) for n in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for tensor {name!r}: {entry!r}") from None
        if dtype_name not in _DTYPES:
            raise ModelFileError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which cannot be loaded; save "
                f"the checkpoint in float32, float16 or bfloat16."
            )
        nbytes = math.prod(shape) * _DTYPES[dtype_name].itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
            raise _corrupt(
                path, f"tensor {name!r} has offsets [{begin}, {end}] that do not fit its "
                f"{dtype_name} shape {list(shape)}"
            )  # fmt: skip
        if end > data_size:
            raise _corrupt(
                path, f"tensor {name!r} ends at byte {end} of the data but the file holds "
                f"only {data_size} data bytes"
            )  # fmt: skip
        entries[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": (begin, end)}
    return header_size, entries


def _tensors_of(path: pathlib.Path) -> dict[str, _LazyTensor]:
    _, header = _read_header(path)
    return {
        name: _LazyTensor(path, name, _DTYPES[e["dtype"]], e["shape"]) for name, e in header.items()
    }


def _read_json(path: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(
            f"{path}: the {what} is not valid JSON ({e}); fix or regenerate the file."
        ) from None


def _weight_files(directory: pathlib.Path) -> tuple[dict[str, _LazyTensor], str]:
    """All tensors of a checkpoint directory (lazily) and a description of their source."""
    single = directory / WEIGHTS_NAME
    index = directory / INDEX_NAME
    if single.is_file():
        return _tensors_of(single), str(single)
    if index.is_file():
        spec = _read_json(index, "shard index")
        weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ModelFileError(
                f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard "
                f"file name; regenerate the index."
            )
        shards: dict[str, dict[str, _LazyTensor]] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"{shard_path}: shard listed in {index} does not exist; the checkpoint is "
                    f"incomplete, download the missing shard."
                )
            shards[shard] = _tensors_of(shard_path)
        tensors = {}
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                raise ModelFileError(
                    f"{index}: tensor {name!r} is listed in shard {shard!r} but that file does "
                    f"not hold it; regenerate the index or download the shard again."
                )
            tensors[name] = shards[shard][name]
        return tensors, str(index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no weights found; expected {WEIGHTS_NAME}, or {INDEX_NAME} with its "
            f"shards, next to {CONFIG_NAME}."
        )
    tensors = {}
    for file in files:
        for name, tensor in _tensors_of(file).items():
            if name in tensors:
                raise ModelFileError(
                    f"{file}: tensor {name!r} also appears in {tensors[name].path}; keep one "
                    f"checkpoint per directory."
                )
            tensors[name] = tensor
    return tensors, str(directory)


def _check_dir(path: str | os.PathLike) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    directory = pathlib.Path(path)
    if not directory.exists():
        raise FileNotFoundError(
            f"{directory}: no such directory; expected a Hugging Face checkpoint directory with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if not directory.is_dir():
        raise ModelFileError(
            f"{directory}: expected a Hugging Face checkpoint directory (with {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}), got a file; pass its parent directory."
        )
    return directory


def read_hf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any], str]:
    """Reads and checks a checkpoint directory's config and tensor headers, loading no data.

    Args:
        path: The checkpoint directory.

    Returns:
        ``(config, tensors, source)``: the tensors are lazy arrays (``shape``, ``dtype``,
        and ``np.asarray(t)`` reads them as float32); ``source`` names the weights file.

    Raises:
        FileNotFoundError: ``path``, ``config.json`` or the weights do not exist.
        ModelFileError: a file is corrupt or truncated, or the config is unsupported.

    Examples:
        >>> import tempfile
        >>> import numpy as np
        >>> from flax import nnx
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.hf import read_hf, save_hf
        >>> from lorajax._src.models.llama import Llama
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_hf(Llama(LlamaConfig(97, 32, 48, 1, 4, 2), rngs=nnx.Rngs(0)), d)
        ...     config, tensors, _ = read_hf(d)
        ...     norm = np.asarray(tensors["model.norm.weight"])
        >>> config.num_hidden_layers, tensors["lm_head.weight"].shape, norm[:2]
        (1, (97, 32), array([1., 1.], dtype=float32))
    """
    directory = _check_dir(path)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: missing; a Hugging Face checkpoint directory needs {CONFIG_NAME} "
            f"(the model's hyperparameters) next to its weights."
        )
    config = LlamaConfig.from_hf(_read_json(config_path, "model config"), source=str(config_path))
    tensors, source = _weight_files(directory)
    return config, tensors, source


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
) -> Llama:
    """Loads a Hugging Face Llama checkpoint directory into a :class:`Llama`.

    float16 and bfloat16 tensors are widened to float32, then stored as ``param_dtype``.

    Args:
        path: Directory with ``config.json`` and ``model.safetensors`` (or a sharded set
            with ``model.safetensors.index.json``).
        dtype: Compute dtype.
        param_dtype: Parameter storage dtype.
        scan_layers: Build the stacked-layer layout.
        remat: Gradient checkpointing.

    Returns:
        The model.

    Raises:
        FileNotFoundError: the directory, ``config.json``, the weights or a shard is missing.
        ModelFileError: a file is not valid JSON/safetensors (corrupt or truncated), the
            config asks for something unsupported, or a tensor is missing, unexpected or
            wrongly shaped.

    Examples:
        >>> import tempfile
        >>> import numpy as np
        >>> from flax import nnx
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.hf import load_hf, save_hf
        >>> from lorajax._src.models.llama import Llama
        >>> model = Llama(LlamaConfig(97, 32, 48, 2, 4, 2), rngs=nnx.Rngs(0))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_hf(model, d)
        ...     loaded = load_hf(d)
        >>> tokens = np.array([[1, 2, 3]])
        >>> bool(np.array_equal(loaded(tokens), model(tokens)))
        True
    """
    config, tensors, source = read_hf(path)
    return model_from_hf_tensors(
        config,
        tensors,
        dtype=dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        remat=remat,
        source=source,
    )


def save_hf(model: Llama, path: str | os.PathLike, *, tokenizer: Any = None) -> None:
    """Writes a Hugging Face checkpoint directory: ``config.json`` + ``model.safetensors``.

    Tensors are float32 under Hugging Face names and layouts (tied models have no
    ``lm_head.weight``), so ``transformers.LlamaForCausalLM.from_pretrained`` reads the
    directory. Files are written to temporary names in the directory and renamed into place,
    so a failure leaves no partial file. The directory is created if needed; its other files
    are left alone.

    Args:
        model: The model (merge LoRA layers into the kernels first).
        path: The directory.
        tokenizer: Optional tokenizer with a ``save(directory)`` method (writes
            ``tokenizer.json``).

    Returns:
        None. The directory then holds ``config.json`` and ``model.safetensors`` (and
        ``tokenizer.json`` with a tokenizer).

    Raises:
        TypeError: ``model`` is not a :class:`Llama` or ``tokenizer`` has no ``save``.
        NotADirectoryError: ``path`` exists and is not a directory.
        OSError: the directory cannot be written.

    Examples:
        >>> import tempfile, numpy as np
        >>> from flax import nnx
        >>> from lorajax import models
        >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
        ...                          num_hidden_layers=1, num_attention_heads=2,
        ...                          num_key_value_heads=1)
        >>> model = models.Llama(cfg, rngs=nnx.Rngs(0))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     models.save_hf(model, d)
        ...     again = models.load_hf(d)
        >>> tokens = np.array([[1, 2, 3]])
        >>> bool(np.array_equal(model(tokens), again(tokens)))
        True
    """
    if not isinstance(model, Llama):
        raise TypeError(f"`model` must be a Llama, got {type(model).__name__}.")
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise TypeError(
            f"`tokenizer` must have a save(directory) method (e.g. a lorajax Tokenizer), got "
            f"{type(tokenizer).__name__}."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory; pick another path.")
    tensors = hf_tensors_from_model(model)
    config_text = json.dumps(model.config.to_hf(), indent=2, sort_keys=True) + "\n"
    directory.mkdir(parents=True, exist_ok=True)

    def write_config(tmp: str) -> None:
        pathlib.Path(tmp).write_text(config_text, encoding="utf-8")

    def write_weights(tmp: str) -> None:
        safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})

    write_atomic(directory, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})
    if tokenizer is not None:
        tokenizer.save(directory)
