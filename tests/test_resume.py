"""Resuming after a real SIGKILL gives bit-identical results; a killed async save loses nothing.

Each test runs tests/resume_worker.py in child processes and kills them with SIGKILL at
a chosen point, as a preemption would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorajax.checkpoint import Checkpointer, abstract_state
from tests import resume_worker

WORKER = Path(__file__).with_name("resume_worker.py")
ROOT = WORKER.parent.parent
STEPS, SAVE_EVERY = 8, 3

pytestmark = pytest.mark.slow


def child_env():
    env = dict(os.environ)
    # As tests/conftest.py: 8 fake CPU devices, no LLVM optimisation for tiny programs.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags += ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
    env["XLA_FLAGS"] = " ".join(dict.fromkeys(flags))
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start(*args):
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )


def run(*args):
    proc = start(*args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def kill_when(proc, line):
    """Reads the child's output until ``line``, then SIGKILLs it; returns what it printed."""
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if text.strip() == line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    else:
        proc.wait()
        pytest.fail(f"the child ended before printing {line!r}:\n{''.join(seen)}")
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("method", ["lora", "galore"])
def test_killed_run_resumes_bit_identically(method, tmp_path):
    # refresh_every=2: the bases are refreshed (lora: new random bases with rotated
    # moments; galore: a new SVD) at steps 4 and 6, after the checkpoint of step 3.
    common = ["train", "--method", method, "--steps", STEPS, "--save-every", SAVE_EVERY]
    common += ["--refresh-every", 2]
    run(*common, "--ckpt", tmp_path / "straight", "--npz", tmp_path / "straight.npz")

    ckpt, npz = tmp_path / "killed", tmp_path / "resumed.npz"
    proc = start(*common, "--ckpt", ckpt, "--npz", npz, "--pause-after", SAVE_EVERY + 1)
    printed = kill_when(proc, f"step {SAVE_EVERY + 1} done")
    assert f"step {SAVE_EVERY} done" in printed
    assert not npz.exists()
    assert Checkpointer(ckpt).latest_step() == SAVE_EVERY

    out = run(*common, "--ckpt", ckpt, "--npz", npz, "--resume")
    assert f"resumed at step {SAVE_EVERY}" in out
    assert f"step {SAVE_EVERY + 1} done" in out and f"step {SAVE_EVERY} done" not in out

    straight, resumed = load(tmp_path / "straight.npz"), load(npz)
    assert sorted(straight) == sorted(resumed)
    assert any("opt_state" in k for k in straight) and any("params" in k for k in straight)
    for name, value in straight.items():
        assert value.dtype == resumed[name].dtype, name
        assert np.array_equal(value, resumed[name]), name
    assert int(straight[".step"]) == STEPS


def test_killed_async_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = start("async-crash", "--ckpt", ckpt, "--k1", 5, "--k2", 9)
    printed = kill_when(proc, "saving")
    assert "saved" not in printed.split()
    # The interrupted save left at most a temporary directory, never a step "9".
    assert not (ckpt / "9").exists()
    checkpointer = Checkpointer(ckpt)
    assert checkpointer.all_steps() == [5]
    assert checkpointer.latest_step() == 5
    expected = resume_worker.big_state(5)
    restored, _, meta = checkpointer.restore(target=abstract_state(expected))
    assert meta["step"] == 5
    flat_a, flat_b = resume_worker.flat(expected), resume_worker.flat(restored)
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
        assert np.array_equal(flat_a[name], flat_b[name]), name
    # Saving goes on past the debris of the killed save.
    checkpointer.save(9, expected)
    checkpointer.wait()
    assert checkpointer.all_steps() == [5, 9]
