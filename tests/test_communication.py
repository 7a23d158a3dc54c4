"""Communication of the sharded optimizer update, read from the compiled HLO.

Two parts:

- the HLO collective parser (``lorajax.sharding.collectives``) on hand-written HLO text
  and on small compiled programs;
- the optimizer update of Llama-shaped params sharded by ``LLAMA_RULES`` on 8 devices:
  its collectives move at most ``c · r · (d_in + d_out)`` elements per matrix (``c``
  derived below for each method) and never gather a W-sized array, except with exact SVD
  (GaLore), which is documented to gather.

Everything here compiles and parses; nothing runs a step, and nothing is timed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax import sharding
from lorajax.sharding import Collective, collective_bytes, collective_elements, collectives

# -- the parser on hand-written HLO --------------------------------------------------


def one(text):
    found = collectives(text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "line, kind, shape",
    [
        (
            "%ar = f32[16,8]{1,0} all-reduce(f32[16,8]{1,0} %x), channel_id=1, "
            "replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add",
            "all-reduce",
            (16, 8),
        ),
        (
            "%ag = f32[64,8]{1,0} all-gather(f32[8,8]{1,0} %x), channel_id=2, "
            "replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true",
            "all-gather",
            (64, 8),
        ),
        (
            "%rs = f32[2,8]{1,0} reduce-scatter(f32[16,8]{1,0} %x), dimensions={0}, to_apply=%add",
            "reduce-scatter",
            (2, 8),
        ),
        ("%a2a = f32[8,4]{1,0} all-to-all(f32[8,4]{1,0} %x), dimensions={0}", "all-to-all", (8, 4)),
        (
            "%cp = f32[5,3]{1,0} collective-permute(f32[5,3]{1,0} %x), "
            "source_target_pairs={{0,1},{1,0}}",
            "collective-permute",
            (5, 3),
        ),
    ],
)
def test_each_kind_is_read_with_its_result_shape(line, kind, shape):
    c = one("  " + line)
    assert (c.kind, c.shapes, c.dtypes, c.is_async) == (kind, (shape,), ("f32",), False)
    assert c.elements == math.prod(shape)
    assert c.bytes == 4 * math.prod(shape)


def test_tuple_results_count_every_element():
    # A combined all-reduce, as XLA prints long tuples (with /*index=...*/ markers).
    text = (
        "  %all-reduce.30 = (f32[2,4,32]{2,1,0}, bf16[2,4,64]{2,1,0}, f32[2,4,32]{2,1,0}, "
        "f32[3]{0}, f32[]{:T(128)}, /*index=5*/s32[7]{0}) all-reduce(%a, %b, %c, %d, %e, %f), "
        'channel_id=35, to_apply=%add, metadata={op_name="jit(f)/dot_general"}'
    )
    c = one(text)
    assert c.name == "all-reduce.30"
    assert c.shapes == ((2, 4, 32), (2, 4, 64), (2, 4, 32), (3,), (), (7,))
    assert c.dtypes == ("f32", "bf16", "f32", "f32", "f32", "s32")
    assert c.elements == 256 + 512 + 256 + 3 + 1 + 7
    assert c.bytes == 4 * 256 + 2 * 512 + 4 * 256 + 4 * 3 + 4 + 4 * 7


def test_dtype_sizes_in_bytes():
    text = """
    %a = bf16[10,10]{1,0} all-reduce(%x), to_apply=%add
    %b = f32[10,10]{1,0} all-reduce(%x), to_apply=%add
    %c = f8e4m3fn[10]{0} all-gather(%x), dimensions={0}
    %d = s4[3]{0} all-gather(%x), dimensions={0}
    %e = pred[6]{0} all-reduce(%x), to_apply=%or
    %f = f64[2]{0} collective-permute(%x), source_target_pairs={{0,1}}
    """
    assert [c.bytes for c in collectives(text)] == [200, 400, 10, 2, 6, 16]
    totals = collective_bytes(text)
    assert totals == {
        "all-reduce": 606,
        "all-gather": 12,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 16,
    }
    assert collective_elements(text)["all-reduce"] == 206


def test_async_pairs_count_once_with_the_output_shape():
    text = """
    %ags = (f32[4,16]{1,0}, f32[32,16]{1,0}) all-gather-start(f32[4,16]{1,0} %p), dimensions={0}
    %agd = f32[32,16]{1,0} all-gather-done((f32[4,16]{1,0}, f32[32,16]{1,0}) %ags)
    %ags2 = ((f32[1,8], bf16[1,5]), (f32[8,8]{1,0}, bf16[8,5]{1,0})) all-gather-start(%a, %b)
    %agd2 = (f32[8,8]{1,0}, bf16[8,5]{1,0}) all-gather-done(%ags2)
    %ars = f32[128]{0} all-reduce-start(f32[128]{0} %q), to_apply=%add
    %ard = f32[128]{0} all-reduce-done(f32[128]{0} %ars)
    %cps = (f32[6,2]{1,0}, f32[6,2]{1,0}, u32[], u32[]) collective-permute-start(%r)
    %cpd = f32[6,2]{1,0} collective-permute-done(%cps)
    """
    found = collectives(text)
    assert [(c.kind, c.shapes, c.is_async) for c in found] == [
        ("all-gather", ((32, 16),), True),
        ("all-gather", ((8, 8), (8, 5)), True),
        ("all-reduce", ((128,),), True),
        ("collective-permute", ((6, 2),), True),
    ]
    assert found[1].bytes == 4 * 64 + 2 * 40


def test_collectives_wrapped_in_a_generic_async_start_count_once():
    text = """
