"""Every bad input raises a clear error that names the argument and the fix."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lorajax

PARAMS = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "`rank` must be a positive int, got 0"),
        (dict(rank=-3), ValueError, "`rank` must be a positive int, got -3"),
        (dict(rank=2.5), TypeError, "`rank` must be a positive int, got 2.5"),
        (dict(rank="4"), TypeError, "`rank` must be a positive int"),
        (dict(rank=True), TypeError, "`rank` must be a positive int, got True"),
        (
            dict(rank=2, side="top"),
            ValueError,
            "`side` must be one of 'auto', 'left', 'right', 'both'; got 'top'",
        ),
        (dict(rank=2, basis="qr"), ValueError, "`basis` must be one of 'svd', 'randomized_svd'"),
        (
            dict(rank=2, on_refresh="rotat"),
            ValueError,
            "`on_refresh` must be one of 'keep', 'rotate', 'reset'",
        ),
        (dict(rank=2, align="pro"), ValueError, "`align` must be one of 'lora_pro', 'sum'"),
        (dict(rank=2, on_small_matrix="x"), ValueError, "`on_small_matrix` must be one of"),
        (
            dict(rank=2, refresh_every=0),
            ValueError,
            "`refresh_every` must be a positive int, got 0",
        ),
        (dict(rank=2, refresh_every=2.0), TypeError, "`refresh_every` must be a positive int"),
        (
            dict(rank=2, side="both", lora_plus_ratio=0.0),
            ValueError,
            "`lora_plus_ratio` must be > 0",
        ),
        (
            dict(rank=2, side="both", lora_plus_ratio=-1),
            ValueError,
            "`lora_plus_ratio` must be > 0",
        ),
        (dict(rank=2, lora_plus_ratio=4.0), ValueError, "only applies with side='both'"),
        (dict(rank=2, scale=0.0), ValueError, "`scale` must be > 0"),
        (
            dict(rank=2, scale=optax.linear_schedule(1.0, 0.1, 10)),
            TypeError,
            r"`scale` must be a positive number, got the callable .* optax.inject_hyperparams",
        ),
        (
            dict(rank=2, side="both", lora_plus_ratio=lambda step: 4.0),
            TypeError,
            r"`lora_plus_ratio` must be a positive number, got the callable",
        ),
        (dict(rank=2, oversample=-1), ValueError, "`oversample` must be a non-negative int"),
        (dict(rank=2, power_iters=1.5), TypeError, "`power_iters` must be a non-negative int"),
        (dict(rank=2, state_dtype="int32"), ValueError, "`state_dtype` must be a floating dtype"),
        (dict(rank=2, state_dtype="floaty"), TypeError, "`state_dtype` must be a dtype name"),
        (
            dict(rank=2, inner=optax.adam),
            TypeError,
            "`inner` must be an optax GradientTransformation",
        ),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        lorajax.low_rank(**kwargs)


def test_rank_above_min_dimension_clamps_skips_or_raises():
    with pytest.raises(ValueError, match=r"`rank`=7 exceeds min\(d_in, d_out\)=6 for leaf 'w'"):
        lorajax.low_rank(rank=7, on_small_matrix="error").init(PARAMS)
    clamped = lorajax.low_rank(rank=7).init(PARAMS)  # default: clamp, as optax's GaLore
    assert clamped.projectors["w"].rank == 6
    skipped = lorajax.low_rank(rank=6, on_small_matrix="skip").init(PARAMS)
    assert skipped.projectors["w"] is None  # full-shape inner for that leaf
    assert skipped.inner_state.mu["w"].shape == (8, 6)
    assert lorajax.low_rank(rank=5, on_small_matrix="skip").init(PARAMS).projectors["w"].rank == 5


def test_two_sided_on_a_leaf_without_two_matrix_axes():
    tx = lorajax.low_rank(rank=2, side="both", targets={"w": None, "b": lorajax.MatrixSpec()})
    with pytest.raises(
        ValueError, match="needs a leaf with at least 2 axes.*'b' has shape \\(6,\\)"
    ):
        tx.init(PARAMS)


def test_inner_optimizer_that_needs_params():
    with pytest.raises(
        ValueError, match="cannot see params.*add_decayed_weights.*weight decay after"
    ):
        lorajax.low_rank(optax.adamw(1e-3), rank=2).init(PARAMS)
    with pytest.raises(ValueError, match="cannot see params"):
        lorajax.galore(1e-3, rank=2, base_optimizer=optax.adamw(1e-3)).init(PARAMS)


def test_traced_rank_under_jitted_inject_hyperparams():
    tx = optax.inject_hyperparams(lorajax.lora)(learning_rate=1e-3, rank=2)
    with pytest.raises(TypeError, match="static_args=\\('rank',\\)"):
        jax.jit(tx.init)(PARAMS)
    # Outside jit (or with static_args) it works.
    tx.init(PARAMS)


def test_alias_argument_errors():
    with pytest.raises(TypeError, match="unknown keyword argument.*'sides'.*accepts"):
        lorajax.lora(1e-3, rank=2, sides="left")
    with pytest.raises(ValueError, match="either `weight_dimension_numbers`.*or `targets`"):
        lorajax.galore(1e-3, targets="mlp", weight_dimension_numbers=lambda p: None)
    with pytest.raises(
        TypeError, match="`rank` must be an? positive int|`rank` must be a positive int"
    ):
        lorajax.flora(1e-3, rank=None)


def test_current_bases_of_a_whole_chain():
    state = lorajax.lora(1e-3, rank=2).init(PARAMS)
    with pytest.raises(TypeError, match="pass the element that belongs to low_rank"):
        lorajax.current_bases(state)
    assert lorajax.current_bases(state[0])["b"] is None
