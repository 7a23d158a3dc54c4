"""PEFT adapter files: round trips, PEFT's exact layout, interop with PEFT and transformers, errors.

The oracles are PEFT itself (its state-dict keys and shapes for the same targets, its
``PeftModel.from_pretrained`` forward on our files, its ``save_pretrained`` output after a
few torch optimizer steps) and transformers (reading the merged checkpoint). Interop
tests are skipped when torch, peft or transformers is missing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import lorajax
from lorajax import models
from lorajax.adapters import LoRA, is_lora
from lorajax.peft_format import load_peft, save_merged, save_peft

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # PEFT then also saves the full lm_head weight, which load_peft checks against the base.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

CFG = models.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
TOKENS = np.array([[1, 5, 9, 3, 17, 2, 40], [7, 7, 0, 63, 12, 8, 30]])
TARGETS = r"(q_proj|v_proj|o_proj|up_proj|down_proj|lm_head)/kernel"
MODULES = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
RANKS = {"up_proj": 2, "lm_head": 3}
ALPHAS = {"o_proj": 3, "down_proj": 5.5}
LAYER_RANKS = {r"layers\.1\.self_attn\.q_proj": 3}  # one layer differs (unscanned only)


def make_model(scan=False, seed=0):
    """A tiny untied Llama with weights well away from the init's small scale."""
    model = models.Llama(CFG, rngs=nnx.Rngs(seed), scan_layers=scan)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.15 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params = treedef.unflatten(leaves)
    return nnx.merge(graphdef, params, rest), params


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)


def make_adapters(params, *, seed=0, dora=False, layer_ranks=False, **kwargs):
    """Adapters with random a, b (and moved magnitudes), so every field is non-trivial."""
    ranks = {**RANKS, **(LAYER_RANKS if layer_ranks else {})}
    kwargs = {"rank": 4, "alpha": 8, "rank_pattern": ranks, "alpha_pattern": ALPHAS, **kwargs}
    ad, base = lorajax.adapters.init(seed, params, targets=TARGETS, **kwargs)
    assert base is params
    counter = iter(range(1000))

    def randomize(lora):
        k1, k2 = jax.random.split(jax.random.key(1000 * seed + next(counter)))
        return lora.replace(
            a=(0.3 * jax.random.normal(k1, lora.a.shape)).astype(lora.a.dtype),
            b=(0.3 * jax.random.normal(k2, lora.b.shape)).astype(lora.b.dtype),
        )

    ad = jax.tree.map(randomize, ad, is_leaf=is_lora)
    if dora:
        ad = lorajax.adapters.dora(params, ad)
        ad = jax.tree.map(
            lambda x: x.replace(magnitude=x.magnitude * (1.0 + 0.1 * jnp.cos(x.magnitude))),
            ad,
            is_leaf=is_lora,
        )
    return ad


def logits_of(model, params, adapters=None):
    if adapters is not None:
        params = lorajax.adapters.merge(params, adapters)
    return np.asarray(with_params(model, params)(TOKENS))


