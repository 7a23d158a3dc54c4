"""tpu_scripts/finetune.py across processes: 2 processes x 4 CPU devices train as 1 x 8.

Two child processes with 4 fake CPU devices each join through ``jax.distributed`` on
localhost and run 5 real training steps of ``tpu_scripts/finetune.py`` on a tiny Llama,
each reading its own half of every global batch, and checkpoint at step 5. One child
with 8 fake devices runs the same command alone. The test restores both checkpoints onto
the same 8-device mesh and compares every leaf of the train state and every loss.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lorajax import models
from lorajax.checkpoint import Checkpointer, abstract_state

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tpu_scripts" / "finetune.py"
STEPS = 5
TIMEOUT_S = 300

pytestmark = pytest.mark.slow

# Every width divides over fsdp=4 and tensor=2 (vocab 264 > the 257 byte-level ids).
CONFIG = models.LlamaConfig(
    vocab_size=264,
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


def load_script():
    spec = importlib.util.spec_from_file_location("lorajax_tpu_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return load_script()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    models.save_hf(
        models.Llama(CONFIG, rngs=nnx.Rngs(0)), path, tokenizer=models.Tokenizer.byte_level()
    )
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(4):
        lines = [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(40)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return root


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # Not the parent's 8 devices: each child gets its own count.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags += [f"--xla_force_host_platform_device_count={devices}"]
    flags += ["--xla_backend_optimization_level=0"]  # tiny programs, as tests/conftest.py
    env["XLA_FLAGS"] = " ".join(dict.fromkeys(flags))
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        env.pop(name, None)  # no launcher of the machine running the tests
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_all(jobs: list[tuple[list[str], int]]) -> list[str]:
    """Starts every ``(argv, devices)`` child at once; fails with the stderr of any failure."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(devices),
            cwd=ROOT,
        )
        for argv, devices in jobs
    ]
    outputs, failures = [], []
    try:
        for i, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                failures.append(f"child {i} timed out after {TIMEOUT_S} s:\n{err[-4000:]}")
                continue
            outputs.append(out)
            if proc.returncode != 0:
                failures.append(
                    f"child {i} ({' '.join(jobs[i][0])}) exited {proc.returncode}:\n"
                    f"{err[-4000:]}\nstdout:\n{out[-2000:]}"
                )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, "\n\n".join(failures)
    return outputs


def common_argv(model, data, method, mesh) -> list[str]:
    argv = ["--model", str(model), "--data", str(data), "--method", method, "--mesh", mesh]
    argv += ["--rank", "2", "--lr", "1e-2", "--seq-len", "16", "--batch-size", "8"]
    return [*argv, "--eval-batches", "1", "--quiet"]


def run_argv(common, out: Path, steps: int, *extra: str) -> list[str]:
    argv = [*common, "--steps", str(steps), "--checkpoint-dir", str(out / "ckpt")]
    argv += ["--save-every", str(STEPS), "--metrics", str(out / "metrics.jsonl")]
    return [*argv, "--summary", str(out / "summary.json"), *extra]


def two_processes(argv: list[str]) -> list[tuple[list[str], int]]:
    dist = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    return [([*argv, *dist, "--process-id", str(i)], 4) for i in range(2)]


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def restore(finetune, common, directory: Path, step: int):
    """Checkpoint ``step``, restored onto the mesh of ``common`` over the 8 test devices."""
    args = finetune.build_parser().parse_args([*common, "--distributed", "off"])
    finetune.check_args(args)
    trainer = finetune.setup(args)["trainer"]
    state = trainer.init()
    target = abstract_state(state, trainer.shardings)
    with Checkpointer(directory) as ckpt:
        restored, position, _ = ckpt.restore(step, target=target)
    return leaves(restored), position, leaves(state)