HloModule m, entry_computation_layout={(f32[16]{0})->f32[2]{0}}

%wrapped_reduce_scatter (p: f32[16]) -> f32[2] {
  %p = f32[16]{0} parameter(0)
  ROOT %rs = f32[2]{0} reduce-scatter(f32[16]{0} %p), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[16]) -> f32[2] {
  %x = f32[16]{0} parameter(0)
  %s = ((f32[16]{0}), f32[2]{0}) async-start(f32[16]{0} %x), calls=%wrapped_reduce_scatter
  ROOT %d = f32[2]{0} async-done(((f32[16]{0}), f32[2]{0}) %s), calls=%wrapped_reduce_scatter
}
"""
    c = one(text)
    assert (c.kind, c.shapes, c.computation, c.repeats) == (
        "reduce-scatter",
        ((2,),),
        "wrapped_reduce_scatter",
        1,
    )


def test_names_and_metadata_that_mention_a_collective_are_not_counted():
    text = """
    %all-reduce.3 = f32[8]{0} add(%a, %b), metadata={op_name="all-gather"}
    %copy = f32[8]{0} copy(%all-gather.2), metadata={op_name="jit(f)/all-to-all"}
    %gte = f32[8]{0} get-tuple-element(%all-reduce.4), index=0
    """
    assert collectives(text) == []


def test_loops_multiply_and_both_branches_of_a_conditional_count():
    text = """
%inner (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag = f32[4]{0} all-gather(f32[1]{0} %x), dimensions={0}
}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[]) while(%t), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"4"}}
  %ar = f32[10]{0} all-reduce(f32[10]{0} %y), to_apply=%add
}

%no_count_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %cp = f32[3]{0} collective-permute(f32[3]{0} %z), source_target_pairs={{0,1}}
}

%then (p: f32[8]) -> f32[8] {
  ROOT %a2a = f32[8]{0} all-to-all(f32[8]{0} %p), dimensions={0}
}