def assert_close(ours, theirs, tol=1e-4, what=""):
    """``max|ours − theirs| <= tol · max|theirs|``."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, what
    scale = np.max(np.abs(theirs))
    assert scale > 0
    err = np.max(np.abs(ours - theirs)) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _is_node(x):
    return x is None or is_lora(x)


def assert_same_adapters(ours, theirs):
    """Same tree, same LoRA positions, and every field of every LoRA equal."""
    assert jax.tree.structure(ours, is_leaf=_is_node) == jax.tree.structure(
        theirs, is_leaf=_is_node
    )
    leaves_o = jax.tree.leaves(ours, is_leaf=_is_node)
    leaves_t = jax.tree.leaves(theirs, is_leaf=_is_node)
    assert [type(x) for x in leaves_o] == [type(x) for x in leaves_t]
    assert sum(is_lora(x) for x in leaves_o) > 0
    for x, y in zip(leaves_o, leaves_t):
        if x is None:
            continue
        for field in dataclasses.fields(LoRA):
            u, v = getattr(x, field.name), getattr(y, field.name)
            if field.name in ("a", "b", "magnitude"):
                if u is None or v is None:
                    assert u is None and v is None, field.name
                    continue
                assert u.dtype == v.dtype, field.name
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=field.name)
            else:
                assert u == v and type(u) is type(v), (field.name, u, v)


def read_config(path):
    return json.loads((pathlib.Path(path) / "adapter_config.json").read_text())


# --------------------------------------------------------------------------- round trips


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"dora": True},
    "lora_fa-bf16": {"init": "lora_fa", "dtype": jnp.bfloat16},
    "lori": {"init": "lori", "sparsity": 0.75, "use_rslora": True},
}


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_then_load_is_identity(tmp_path, scan, variant):
    _, params = make_model(scan)
    ad = make_adapters(params, layer_ranks=not scan, **VARIANTS[variant])
    save_peft(tmp_path, ad)
    assert_same_adapters(ad, load_peft(tmp_path, params))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_config_fields(tmp_path):
    _, params = make_model()
    save_peft(tmp_path, make_adapters(params, layer_ranks=True), base_model_name_or_path="base")
    cfg = read_config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (4, 8, False, False)
    assert sorted(cfg["target_modules"]) == sorted(MODULES)
    # up_proj/lm_head differ as a whole; one q_proj differs from the other.
    assert cfg["rank_pattern"] == {**RANKS, r"model\.layers\.1\.self_attn\.q_proj": 3}
    assert cfg["alpha_pattern"] == ALPHAS
    assert cfg["base_model_name_or_path"] == "base" and cfg["fan_in_fan_out"] is False


def test_scale_not_alpha_over_rank_survives(tmp_path):
    """A scale that no (alpha, r) of PEFT's rule gives is kept (in alpha_pattern and meta)."""
    _, params = make_model()
    ad = make_adapters(params)
    node = ad["model"]["layers"][0]["self_attn"]["v_proj"]["kernel"]
    ad["model"]["layers"][0]["self_attn"]["v_proj"]["kernel"] = node.replace(scale=0.7)
    save_peft(tmp_path, ad)
    assert read_config(tmp_path)["alpha_pattern"][r"model\.layers\.0\.self_attn\.v_proj"] == (
        pytest.approx(0.7 * 4)
    )
    assert_same_adapters(ad, load_peft(tmp_path, params))


def test_target_modules_cover_only_adapted_modules(tmp_path):
    _, params = make_model()
    ad, _ = lorajax.adapters.init(0, params, rank=2, targets=r"layers/0/self_attn/q_proj|v_proj")
    save_peft(tmp_path, ad)
    assert read_config(tmp_path)["target_modules"] == ["model.layers.0.self_attn.q_proj", "v_proj"]
    save_peft(tmp_path, ad, target_modules=["q_proj", "v_proj"])
    assert read_config(tmp_path)["target_modules"] == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- PEFT's layout


