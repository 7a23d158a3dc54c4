"""Target selection and MatrixSpec layouts."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optax.contrib import GaLoreDimensionNumbers

import lorajax


def _selected(params, targets):
    layouts = lorajax.resolve_targets(params, targets)
    flat = jax.tree_util.tree_flatten_with_path(layouts, is_leaf=lambda x: x is None)[0]
    return sorted(
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, layout in flat
        if layout is not None
    )


HF = {
    "model": {
        "embed_tokens": {"weight": jnp.zeros((50, 8))},
        "layers": {
            "0": {
                "self_attn": {
                    n: {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                },
                "mlp": {
                    n: {"kernel": jnp.zeros((8, 8))} for n in ("gate_proj", "up_proj", "down_proj")
                },
                "input_layernorm": {"scale": jnp.zeros(8)},
            }
        },
    },
    "lm_head": {"kernel": jnp.zeros((8, 50))},
}
ATTN = [f"model/layers/0/self_attn/{n}/kernel" for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
MLP = [f"model/layers/0/mlp/{n}/kernel" for n in ("down_proj", "gate_proj", "up_proj")]

LINEN = {  # Flax linen: MultiHeadDotProductAttention + an MlpBlock of Dense layers
    "encoder": {
        "MultiHeadDotProductAttention_0": {
            "query": {"kernel": jnp.zeros((16, 4, 4))},
            "key": {"kernel": jnp.zeros((16, 4, 4))},
            "value": {"kernel": jnp.zeros((16, 4, 4))},
            "out": {"kernel": jnp.zeros((4, 4, 16))},
        },
        "MlpBlock_0": {
            "Dense_0": {"kernel": jnp.zeros((16, 64))},
            "Dense_1": {"kernel": jnp.zeros((64, 16))},
        },
        "Conv_0": {"kernel": jnp.zeros((3, 3, 4, 8))},
    }
}


def test_presets_on_hugging_face_names():
    assert _selected(HF, "attention") == ATTN
    assert _selected(HF, "mlp") == MLP
    assert _selected(HF, "all-linear") == sorted([*ATTN, *MLP])
    assert len(_selected(HF, None)) == 9  # None: every >= 2-D leaf, embeddings included


def test_presets_on_flax_names_and_head_layouts():
    attn = _selected(LINEN, "attention")
    assert attn == sorted(
        f"encoder/MultiHeadDotProductAttention_0/{n}/kernel"
        for n in ("query", "key", "value", "out")
    )
    assert _selected(LINEN, "mlp") == [
        "encoder/MlpBlock_0/Dense_0/kernel",
        "encoder/MlpBlock_0/Dense_1/kernel",
    ]
    assert "encoder/Conv_0/kernel" not in _selected(LINEN, "all-linear")
    layouts = lorajax.resolve_targets(LINEN, "attention")["encoder"][
        "MultiHeadDotProductAttention_0"
    ]
    assert layouts["query"]["kernel"].matrix_shape == (16, 16)  # d x (heads * head_dim)
    assert layouts["out"]["kernel"].matrix_shape == (16, 16)
    assert layouts["out"]["kernel"].in_axes == (0, 1)


def test_nnx_variable_suffix_is_ignored():
    params = {"layers": {"q_proj": {"kernel": {"value": jnp.zeros((8, 8))}}}}
    assert _selected(params, "attention") == ["layers/q_proj/kernel/value"]


def test_regex_callable_pytree_and_single_spec():
    assert _selected(HF, r"layers/\d+/self_attn/(q|v)_proj/kernel") == [ATTN[2], ATTN[3]]
    assert _selected(HF, lambda path, leaf: "mlp" in path and leaf.ndim == 2) == MLP
    spec = lorajax.MatrixSpec(in_axes=1, out_axes=0)
    by_callable = lorajax.resolve_targets(
        HF, lambda path, leaf: spec if "lm_head" in path else None
    )
    assert by_callable["lm_head"]["kernel"].in_axes == (1,)
    prefix = {"model": None, "lm_head": True}  # a prefix of the params tree
    assert _selected(HF, prefix) == ["lm_head/kernel"]
    one = lorajax.resolve_targets({"a": jnp.zeros((4, 6)), "b": jnp.zeros(3)}, spec)
    assert one["a"].matrix_shape == (6, 4) and one["b"] is None
    dims = lorajax.resolve_targets({"a": jnp.zeros((4, 2, 3))}, GaLoreDimensionNumbers(0, (1, 2)))
    assert dims["a"].matrix_shape == (4, 6)


def test_targets_reach_low_rank():
    tx = lorajax.low_rank(optax.sgd(1.0), rank=2, targets="mlp")
    state = tx.init(HF)
    mlp = state.projectors["model"]["layers"]["0"]["mlp"]
    attn = state.projectors["model"]["layers"]["0"]["self_attn"]
    assert all(
        p is not None
        for p in jax.tree.leaves(mlp, is_leaf=lambda x: isinstance(x, lorajax.Projector))
    )
    assert attn["q_proj"]["kernel"] is None
    # Non-targeted leaves go through the inner optimizer at full shape.
    grads = jax.tree.map(jnp.ones_like, HF)
    updates, _ = tx.update(grads, state)
    np.testing.assert_allclose(
        updates["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], -1.0
    )


@pytest.mark.parametrize(
    "targets, match",
    [
        ("nothing_like_this", "selects no leaf"),
        ("attention", "selects no leaf"),
        ("(unclosed", "neither a preset .* nor a valid regular expression"),
        (lambda path, leaf: None, "returned None for every leaf"),
        ({"w": lorajax.MatrixSpec(), "extra": None}, "structure of the params"),
        ({"w": "yes", "b": None}, "expected a MatrixSpec, a bool or None"),
    ],
)
def test_targets_that_select_nothing_or_do_not_fit_raise(targets, match):
    params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}
    with pytest.raises((ValueError, TypeError), match=match):
        lorajax.low_rank(rank=2, targets=targets).init(params)


def test_regex_that_only_matches_vectors_raises():
    with pytest.raises(ValueError, match="selects no leaf with at least 2 axes"):
        lorajax.low_rank(rank=2, targets="bias").init(
            {"bias": jnp.zeros(4), "w": jnp.zeros((4, 4))}
        )


# --- MatrixSpec ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4),
    data=st.data(),
)
def test_matrix_view_round_trips_and_matches_numpy(shape, data):
    axes = list(range(len(shape)))
    perm = data.draw(st.permutations(axes))
    n_in = data.draw(st.integers(1, len(shape) - 1))
    n_out = data.draw(st.integers(1, len(shape) - n_in))
    in_axes, out_axes = tuple(perm[:n_in]), tuple(perm[n_in : n_in + n_out])
    batch = tuple(perm[n_in + n_out :])
    layout = lorajax.MatrixSpec(in_axes, out_axes, batch).resolve(shape)
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    view = layout.to_matrix(jnp.asarray(x))
    n = int(np.prod([shape[a] for a in in_axes]))
    m = int(np.prod([shape[a] for a in out_axes]))
    want = np.transpose(x, batch + in_axes + out_axes).reshape((*(shape[a] for a in batch), n, m))
    np.testing.assert_array_equal(view, want)
    np.testing.assert_array_equal(layout.from_matrix(view), x)


@pytest.mark.parametrize(
    "spec, shape, match",
    [
        (lorajax.MatrixSpec(in_axes=0, out_axes=0), (3, 4), "named in both in_axes and out_axes"),
        (lorajax.MatrixSpec(in_axes=-2, out_axes=-1, batch_axes=(1,)), (2, 3, 4), "named in both"),
        (lorajax.MatrixSpec(in_axes=3, out_axes=1), (3, 4), "out of range"),
        (lorajax.MatrixSpec(), (2, 3, 4), r"does not name axes \[0\]"),
        (lorajax.MatrixSpec(), (5,), "at least 2 axes"),
    ],
)
def test_bad_matrix_specs_raise(spec, shape, match):
    with pytest.raises(ValueError, match=match):
        spec.resolve(shape)
    with pytest.raises(ValueError, match=match):
        lorajax.low_rank(rank=1, targets={"w": spec}).init({"w": jnp.zeros(shape)})


@pytest.mark.parametrize(
    "kwargs", [dict(in_axes=1.5), dict(out_axes="x"), dict(batch_axes=(True,)), dict(in_axes=())]
)
def test_matrix_spec_rejects_non_integer_axes(kwargs):
    with pytest.raises((TypeError, ValueError), match="in_axes|out_axes|batch_axes"):
        lorajax.MatrixSpec(**kwargs)


def test_every_axis_permutation_of_a_3d_leaf_is_accepted():
    for perm in itertools.permutations(range(3)):
        layout = lorajax.MatrixSpec(perm[0], perm[1], (perm[2],)).resolve((2, 3, 5))
        assert layout.matrix_shape == ((2, 3, 5)[perm[2]], (2, 3, 5)[perm[0]], (2, 3, 5)[perm[1]])
