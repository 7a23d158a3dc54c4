"""Hugging Face config.json + safetensors: parsing, round trips, transformers parity, errors."""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from lorajax._src.models import hf
from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.convert import hf_tensors_from_model, model_from_hf_tensors
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.hf import load_hf, save_hf
from lorajax._src.models.llama import Llama
from tests import llama_reference as ref

BASE = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TOKENS = np.array([[3, 17, 96, 0, 42, 8], [5, 1, 2, 90, 33, 7]])
HF_4X = {  # a transformers 4.x config.json
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "max_position_embeddings": 512,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "vocab_size": 97,
}
HF_5X = {
    **{k: v for k, v in HF_4X.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
    "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},
    "transformers_version": "5.23.0",
    "pad_token_id": None,
}
EXPECTED_FROM_HF = LlamaConfig(
    97, 32, 48, 2, 4, 2, head_dim=8, rope_theta=500.0, rms_norm_eps=1e-5,
    max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def write_checkpoint(directory, config_dict, tensors):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict))
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return directory


def hf_config(d):
    return LlamaConfig(**d).to_hf()


# --- config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [HF_4X, HF_5X], ids=["transformers4", "transformers5"])
def test_config_from_hf_spellings(spelling):
    assert LlamaConfig.from_hf(spelling) == EXPECTED_FROM_HF


def test_config_defaults_and_odd_fields():
    minimal = {k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    minimal.update(num_hidden_layers=1, num_attention_heads=4, some_future_key={"x": 1})
    cfg = LlamaConfig.from_hf(minimal)
    # transformers' defaults: kv heads = heads, theta 1e4, eps 1e-6.
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.rms_norm_eps) == (4, 10000.0, 1e-6)
    assert LlamaConfig.from_hf({**HF_4X, "eos_token_id": [7, 9]}).eos_token_id == 7


def test_config_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig(**{**BASE, "head_dim": 12, "eos_token_id": 5, "tie_word_embeddings": True})
    theirs = transformers.LlamaConfig(**cfg.to_hf())
    assert theirs.head_dim == 12 and theirs.rope_parameters["rope_theta"] == 500.0
    assert theirs.num_key_value_heads == 2 and theirs.tie_word_embeddings is True
    assert LlamaConfig.from_hf(json.loads(theirs.to_json_string())) == cfg
    assert LlamaConfig.from_hf(theirs.to_dict()) == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "mistral"}, r"`model_type` = 'mistral' is not supported"),
        ({"hidden_act": "gelu"}, r"`hidden_act` = 'gelu' is not supported.*'silu'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"`rope_scaling` = .*linear"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            r"`rope_parameters\.rope_type` = 'llama3' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "factor": 8.0}},
            r"`rope_parameters` = .*unexpected rope settings \['factor'\]",
        ),
        ({"attention_bias": True}, r"`attention_bias` = True is not supported"),
        ({"mlp_bias": True}, r"`mlp_bias` = True is not supported"),
        ({"sliding_window": 4096}, r"`sliding_window` = 4096 is not supported"),
        ({"partial_rotary_factor": 0.5}, r"`partial_rotary_factor` = 0.5"),
        ({"num_key_value_heads": 3}, r"`num_attention_heads` \(4\) must be a multiple"),
        ({"vocab_size": "97"}, r"`vocab_size` must be a positive int, got '97'"),
    ],
)
def test_config_unsupported_values(change, match):
    with pytest.raises(ModelFileError, match=r"^my/config\.json: " + match):
        LlamaConfig.from_hf({**HF_4X, **change}, source="my/config.json")


def test_config_missing_field_and_not_a_dict():
    d = dict(HF_4X)
    del d["hidden_size"]
    with pytest.raises(ModelFileError, match="required field `hidden_size` is missing"):
        LlamaConfig.from_hf(d)
    with pytest.raises(ModelFileError, match="expected a JSON object"):
        LlamaConfig.from_hf([1, 2])


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    d = {**BASE, "tie_word_embeddings": tied}
    tensors = ref.random_tensors(d, seed=1)
    model = model_from_hf_tensors(LlamaConfig(**d), tensors)
    save_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    on_disk = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert on_disk.keys() == tensors.keys()  # tied: no lm_head.weight
    for k, v in tensors.items():
        assert on_disk[k].dtype == np.float32
        np.testing.assert_array_equal(on_disk[k], v)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["model_type"] == "llama"
    expected = ref.forward(tensors, d, TOKENS)
    for scan_layers in (False, True):
        loaded = load_hf(tmp_path, scan_layers=scan_layers)
        assert loaded.config == model.config and loaded.scan_layers is scan_layers
        np.testing.assert_allclose(loaded(TOKENS), expected, atol=1e-5, rtol=1e-5)
        back = hf_tensors_from_model(loaded)
        for k, v in tensors.items():
            np.testing.assert_array_equal(back[k], v)


