"""LoRI's mask: exactly k entries, the globally largest |b|, across layers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax._src.adapters.tree import lora_leaves
from lorajax.adapters import LoRA


def _lora(b, n=4):
    b = jnp.asarray(b, jnp.float32)
    *batch, r, m = b.shape
    spec = lorajax.MatrixSpec(batch_axes=tuple(range(len(batch))))
    return LoRA(a=jnp.zeros((*batch, n, r)), b=b, rank=r, layout=spec.resolve((*batch, n, m)))


def _tree(seed=0, quiet_scale=1e-3):
    ks = jax.random.split(jax.random.key(seed), 3)
    return {
        "attn": {"q": {"kernel": _lora(jax.random.normal(ks[0], (2, 7))), "bias": None}},
        "mlp": {"up": {"kernel": _lora(jax.random.normal(ks[1], (3, 2, 5)))}},
        "quiet": {"kernel": _lora(quiet_scale * jax.random.normal(ks[2], (2, 6)))},
    }


def _bs(tree):
    return [np.asarray(lora.b) for _, lora in lora_leaves(tree)]


def _masks(mask):
    return [np.asarray(m) for m in jax.tree.leaves(mask)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.99])
def test_keeps_exactly_the_k_largest_entries_overall(sparsity):
    tree = _tree()
    mask = lorajax.adapters.lori_mask(tree, sparsity)
    # Structure: a bool array shaped like b where the LoRA was, None elsewhere.
    assert mask["attn"]["q"]["bias"] is None
    assert mask["mlp"]["up"]["kernel"].shape == (3, 2, 5)
    assert all(m.dtype == np.bool_ for m in _masks(mask))
    mags = np.concatenate([np.abs(b).ravel() for b in _bs(tree)])  # 14 + 30 + 12 = 56
    k = round((1 - sparsity) * mags.size)
    kept = np.concatenate([m.ravel() for m in _masks(mask)])
    assert kept.sum() == k
    # Oracle: the k-th largest magnitude is a threshold (values are distinct).
    if 0 < k < mags.size:
        threshold = np.sort(mags)[::-1][k - 1]
        np.testing.assert_array_equal(kept, mags >= threshold)


def test_a_layer_with_small_values_gets_no_entries():
    mask = lorajax.adapters.lori_mask(_tree(), sparsity=0.75)  # k = 14 of 56
    assert not _masks(mask)[2].any()  # "quiet" holds |b| ~ 1e-3
    assert sum(m.sum() for m in _masks(mask)) == 14


def test_equal_magnitudes_go_to_the_first_entries_in_tree_order():
    tree = {"x": _lora(np.full((2, 3), -2.0)), "y": _lora(np.full((2, 3), 2.0))}
    mask = lorajax.adapters.lori_mask(tree, sparsity=0.75)  # k = 3 of 12
    np.testing.assert_array_equal(mask["x"], [[True, True, True], [False, False, False]])
    assert not np.asarray(mask["y"]).any()
    again = lorajax.adapters.lori_mask(tree, sparsity=0.75)
    np.testing.assert_array_equal(again["x"], mask["x"])


def test_bf16_factors_and_edge_sparsities():
    tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if hasattr(x, "astype") else x, _tree())
    dense = lorajax.adapters.lori_mask(tree, 0.0)
    assert all(m.all() for m in _masks(dense))
    tiny = lorajax.adapters.lori_mask({"k": _lora(np.ones((1, 3)))}, 0.9)  # round(0.3) = 0
    assert not np.asarray(tiny["k"]).any()


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_the_range(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        lorajax.adapters.lori_mask(_tree(), sparsity)


@pytest.mark.parametrize("sparsity", ["0.9", [0.9], True])
def test_sparsity_not_a_number(sparsity):
    with pytest.raises(TypeError, match="`sparsity` must be a number"):
        lorajax.adapters.lori_mask(_tree(), sparsity)


def test_a_tree_without_lora():
    with pytest.raises(ValueError, match="`adapters` holds no LoRA"):
        lorajax.adapters.lori_mask({"kernel": None, "bias": None})


def test_default_sparsity_is_recorded_or_point_nine():
    tree = _tree()  # 56 entries of b, no sparsity recorded
    assert sum(m.sum() for m in _masks(lorajax.adapters.lori_mask(tree))) == round(0.1 * 56)
    half = jax.tree.map(
        lambda x: x.replace(sparsity=0.5), tree, is_leaf=lambda x: isinstance(x, LoRA)
    )
    assert sum(m.sum() for m in _masks(lorajax.adapters.lori_mask(half))) == 28
    assert sum(m.sum() for m in _masks(lorajax.adapters.lori_mask(half, 0.75))) == 14
    mixed = half | {"quiet": {"kernel": half["quiet"]["kernel"].replace(sparsity=0.8)}}
    with pytest.raises(ValueError, match=r"record different sparsities \[0.5, 0.8\]"):
        lorajax.adapters.lori_mask(mixed)


def test_lori_workflow_trains_only_the_kept_entries():
    params = {"mlp": {"up_proj": {"kernel": jnp.ones((6, 8))}}, "o": {"kernel": jnp.ones((8, 4))}}
    key = jax.random.key(0)
    adapters, _ = lorajax.adapters.init(
        key, params, rank=2, init="lori", sparsity=0.75, targets=None
    )
    # A stand-in for the dense calibration run: some trained b factors.
    calibrated = jax.tree.map(
        lambda x: x.replace(b=jax.random.normal(jax.random.key(1), x.b.shape)),
        adapters,
        is_leaf=lambda x: isinstance(x, LoRA),
    )
    mask = lorajax.adapters.lori_mask(calibrated)  # recorded sparsity 0.75: 6 of 24 kept
    assert sum(m.sum() for m in _masks(mask)) == 6
    fresh, _ = lorajax.adapters.init(key, params, rank=2, init="lori", sparsity=0.75, targets=None)
    tx = optax.chain(optax.sgd(0.1), lorajax.adapters.freeze(mask))
    grads = jax.tree.map(jnp.ones_like, fresh)
    updates, _ = tx.update(grads, tx.init(fresh), fresh)
    for (_, u), m in zip(lora_leaves(updates), _masks(mask)):
        np.testing.assert_array_equal(np.asarray(u.a), 0.0)
        np.testing.assert_array_equal(np.asarray(u.b) != 0, m)