%else (p: f32[8]) -> f32[8] {
  ROOT %rs = f32[2]{0} reduce-scatter(f32[8]{0} %p), dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w1 = (s32[]) while(%t), body=%outer_body, backend_config={"known_trip_count":{"n":"3"},"x":1}
  %w2 = (s32[], f32[4]) while(%t), condition=%c2, body=%no_count_body
  %k = f32[8]{0} conditional(%pred, %a, %a), branch_computations={%then, %else}
  ROOT %top = f32[8]{0} all-reduce(f32[8]{0} %a), to_apply=%add
}
"""
    found = {c.name: c for c in collectives(text)}
    assert {n: (c.repeats, c.computation) for n, c in found.items()} == {
        "ag": (12, "inner"),
        "ar": (3, "outer_body"),
        "cp": (1, "no_count_body"),
        "a2a": (1, "then"),
        "rs": (1, "else"),
        "top": (1, "main"),
    }
    assert collective_elements(text) == {
        "all-reduce": 3 * 10 + 8,
        "all-gather": 12 * 4,
        "reduce-scatter": 2,
        "all-to-all": 8,
        "collective-permute": 3,
    }


def test_bounded_dynamic_sizes_count_their_bound():
    assert one("%ag = f32[<=16,4]{1,0} all-gather(%x), dimensions={0}").elements == 64


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="hlo_text"):
        collectives(42)
    with pytest.raises(ValueError, match="q17"):
        collectives("%ag = q17[4]{0} all-gather(%x), dimensions={0}")
    with pytest.raises(ValueError, match="dynamic"):
        collectives("%ag = f32[?,4]{1,0} all-gather(%x), dimensions={0}")


def test_collective_sizes_are_per_execution():
    c = Collective("all-reduce", "x", ((3, 5), ()), ("bf16", "f32"), repeats=7)
    assert (c.elements, c.bytes) == (16, 34)


# -- the parser on compiled programs --------------------------------------------------


def fsdp_mesh(axis_type="explicit"):
    return sharding.make_mesh({"fsdp": 8}, axis_types=axis_type)


def test_compiled_reduction_and_gather_are_found():
    mesh = fsdp_mesh()
    x = jax.ShapeDtypeStruct((64, 24), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        total = jax.jit(lambda x: x.sum(0), out_shardings=replicated).lower(x).compile()
        gather = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(x).compile()
    reduced = collectives(total.as_text())
    assert [c.kind for c in reduced] == ["all-reduce"]
    assert reduced[0].elements == 24  # each device sums its 8 rows, then one reduce of 24
    gathered = collectives(gather)  # a compiled object is accepted as well
    assert [(c.kind, c.elements) for c in gathered] == [("all-gather", 64 * 24)]
    assert collective_bytes(gather)["all-gather"] == 4 * 64 * 24


# -- the optimizer update of sharded Llama-shaped params -----------------------------
#
# Shapes: a scanned stack of L layers, kernels (d_in, d_out) as lorajax.models.Llama lays
# them out, the MLP with d_in != d_out. Only shapes and shardings matter to the compiled
# program, so params are ShapeDtypeStructs (nothing is allocated). The sizes are chosen so
# that the whole communication budget of an update stays below one W-sized leaf (asserted
# in test_the_bound_is_below_one_weight below).
L, D, FF, VOCAB = 2, 512, 1024, 256
RANK, OVERSAMPLE, POWER_ITERS = 2, 2, 1
KERNELS = {
    "self_attn/q_proj": (D, D),
    "self_attn/k_proj": (D, D),
    "self_attn/v_proj": (D, D),
    "self_attn/o_proj": (D, D),
    "mlp/gate_proj": (D, FF),
    "mlp/up_proj": (D, FF),
    "mlp/down_proj": (FF, D),
}
MESHES = ("fsdp=8", "fsdp=4,tensor=2", "fsdp=2,tensor=4")
AXIS_TYPES = ("explicit", "auto")

# c per method: the bound is sum over the L * 7 targeted matrices of c * r * (n + m).
#
# Counting rule: every contraction over a sharded axis is an all-reduce of its result, and
# every QR/SVD input is gathered (lorajax._src.shard); each is counted at its full,
# unsharded size, which bounds its per-device size. Both branches of the refresh
# ``lax.cond`` are in the program, so both count.
#
# low_rank, basis="randomized_svd", side="auto", q = POWER_ITERS power iterations and
# k = r + p sketch columns (p = OVERSAMPLE). With (n', m') the matrix as projected
# ((n, m) for the left side, (m, n) for the right; m' = min(n, m) either way):
#   every step: coordinates Uᵀ G, r·m'                                        r·min(n, m)
#   refresh (projection.py fresh_stored -> randomized_svd.sketched_svd, warm start):
#     z = Gᵀ Y0 (m' × k) and y = G z (n' × k)                                 k(n + m)
#     per power iteration: gather y, Gᵀ q, gather z, G z                      2k(n + m)
#     final: gather y (n' × k), B = Qᵀ G (k × m'), gather B                   k(n + m) + k·m'
#   refresh maps (on_refresh="rotate"): U_newᵀ U_old                          r²
# Total: k(n + m)(2q + 2) + (k + r)·min(n, m) + r². With p = r (k = 2r), min(n, m) and r
# both <= (n + m)/2: at most r(n + m)(4q + 4 + 1 + 1/2 + 1/2), so c = 4q + 6 (10 here).
#
# lora (basis "random_orthogonal", side="both", LoRA-Pro alignment): the bases
# U (n × r), V (m × r) are drawn from the key and orthonormalised by their polar factor,
# whose Gram matrices are all-reduced (2r²); the refresh cond redraws the previous ones
# (2r²) and maps U_newᵀ U_old, V_oldᵀ V_new (2r²); coordinates Uᵀ G and G V: r(n + m);
# LoRA-Pro's Uᵀ N_a: r². Total r(n + m) + 7r² <= 2·r(n + m) when 7r <= n + m: c = 2.
#
# flora (basis "random", side="auto"): Gaussian bases need no orthonormalisation, so
# only the coordinates r·min(n, m) and the refresh maps r²: c = 1.
C = {"low_rank": 4 * POWER_ITERS + 6, "lora": 2, "flora": 1}


def make_tx(method):
    if method == "low_rank":
        return lorajax.low_rank(
            optax.scale_by_adam(),
            rank=RANK,
            oversample=OVERSAMPLE,
            power_iters=POWER_ITERS,
            targets="all-linear",
        )
    if method == "lora":
        return lorajax.lora(1e-3, RANK, targets="all-linear")
    if method == "flora":
        return lorajax.flora(1e-3, RANK, targets="all-linear")
    if method == "galore":
        return lorajax.galore(1e-3, rank=RANK, targets="all-linear")
    return optax.adamw(1e-3)


def llama_params():
    def f32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    layers = {"input_layernorm": {"scale": f32(L, D)}, "self_attn": {}, "mlp": {}}
    for name, (n, m) in KERNELS.items():
        block, proj = name.split("/")
        layers[block][proj] = {"kernel": f32(L, n, m)}
    return {
        "model": {
            "embed_tokens": {"embedding": f32(VOCAB, D)},
            "layers": layers,
            "norm": {"scale": f32(D)},
        }
    }


def bound(method):
    return sum(C[method] * RANK * (n + m) * L for n, m in KERNELS.values())


def smallest_gather_of_a_weight(mesh):
    """Per-device elements of the smallest all-gather that reassembles part of a W.

    LLAMA_RULES split every matrix over the fsdp and tensor axes, so a device holds
    n·m / (fsdp · tensor) of it; gathering any of it over one of those axes multiplies that
    by at least the smaller axis.
    """
    axes = [mesh.shape[a] for a in ("fsdp", "tensor") if mesh.shape.get(a, 1) > 1]
    return min(n * m for n, m in KERNELS.values()) // math.prod(axes) * min(axes)


@functools.cache
def update_hlo(method, mesh_shape, axis_type):
    mesh = sharding.make_mesh(mesh_shape, axis_types=axis_type)
    params = llama_params()
    specs = sharding.param_specs(params, sharding.LLAMA_RULES, mesh=mesh)
    shardings = sharding.to_shardings(specs, mesh)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    tx = make_tx(method)
    with jax.set_mesh(mesh):
        state_sh = sharding.state_shardings(tx, placed)
        state = jax.eval_shape(jax.jit(tx.init, out_shardings=state_sh), placed)
        update = jax.jit(
            tx.update,
            in_shardings=(shardings, state_sh, shardings),
            out_shardings=(shardings, state_sh),
        )
        return mesh, update.lower(placed, state, placed).compile().as_text()


def test_the_bound_is_below_one_weight():
    # The whole budget is smaller than one W-sized leaf, so a gather of any leaf breaks it.
    smallest_leaf = L * min(n * m for n, m in KERNELS.values())
    for method in C:
        assert bound(method) < smallest_leaf, method


CASES = [(method, mesh, t) for method in C for mesh in MESHES for t in AXIS_TYPES]


@pytest.mark.parametrize("method, mesh_shape, axis_type", CASES)
def test_projected_updates_move_low_rank_blocks_only(method, mesh_shape, axis_type):
    mesh, hlo = update_hlo(method, mesh_shape, axis_type)
    found = collectives(hlo)
    moved = sum(c.elements * c.repeats for c in found)
    assert moved > 0  # a sharded projection must communicate
    assert moved <= bound(method), (moved, bound(method))
    # Tight: one more gather of any single matrix (n·m elements) would break the bound.
    assert bound(method) - moved < min(n * m for n, m in KERNELS.values()), moved
    limit = smallest_gather_of_a_weight(mesh)
    gathers = [c.elements for c in found if c.kind == "all-gather"]
    assert all(g < limit for g in gathers), (max(gathers), limit)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_exact_svd_gathers_whole_weights(axis_type):
    # GaLore's exact SVD is the documented exception: it gathers every W at a refresh.
    mesh, hlo = update_hlo("galore", "fsdp=4,tensor=2", axis_type)
    found = collectives(hlo)
    gathers = [c.elements * c.repeats for c in found if c.kind == "all-gather"]
    assert max(gathers) >= smallest_gather_of_a_weight(mesh)
    # Per device, every whole matrix arrives at least once.
    assert sum(gathers) >= L * sum(n * m for n, m in KERNELS.values())
    assert sum(c.elements * c.repeats for c in found) > bound("low_rank")


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_full_adamw_update_does_not_communicate(axis_type):
    # Adam is elementwise: each device updates its own shard.
    _, hlo = update_hlo("adamw", "fsdp=2,tensor=4", axis_type)
    assert collectives(hlo) == []
    assert set(collective_bytes(hlo).values()) == {0}


def test_the_check_catches_a_gathered_weight():
    # The same update with an explicit gather of one matrix gradient added: the bound
    # and the gather check both see it.
    mesh = sharding.make_mesh("fsdp=4,tensor=2", axis_types="explicit")
    n, m = KERNELS["self_attn/q_proj"]
    g = jax.ShapeDtypeStruct((n, m), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "tensor")))
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda g: g * 1.0, out_shardings=replicated).lower(g).compile().as_text()
    extra = sum(c.elements for c in collectives(hlo) if c.kind == "all-gather")
    assert extra >= n * m
    _, base = update_hlo("low_rank", "fsdp=4,tensor=2", "explicit")
    moved = sum(c.elements * c.repeats for c in collectives(base))
    assert moved + extra > bound("low_rank")
    assert extra >= smallest_gather_of_a_weight(mesh)
    assert moved <= bound("low_rank")


# -- the update on coordinates from a projected backward pass ------------------------
#
# With lorajax.Coordinates in place of the gradients, the update no longer contracts G:
# the coordinates arrive laid out like the kept axis (lorajax.probes and coordinate_zeros
# follow the rules), so only the r x r maps, the polar factors of random bases and
# LoRA-Pro's Uᵀ N_a remain. The same per-method bounds hold with room to spare.


@functools.cache
def coordinates_update_hlo(method, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape, axis_types="explicit")
    params = llama_params()
    specs = sharding.param_specs(params, sharding.LLAMA_RULES, mesh=mesh)
    shardings = sharding.to_shardings(specs, mesh)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    tx = make_tx(method)
    with jax.set_mesh(mesh):
        state_sh = sharding.state_shardings(tx, placed)
        state = jax.eval_shape(jax.jit(tx.init, out_shardings=state_sh), placed)

        def grads_of(state, params):
            probes = lorajax.probes(state, params, refresh=False)
            zeros = lorajax.coordinate_zeros(probes)
            return jax.tree.map(
                lambda z, p: p if z is None else z,
                zeros,
                params,
                is_leaf=lambda x: x is None or isinstance(x, lorajax.Coordinates),
            )

        grads = jax.eval_shape(grads_of, state, placed)
        update = jax.jit(tx.update, out_shardings=(shardings, state_sh))
        return mesh, grads, update.lower(grads, state, placed).compile().as_text()


@pytest.mark.parametrize("method, mesh_shape", [(m, s) for m in C for s in MESHES])
def test_updates_on_coordinates_move_low_rank_blocks_only(method, mesh_shape):
    mesh, grads, hlo = coordinates_update_hlo(method, mesh_shape)
    coords = [
        g
        for g in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, lorajax.Coordinates))
        if isinstance(g, lorajax.Coordinates)
    ]
    assert len(coords) == len(KERNELS)  # every kernel takes coordinates
    for c in coords:  # laid out like the kept axis, the rank axis whole
        assert c.left.sharding.spec[-2] is None and c.right.sharding.spec[-1] is None
        assert any(e is not None for e in (*c.left.sharding.spec, *c.right.sharding.spec))
    found = collectives(hlo)
    moved = sum(c.elements * c.repeats for c in found)
    assert moved <= bound(method), (moved, bound(method))
    limit = smallest_gather_of_a_weight(mesh)
    assert all(c.elements < limit for c in found if c.kind == "all-gather")