def leaves(tree) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    assert any(k.startswith(".opt_state") for k in got)
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    ("method", "mesh", "resume_mesh"),
    [("lora", "fsdp=4,tensor=2", "data=2,fsdp=4"), ("adapters", "data=2,fsdp=4", None)],
)
def test_two_processes_train_exactly_as_one(
    finetune, tiny_model, corpus, tmp_path, method, mesh, resume_mesh
):
    common = common_argv(tiny_model, corpus, method, mesh)
    two, one = tmp_path / "two", tmp_path / "one"
    total = STEPS + 2 if resume_mesh else STEPS  # the one-process run goes on past step 5
    run_all([*two_processes(run_argv(common, two, STEPS)), (run_argv(common, one, total), 8)])

    # Process 0 alone wrote the metrics: one row per step, the evaluations before and after.
    rows = {"two": read_rows(two), "one": read_rows(one)}
    assert [r["step"] for r in rows["two"] if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows["one"] if "loss" in r] == list(range(1, total + 1))
    assert sorted(by_step(rows["two"], "eval_loss")) == [0, STEPS]
    losses = {name: by_step(rows[name], "loss") for name in rows}
    np.testing.assert_allclose(
        [losses["two"][i] for i in range(1, STEPS + 1)],
        [losses["one"][i] for i in range(1, STEPS + 1)],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        by_step(rows["two"], "eval_loss")[0], by_step(rows["one"], "eval_loss")[0], rtol=1e-5
    )
    summaries = {
        name: json.loads((out / "summary.json").read_text())
        for name, out in (("two", two), ("one", one))
    }
    assert summaries["two"]["processes"] == 2 and summaries["one"]["processes"] == 1
    assert summaries["two"]["devices"] == summaries["one"]["devices"] == 8
    assert summaries["two"]["mesh"] == summaries["one"]["mesh"]
    assert summaries["two"]["optimizer_state_bytes"] == summaries["one"]["optimizer_state_bytes"]

    # The state both saved at step 5, restored onto one mesh: equal leaf by leaf.
    got, got_position, initial = restore(finetune, common, two / "ckpt", STEPS)
    want, want_position, _ = restore(finetune, common, one / "ckpt", STEPS)
    assert got_position == want_position and got_position["batches_served"] == STEPS
    assert_same_state(got, want)
    assert int(got[".step"]) == STEPS
    # The steps trained: what the method updates moved away from its start.
    trained = ".adapters" if method == "adapters" else ".params"
    assert (
        max(float(np.abs(got[k] - initial[k]).max()) for k in got if k.startswith(trained)) > 1e-3
    )
    if resume_mesh is None:
        return

    # Two processes resume from step 5 on another mesh and reach the one-process run's step 7.
    run_all(two_processes(run_argv(common, two, total, "--resume", "--mesh", resume_mesh)))
    rows["two"] = read_rows(two)
    assert [r["step"] for r in rows["two"] if "loss" in r] == list(range(1, total + 1))
    np.testing.assert_allclose(
        [by_step(rows["two"], "loss")[i] for i in (STEPS + 1, total)],
        [losses["one"][i] for i in (STEPS + 1, total)],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        by_step(rows["two"], "eval_loss")[total],
        by_step(rows["one"], "eval_loss")[total],
        rtol=1e-5,
    )
    assert json.loads((two / "summary.json").read_text())["mesh"] == {"data": 2, "fsdp": 4}
    got, got_position, _ = restore(finetune, common, two / "ckpt", total)
    want, want_position, _ = restore(finetune, common, one / "ckpt", total)
    assert got_position == want_position
    assert_same_state(got, want)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--coordinator", "localhost:1234", "--num-processes", "2"], "without --process-id"),
        (
            ["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 must be below --num-processes 2",
        ),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--mesh", "fsdp=4,pipeline=2"], "Unknown mesh axis 'pipeline'"),
        (["--mesh", "fsdp=3", "--distributed", "off"], "--mesh 'fsdp=3' does not fit the 8"),
        (
            ["--mesh", "fsdp=4,tensor=2", "--batch-size", "6", "--distributed", "off"],
            "--batch-size 6 must be divisible by the 4 data x fsdp devices",
        ),
    ],
)
def test_bad_arguments_are_refused_before_work(finetune, capsys, tiny_model, argv, match):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--model", str(tiny_model), *argv])
    assert info.value.code == 2
    assert match in capsys.readouterr().err
