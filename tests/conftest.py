"""Test configuration: 8 fake CPU devices and strict rank promotion, set before JAX starts.

Dtype promotion stays "standard" here because optax's own Adam is not strict-clean (its
bias correction raises a float to an int32 power). ``tests/test_strict_promotion.py``
runs every lorajax code path under ``jax.numpy_dtype_promotion("strict")`` with
strict-clean inner transforms instead, so silent f32/bf16 mixing in lorajax is caught.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The test programs are tiny: LLVM's optimisation passes cost more than they save.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