def test_load_dtype_options(tmp_path):
    tensors = ref.random_tensors(BASE)
    write_checkpoint(tmp_path, hf_config(BASE), tensors)
    model = load_hf(tmp_path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, remat=True)
    assert model.model.layers[1].mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert model.remat and model.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.model.norm.scale[...], np.float32),
        tensors["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )


@pytest.mark.parametrize(
    ("half", "numpy_reader_fails"), [("bfloat16", False), ("bfloat16", True), ("float16", False)]
)
def test_half_precision_files_widen_to_f32(tmp_path, monkeypatch, half, numpy_reader_fails):
    dtype = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(np.float16)
    tensors = {k: v.astype(dtype) for k, v in ref.random_tensors(BASE, seed=2).items()}
    write_checkpoint(tmp_path, hf_config(BASE), tensors)
    if numpy_reader_fails:  # safetensors versions whose numpy API rejects bf16

        def no_bf16(*args, **kwargs):
            raise TypeError("data type 'bfloat16' not understood")

        monkeypatch.setattr(hf, "safe_open", no_bf16)
    back = hf_tensors_from_model(load_hf(tmp_path))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v.astype(np.float32))


def test_sharded_checkpoint(tmp_path):
    tensors = ref.random_tensors(BASE, seed=4)
    names = sorted(tensors)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {first: names[:9], second: names[9:]}
    (tmp_path / "config.json").write_text(json.dumps(hf_config(BASE)))
    weight_map = {}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    np.testing.assert_allclose(
        load_hf(tmp_path)(TOKENS), ref.forward(tensors, BASE, TOKENS), atol=1e-5, rtol=1e-5
    )
    # Errors in the index or its shards.
    assert weight_map["model.norm.weight"] == "model-00002-of-00002.safetensors"
    bad_map = {**weight_map, "model.norm.weight": "model-00001-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": bad_map}))
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight' is listed in shard"):
        load_hf(tmp_path)
    index.write_text(json.dumps({"weight_map": {**weight_map, "extra.weight": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors: shard listed in .*index"):
        load_hf(tmp_path)
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ModelFileError, match="'weight_map'"):
        load_hf(tmp_path)
    index.write_text("{not json")
    with pytest.raises(ModelFileError, match=r"index\.json: the shard index is not valid JSON"):
        load_hf(tmp_path)


def test_unnamed_safetensors_files(tmp_path):
    tensors = ref.random_tensors(BASE, seed=5)
    names = sorted(tensors)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(BASE)))
    safetensors.numpy.save_file({k: tensors[k] for k in names[:5]}, str(tmp_path / "a.safetensors"))
    safetensors.numpy.save_file({k: tensors[k] for k in names[4:]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ModelFileError, match=f"tensor {names[4]!r} also appears in"):
        load_hf(tmp_path)
    safetensors.numpy.save_file({k: tensors[k] for k in names[5:]}, str(tmp_path / "b.safetensors"))
    back = hf_tensors_from_model(load_hf(tmp_path))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)


# --- transformers parity -------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [BASE, {**BASE, "tie_word_embeddings": True, "head_dim": 12}],
    ids=["untied", "tied-head_dim12"],
)
def test_transformers_reads_our_checkpoint(tmp_path, d):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tensors = ref.random_tensors(d, seed=6)
    model = model_from_hf_tensors(LlamaConfig(**d), tensors)
    save_hf(model, tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(model(TOKENS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_we_read_transformers_checkpoint(tmp_path, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, head_dim=12,
    )  # fmt: skip
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # norms away from one, larger weights than the init
            p.copy_(p + 0.2 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    ours = load_hf(tmp_path)
    assert ours.config.tie_word_embeddings is tied and ours.config.head_dim == 12
    np.testing.assert_allclose(ours(TOKENS), expected, atol=1e-4, rtol=1e-4)


# --- bad files -----------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such directory; expected .*config"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="file.bin: expected a Hugging Face checkpoint dir"):
        load_hf(tmp_path / "file.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: missing"):
        load_hf(empty)
    (empty / "config.json").write_text(json.dumps(hf_config(BASE)))
    with pytest.raises(FileNotFoundError, match=r"empty: no weights found; expected model\."):
        load_hf(empty)
    with pytest.raises(TypeError, match="`path` must be a str or os.PathLike"):
        load_hf(3)


def test_bad_config_json(tmp_path):
    write_checkpoint(tmp_path, hf_config(BASE), ref.random_tensors(BASE))
    (tmp_path / "config.json").write_text('{"vocab_size": 97,')
    with pytest.raises(ModelFileError, match=r"config\.json: the model config is not valid JSON"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(BASE), "mlp_bias": True}))
    with pytest.raises(ModelFileError, match=r"config\.json: `mlp_bias` = True"):
        load_hf(tmp_path)


def _good_file(tmp_path):
    directory = write_checkpoint(tmp_path, hf_config(BASE), ref.random_tensors(BASE))
    return directory / "model.safetensors"


def test_corrupt_safetensors(tmp_path):
    weights = _good_file(tmp_path)
    data = weights.read_bytes()
    header_size = int.from_bytes(data[:8], "little")

    weights.write_bytes(data[:-10])
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a valid safetensors file "
                       r"\(tensor .* ends at byte \d+ .*truncated or corrupt"):  # fmt: skip
        load_hf(tmp_path)
    weights.write_bytes(data[:5])
    with pytest.raises(ModelFileError, match="shorter than the 8-byte header length"):
        load_hf(tmp_path)
    weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelFileError, match=r"the header claims 1099511627776 bytes"):
        load_hf(tmp_path)
    weights.write_bytes(data[:8] + b"\xff" * header_size + data[8 + header_size :])
    with pytest.raises(ModelFileError, match="the header is not valid JSON"):
        load_hf(tmp_path)
    weights.write_bytes(b"GARBAGE!" + data[8:])
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        load_hf(tmp_path)


