"""Every transform in tests.contract.CASES through the shared contract."""

import pytest
from jax.sharding import AxisType

from tests import contract

cases = pytest.mark.parametrize("case", contract.CASES, ids=lambda c: c.name)


@cases
def test_jit(case):
    contract.check_jit(case)


@cases
def test_inject_hyperparams_schedule(case):
    contract.check_inject_hyperparams(case)


@cases
def test_multisteps(case):
    contract.check_multisteps(case)


@cases
def test_apply_if_finite(case):
    contract.check_apply_if_finite(case)


@cases
def test_chain_and_partition(case):
    contract.check_chain_and_partition(case)


@cases
def test_bf16_params_f32_state(case):
    contract.check_bf16_params_f32_state(case)


@cases
def test_init_from_shape_dtype_struct(case):
    contract.check_init_from_shape_dtype_struct(case)


@cases
def test_stable_state(case):
    contract.check_stable_state(case)


@cases
def test_no_retrace(case):
    contract.check_no_retrace(case)


@cases
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
def test_sharded_8_devices(case, axis_type):
    contract.check_sharded(case, axis_type)
