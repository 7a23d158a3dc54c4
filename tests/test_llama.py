"""The Llama NNX model against an independent jax.numpy forward pass, and its layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.convert import hf_tensors_from_model, model_from_hf_tensors
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.llama import Llama
from lorajax._src.targets import select_targets
from tests import llama_reference as ref

BASE = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
CONFIGS = {
    "untied": BASE,
    "tied": {**BASE, "tie_word_embeddings": True, "num_hidden_layers": 2},
    "head_dim_12": {**BASE, "head_dim": 12, "num_key_value_heads": 1},
    "mha": {**BASE, "num_key_value_heads": 4, "num_hidden_layers": 2, "rms_norm_eps": 1e-3},
}
TOKENS = np.array([[3, 17, 96, 0, 42, 42, 8, 61], [5, 5, 5, 1, 2, 90, 33, 7]])


def our_config(d):
    return LlamaConfig(**d)


def build(name, **kwargs):
    d = CONFIGS[name]
    tensors = ref.random_tensors(d, seed=len(name))
    return d, tensors, model_from_hf_tensors(our_config(d), tensors, **kwargs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_reference(name):
    d, tensors, model = build(name)
    logits = model(TOKENS)
    assert logits.shape == (2, 8, d["vocab_size"]) and logits.dtype == jnp.float32
    expected = ref.forward(tensors, d, TOKENS)
    assert float(jnp.abs(expected).max()) > 1.0  # not a trivially small output
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_positions_argument_matches_reference():
    d, tensors, model = build("untied")
    positions = np.array([[4, 5, 6, 7, 8, 9, 10, 11], [0, 2, 4, 6, 8, 10, 12, 14]])
    logits = model(TOKENS, positions)
    np.testing.assert_allclose(
        logits, ref.forward(tensors, d, TOKENS, positions), atol=1e-5, rtol=1e-5
    )
    # The default is arange, and shifting positions changes the result (RoPE is used).
    np.testing.assert_allclose(model(TOKENS, np.broadcast_to(np.arange(8), (2, 8))), model(TOKENS))
    assert float(jnp.abs(logits - model(TOKENS)).max()) > 1e-3


def test_attention_is_causal():
    _, _, model = build("untied")
    changed = TOKENS.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % 97
    a, b = model(TOKENS), model(changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3


def _param_paths(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): leaf.shape for path, leaf in flat}


def test_param_paths_unscanned_and_scanned():
    cfg = our_config(CONFIGS["untied"])
    L, d, f, V = 3, 32, 48, 97
    layer = {
        "input_layernorm/scale": (d,),
        "post_attention_layernorm/scale": (d,),
        "self_attn/q_proj/kernel": (d, 32),
        "self_attn/k_proj/kernel": (d, 16),
        "self_attn/v_proj/kernel": (d, 16),
        "self_attn/o_proj/kernel": (32, d),
        "mlp/gate_proj/kernel": (d, f),
        "mlp/up_proj/kernel": (d, f),
        "mlp/down_proj/kernel": (f, d),
    }
    top = {
        "model/embed_tokens/embedding": (V, d),
        "model/norm/scale": (d,),
        "lm_head/kernel": (d, V),
    }
    unscanned = dict(top)
    for i in range(L):
        unscanned.update({f"model/layers/{i}/{k}": s for k, s in layer.items()})
    scanned = dict(top)
    scanned.update({f"model/layers/{k}": (L, *s) for k, s in layer.items()})
    assert _param_paths(Llama(cfg, rngs=nnx.Rngs(0))) == unscanned
    assert _param_paths(Llama(cfg, rngs=nnx.Rngs(0), scan_layers=True)) == scanned
    tied = Llama(our_config(CONFIGS["tied"]), rngs=nnx.Rngs(0))
    assert "lm_head/kernel" not in _param_paths(tied)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_target_presets_select_the_right_kernels(scan_layers):
    model = Llama(our_config(BASE), rngs=nnx.Rngs(0), scan_layers=scan_layers)
    params = nnx.state(model, nnx.Param)
    attn = {f"self_attn/{m}_proj/kernel" for m in "qkvo"}
    mlp = {f"mlp/{m}_proj/kernel" for m in ("gate", "up", "down")}
    for preset, modules in (("attention", attn), ("mlp", mlp), ("all-linear", attn | mlp)):
        specs, paths = select_targets(params, preset)
        chosen = {p.removesuffix("/value") for p, s in zip(paths, specs) if s is not None}
        if scan_layers:
            expected = {f"model/layers/{m}" for m in modules}
        else:
            expected = {f"model/layers/{i}/{m}" for i in range(3) for m in modules}
        assert chosen == expected, preset
        batch = {s.batch_axes for s in specs if s is not None}
        assert batch == ({(0,)} if scan_layers else {()})


def _loss_and_grads(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, t):
        logits = nnx.merge(graphdef, p, rest)(t)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))(params, tokens)
    grads = jax.jit(jax.grad(loss))(params, tokens)
    return logits, grads


def _stacked_grad(grads, scanned, name):
    leaf = grads["model"]["layers"]
    if scanned:
        return np.asarray(leaf[name[0]][name[1]]["kernel"][...])
    return np.stack([np.asarray(leaf[i][name[0]][name[1]]["kernel"][...]) for i in range(3)])


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layout_and_remat_match_unscanned(remat):
    d = CONFIGS["untied"]
    tensors = ref.random_tensors(d, seed=3)
    tokens = jnp.asarray(TOKENS)
    base = _loss_and_grads(model_from_hf_tensors(our_config(d), tensors), tokens)
    other = _loss_and_grads(
        model_from_hf_tensors(our_config(d), tensors, scan_layers=True, remat=remat), tokens
    )
    same_layout = _loss_and_grads(
        model_from_hf_tensors(our_config(d), tensors, scan_layers=False, remat=remat), tokens
    )
    np.testing.assert_allclose(other[0], base[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(same_layout[0], base[0], atol=1e-5, rtol=1e-5)
    for name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
        g = _stacked_grad(base[1], False, name)
        assert float(np.abs(g).max()) > 1e-4
        np.testing.assert_allclose(_stacked_grad(other[1], True, name), g, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(
            _stacked_grad(same_layout[1], False, name), g, atol=1e-5, rtol=1e-4
        )
    np.testing.assert_allclose(
        other[1]["model"]["embed_tokens"]["embedding"][...],
        base[1]["model"]["embed_tokens"]["embedding"][...],
        atol=1e-5,
    )


def test_same_seed_gives_same_weights_in_both_layouts():
    cfg = our_config(BASE)
    a = hf_tensors_from_model(Llama(cfg, rngs=nnx.Rngs(7)))
    b = hf_tensors_from_model(Llama(cfg, rngs=nnx.Rngs(7), scan_layers=True))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_remat_is_used():
    model = model_from_hf_tensors(our_config(BASE), ref.random_tensors(BASE), remat=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(TOKENS).sum()))(params)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_bf16_compute_is_close_and_returns_f32():
    d, tensors, f32 = build("untied")
    bf16 = model_from_hf_tensors(our_config(d), tensors, dtype=jnp.bfloat16)
    logits = bf16(TOKENS)
    assert logits.dtype == jnp.float32
    assert bf16.model.layers[0].self_attn.q_proj.kernel.dtype == jnp.float32
    expected = f32(TOKENS)
    err = float(jnp.abs(logits - expected).max())
    assert 0 < err < 0.1 * float(jnp.abs(expected).max())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bf16_param_storage(scan_layers):
    d, tensors, f32 = build("tied")
    model = model_from_hf_tensors(
        our_config(d), tensors, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
        scan_layers=scan_layers,
    )  # fmt: skip
    dtypes = {leaf.dtype for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    logits = model(TOKENS)
    assert logits.dtype == jnp.float32
    expected = f32(TOKENS)
    assert float(jnp.abs(logits - expected).max()) < 0.1 * float(jnp.abs(expected).max())
    random_init = Llama(our_config(d), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert random_init.model.embed_tokens.embedding.dtype == jnp.bfloat16


def test_bad_arguments():
    cfg = our_config(BASE)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`tokens` must be an int array of shape \(batch, seq\)"):
        model(np.arange(4))
    with pytest.raises(ValueError, match="`tokens` must be an int array"):
        model(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="`positions` must be an int array shaped like"):
        model(TOKENS, np.arange(8))
    with pytest.raises(ValueError, match="`dtype` must be a floating dtype"):
        Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.int32)
    with pytest.raises(ValueError, match="`param_dtype` must be a floating dtype"):
        Llama(cfg, rngs=nnx.Rngs(0), param_dtype="nope")
    with pytest.raises(TypeError, match="`rngs` must be an nnx.Rngs"):
        Llama(cfg, rngs=0)
    with pytest.raises(TypeError, match="`config` must be a LlamaConfig"):
        Llama(BASE, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="`scan_layers` must be a bool"):
        Llama(cfg, rngs=nnx.Rngs(0), scan_layers=1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vocab_size": 0}, "`vocab_size` must be a positive int, got 0"),
        ({"hidden_size": 32.0}, "`hidden_size` must be a positive int, got 32.0"),
        ({"num_key_value_heads": 3}, r"`num_attention_heads` \(4\) must be a multiple"),
        ({"hidden_size": 30}, r"`hidden_size` \(30\) is not a multiple .* pass `head_dim`"),
        ({"head_dim": 7}, "`head_dim` must be a positive even int"),
        ({"rope_theta": -1.0}, "`rope_theta` must be a positive finite number"),
        ({"rms_norm_eps": float("nan")}, "`rms_norm_eps` must be a positive finite number"),
        ({"tie_word_embeddings": 1}, "`tie_word_embeddings` must be a bool"),
        ({"eos_token_id": -1}, "`eos_token_id` must be None or a non-negative int"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**BASE, **change})


def test_config_is_hashable_and_static():
    cfg = our_config(BASE)
    assert hash(cfg) == hash(our_config(BASE)) and cfg.head_dim == 8

    @jax.jit
    def f(x, c=cfg):
        return x * c.hidden_size

    assert int(jax.jit(lambda x, c: x * c.hidden_size, static_argnums=1)(1, cfg)) == 32
    assert int(f(1)) == 32


def test_converter_errors():
    d = CONFIGS["untied"]
    cfg = our_config(d)
    tensors = ref.random_tensors(d)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ModelFileError, match=r"src\.bin: missing .*model\.layers\.1\.mlp\.up_proj"):
        model_from_hf_tensors(cfg, missing, source="src.bin")
    extra = {**tensors, "model.layers.3.mlp.up_proj.weight": tensors["lm_head.weight"]}
    with pytest.raises(ModelFileError, match=r"unexpected .*model\.layers\.3\.mlp\.up_proj"):
        model_from_hf_tensors(cfg, extra)
    bad = {**tensors, "model.layers.2.self_attn.k_proj.weight": np.zeros((32, 16), np.float32)}
    with pytest.raises(ModelFileError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight'.*"
                       r"shape \(32, 16\), expected \(16, 32\)"):  # fmt: skip
        model_from_hf_tensors(cfg, bad, scan_layers=True)
    ints = {**tensors, "model.norm.weight": np.ones(32, np.int32)}
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight'.* dtype int32"):
        model_from_hf_tensors(cfg, ints)
    # Tied models ignore a stored lm_head; old rotary buffers are ignored too.
    tied_cfg = our_config({**d, "tie_word_embeddings": True})
    buffers = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    tied = model_from_hf_tensors(tied_cfg, buffers)
    assert "lm_head.weight" not in hf_tensors_from_model(tied)


def test_hf_tensors_round_trip_exactly():
    for scan_layers in (False, True):
        _, tensors, model = build("head_dim_12", scan_layers=scan_layers)
        back = hf_tensors_from_model(model)
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == np.float32 and back[k].flags.c_contiguous
            np.testing.assert_array_equal(back[k], v)