def _rewrite_header(weights, edit):
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_bad_header_entries(tmp_path):
    weights = _good_file(tmp_path)
    original = weights.read_bytes()

    def shrink(h):
        h["model.norm.weight"]["shape"] = [16]

    _rewrite_header(weights, shrink)
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight' has offsets .* shape \[16\]"):
        load_hf(tmp_path)

    def fp8(h):
        h["model.norm.weight"]["dtype"] = "F8_E5M2"
        h["model.norm.weight"]["shape"] = [128]

    weights.write_bytes(original)
    _rewrite_header(weights, fp8)
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight' has dtype F8_E5M2"):
        load_hf(tmp_path)

    def no_offsets(h):
        del h["model.norm.weight"]["data_offsets"]

    weights.write_bytes(original)
    _rewrite_header(weights, no_offsets)
    with pytest.raises(ModelFileError, match=r"bad header entry for tensor 'model\.norm\.weight'"):
        load_hf(tmp_path)


def test_tensor_mismatches_name_the_tensor(tmp_path):
    tensors = ref.random_tensors(BASE)
    weights = str(tmp_path / "model.safetensors")
    for change, match in [
        ({"lm_head.weight": None}, r"missing tensor\(s\) 'lm_head\.weight'"),
        ({"model.layers.2.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]},
         r"unexpected tensor\(s\) 'model\.layers\.2\.mlp\.up_proj\.weight'"),
        ({"model.layers.1.self_attn.o_proj.weight": np.zeros((32, 31), np.float32)},
         r"tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' has shape \(32, 31\), "
         r"expected \(32, 32\)"),
        ({"model.norm.weight": np.ones(32, np.int32)},
         r"tensor 'model\.norm\.weight' has dtype int32"),
    ]:  # fmt: skip
        bad = {k: v for k, v in {**tensors, **change}.items() if v is not None}
        write_checkpoint(tmp_path, hf_config(BASE), bad)
        with pytest.raises(ModelFileError, match="^" + re.escape(weights) + ": " + match):
            load_hf(tmp_path)


# --- saving --------------------------------------------------------------------------------


def _model(tied=False):
    return Llama(LlamaConfig(**{**BASE, "tie_word_embeddings": tied}), rngs=nnx.Rngs(0))


class FakeTokenizer:
    def __init__(self):
        self.saved_to = None

    def save(self, directory):
        self.saved_to = pathlib.Path(directory)
        (self.saved_to / "tokenizer.json").write_text("{}")


def test_save_keeps_other_files_and_writes_tokenizer(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "model.safetensors").write_bytes(b"old")
    tok = FakeTokenizer()
    save_hf(_model(), tmp_path / ".", tokenizer=tok)
    assert tok.saved_to == tmp_path
    assert sorted(os.listdir(tmp_path)) == [
        "README.md", "config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    assert (tmp_path / "README.md").read_text() == "hello"
    assert load_hf(tmp_path).config == _model().config
    nested = tmp_path / "a" / "b"
    save_hf(_model(tied=True), nested)
    assert "lm_head.weight" not in safetensors.numpy.load_file(str(nested / "model.safetensors"))


def test_save_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="`model` must be a Llama"):
        save_hf({"w": 1}, tmp_path)
    with pytest.raises(TypeError, match="`tokenizer` must have a save"):
        save_hf(_model(), tmp_path / "out", tokenizer=object())
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file: exists and is not a directory"):
        save_hf(_model(), tmp_path / "file")


def test_save_failure_leaves_no_partial_files(tmp_path, monkeypatch):
    save_hf(_model(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save)
    other = Llama(LlamaConfig(**BASE), rngs=nnx.Rngs(1))
    with pytest.raises(OSError, match="disk full"):
        save_hf(other, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_rename_failure_leaves_no_temp_files(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(f"cannot write {dst}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(PermissionError, match="cannot write"):
        save_hf(_model(), tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        save_hf(_model(), tmp_path / "file" / "sub")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_save_into_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            save_hf(_model(), locked)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)