def torch_twin(tmp_path, model):
    """transformers' LlamaForCausalLM with our model's weights (through save_hf)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base_dir = tmp_path / "base"
    models.save_hf(model, base_dir)
    return transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def peft_logits(peft_model):
    import torch

    with torch.no_grad():
        return peft_model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_keys_and_shapes_are_peft_layout(tmp_path, scan, dora):
    peft = pytest.importorskip("peft")
    model, params = make_model(scan)
    torch_model = torch_twin(tmp_path, model)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=MODULES, rank_pattern=RANKS, use_dora=dora
    )
    pm = peft.get_peft_model(torch_model, cfg)
    theirs = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    save_peft(tmp_path / "ad", make_adapters(params, dora=dora))
    ours = safetensors.numpy.load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "ad"))
    assert (loaded.r, loaded.lora_alpha, loaded.use_dora) == (4, 8, dora)
    assert loaded.rank_pattern == RANKS and loaded.alpha_pattern == ALPHAS


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_loads_our_files(tmp_path, scan, variant):
    peft = pytest.importorskip("peft")
    model, params = make_model(scan)
    torch_model = torch_twin(tmp_path, model)
    ad = make_adapters(
        params, layer_ranks=not scan, use_rslora=variant == "rslora", dora=variant == "dora"
    )
    save_peft(tmp_path / "ad", ad)
    pm = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "ad")).eval()
    theirs = peft_logits(pm)
    base = logits_of(model, params)
    assert np.max(np.abs(base - theirs)) > 0.05 * np.max(np.abs(theirs))  # adapters matter
    assert_close(logits_of(model, params, ad), theirs, what=variant)


PEFT_CONFIGS = {
    "lora": {"rank_pattern": RANKS, "alpha_pattern": ALPHAS},
    "rslora": {"use_rslora": True, "rank_pattern": RANKS},
    "dora": {"use_dora": True, "alpha_pattern": ALPHAS},
    "dora-layer0": {"use_dora": True, "layers_to_transform": [0]},
}


def train_with_peft(torch_model, peft_config, steps=3):
    """A few Adam steps of next-token loss on random tokens; b and magnitudes move."""
    import torch

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(torch_model, peft_config)
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, CFG.vocab_size, (4, 9), generator=gen)
        loss = pm(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
def test_we_load_peft_trained_adapters(tmp_path, scan, variant):
    peft = pytest.importorskip("peft")
    model, params = make_model(scan)
    torch_model = torch_twin(tmp_path, model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, **PEFT_CONFIGS[variant])
    pm = train_with_peft(torch_model, cfg)
    pm.save_pretrained(str(tmp_path / "ad"))
    theirs = peft_logits(pm)
    ad = load_peft(tmp_path / "ad", params)
    assert np.max(np.abs(logits_of(model, params) - theirs)) > 1e-3 * np.max(np.abs(theirs))
    assert_close(logits_of(model, params, ad), theirs, what=variant)
    # And back out: PEFT reads what we write from it, with the same output.
    save_peft(tmp_path / "again", ad)
    pm2 = peft.PeftModel.from_pretrained(
        torch_twin(tmp_path / "t2", model), str(tmp_path / "again")
    )
    assert_close(peft_logits(pm2.eval()), theirs, what=f"{variant} re-saved")


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_save_merged_reads_back_in_both_libraries(tmp_path, scan):
    model, params = make_model(scan)
    ad = make_adapters(params, dora=True)
    ours = logits_of(model, params, ad)
    save_merged(tmp_path / "merged", model, ad)
    again = models.load_hf(tmp_path / "merged", scan_layers=scan)
    assert_close(again(TOKENS), ours, tol=1e-6, what="load_hf")
    assert_close(model(TOKENS), logits_of(model, params), tol=0, what="model unchanged")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "merged"), dtype=torch.float32
    )
    with torch.no_grad():
        assert_close(theirs(torch.tensor(TOKENS)).logits.numpy(), ours, what="transformers")


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    _, params = make_model()
    ad = make_adapters(params)
    save_peft(tmp_path / "ad", ad)
    return tmp_path / "ad", params


def edit_config(directory, **changes):
    cfg = read_config(directory)
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(directory, fn):
    file = str(directory / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    fn(tensors)
    safetensors.numpy.save_file(tensors, file)


def test_missing_files_raise(saved, tmp_path):
    directory, params = saved
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_peft(tmp_path / "nowhere", params)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_peft(directory / "adapter_config.json", params)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"safe_serialization=True"):
        load_peft(directory, params)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_peft(directory, params)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'; only 'LORA'"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out is True"),
        ({"lora_bias": True}, "lora_bias is True"),
        ({"r": 0}, "`r` must be a positive int, got 0"),
        ({"lora_alpha": "big"}, "`lora_alpha` must be a positive number, got 'big'"),
        ({"rank_pattern": {"(": 2}}, r"`rank_pattern` key '\(' is not a regex"),
        ({"r": 3}, r"lora_A.weight' has shape \(4, \d+\).* at rank 3"),
        ({"use_dora": True}, "sets use_dora but module .* has no lora_magnitude_vector"),
    ],
)
def test_bad_config_raises(saved, changes, match):
    directory, params = saved
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=match):
        load_peft(directory, params)


def test_magnitude_without_use_dora_raises(tmp_path):
    _, params = make_model()
    save_peft(tmp_path, make_adapters(params, dora=True))
    edit_config(tmp_path, use_dora=False)
    with pytest.raises(ValueError, match="is a DoRA magnitude but .* does not set use_dora"):
        load_peft(tmp_path, params)


def test_bad_tensors_raise(saved):
    directory, params = saved
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    edit_tensors(directory, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight' has no partner lora_B"):
        load_peft(directory, params)

    def add_embedding(t):
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 64), np.float32)

    edit_tensors(directory, add_embedding)
    with pytest.raises(ValueError, match="lora_embedding_A' is not a LoRA weight of a linear"):
        load_peft(directory, params)
    (directory / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_peft(directory, params)


def test_params_that_do_not_fit_raise(saved):
    directory, _ = saved
    one_layer = dataclasses.replace(CFG, num_hidden_layers=1)
    params = params_of(models.Llama(one_layer, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.1\.\w+\.\w+' has no kernel"):
        load_peft(directory, params)
    wider = dataclasses.replace(CFG, intermediate_size=32)
    params = params_of(models.Llama(wider, rngs=nnx.Rngs(0)))
    with pytest.raises(
        ValueError, match=r"has shape \(\d+, 24\), but the kernel .* of shape \(32, 16\)"
    ):
        load_peft(directory, params)


def test_layers_with_different_ranks_do_not_stack(tmp_path):
    _, params = make_model(scan=False)
    save_peft(tmp_path, make_adapters(params, layer_ranks=True))
    _, scanned = make_model(scan=True)
    with pytest.raises(ValueError, match=r"stacked kernel 'model/layers/self_attn/q_proj/kernel'"):
        load_peft(tmp_path, scanned)


def test_bad_adapters_raise_before_writing(tmp_path):
    _, params = make_model()
    with pytest.raises(ValueError, match="holds no LoRA node"):
        save_peft(tmp_path / "a", jax.tree.map(lambda _: None, params))
    ad, _ = lorajax.adapters.init(0, params, rank=2, targets="embed_tokens")
    with pytest.raises(ValueError, match="embed_tokens/embedding' .* has no PEFT module name"):
        save_peft(tmp_path / "b", ad)
    ad = make_adapters(params, dora=True)
    node = ad["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    ad["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] = node.replace(magnitude=None)
    with pytest.raises(ValueError, match="only some adapters carry a DoRA magnitude"):
        save_peft(tmp_path / "c", ad)
    with pytest.raises(
        ValueError,
        match=r"does not select the adapted module 'model\.layers\.\d\.self_attn\.q_proj'",
    ):
        save_peft(tmp_path / "d", make_adapters(params), target_modules=MODULES[1:])
    with pytest.raises(TypeError, match="`target_modules` must be a list"):
        save_peft(tmp_path / "e", make_adapters(params), target_modules=[1])
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_leaves_nothing(tmp_path, monkeypatch):
    _, params = make_model()
    ad = make_adapters(params)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        save_peft(blocker, ad)
    with pytest.raises(OSError):
        save_peft(blocker / "sub", ad)
    out = tmp_path / "out"
    (out / "adapter_model.safetensors").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="adapter_model.safetensors: is a directory"):
        save_peft(out, ad)
    assert [p.name for p in out.iterdir()] == ["adapter_model.safetensors"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    out2 = tmp_path / "out2"
    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_peft(out2, ad)
    assert list(out2.iterdir()) == []


def test_save_merged_bad_input(tmp_path):
    model, params = make_model()
    with pytest.raises(TypeError, match="`model` must be a lorajax.models.Llama"):
        save_merged(tmp_path, params)
    _, other = make_model(scan=True)
    with pytest.raises(ValueError, match="do not have the structure of `params`"):
        save_merged(tmp_path / "m", model, make_adapters(other))
    assert list(tmp_path.iterdir()) == []


def test_full_weight_copies_must_be_the_base(saved):
    """PEFT stores lm_head's full weight next to its LoRA; it must equal the base's."""
    directory, params = saved
    key = "base_model.model.lm_head.base_layer.weight"
    head = np.asarray(params["lm_head"]["kernel"], np.float32).T
    edit_tensors(directory, lambda t: t.update({key: np.ascontiguousarray(head)}))
    assert load_peft(directory, params)["lm_head"]["kernel"].rank == RANKS["lm_head"]
    edit_tensors(directory, lambda t: t.update({key: np.ascontiguousarray(head + 1.0)}))
    with pytest.raises(ValueError, match="full copy of the base weight 'lm_head/kernel'"):
        load_peft(directory, params)
