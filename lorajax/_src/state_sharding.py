"""The sharding of an optimizer state, derived from the shardings of its params.

lorajax's transforms lay out every state leaf they create from the layout of the matrix
it belongs to (``lorajax._src.state``): a left basis ``U (d_in, r)`` follows ``W``'s
``d_in`` axis, a right basis ``V (d_out, r)`` its ``d_out`` axis, projected coordinates
and the inner optimizer's moments follow the axis the projection keeps, the rank axis is
replicated, and keys and counts are replicated. Optax's own states follow their params.

:func:`state_shardings` reads those layouts by tracing ``tx.init`` abstractly on a mesh
with ``Explicit`` axes (no array is created and nothing is compiled), so the rules live in
one place: the code that builds the state.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["place", "state_shardings"]


def _mesh_of(shardings: Any) -> Any:
    meshes = {s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)}
    if len(meshes) != 1:
        raise ValueError(
            "`params` must carry NamedShardings of one mesh (arrays placed with "
            f"jax.device_put or ShapeDtypeStructs with sharding=), found {len(meshes)} meshes."
        )
    return meshes.pop()


def _sharding_of(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"Every leaf of `params` needs a NamedSharding, got {type(sharding).__name__} "
            f"on a leaf of shape {getattr(x, 'shape', None)}. Place the params first, or "
            "pass `shardings`."
        )
    return sharding


def state_shardings(tx: Any, params: Any, shardings: Any = None) -> Any:
    """The ``NamedSharding`` of every leaf of ``tx.init(params)``.

    Use it to create and keep the state in place, with nothing left to the compiler:
    ``jax.jit(tx.init, out_shardings=state_shardings(tx, params))`` and the same tree as
    the state's ``in_shardings``/``out_shardings`` of a train step. It works for any
    optax transformation; for lorajax's it follows the rules above. Both ``Explicit`` and
    ``Auto`` meshes work: the result is on the params' own mesh.

    Args:
        tx: An optax ``GradientTransformation``.
        params: Arrays or ``jax.ShapeDtypeStruct`` (shapes and dtypes are read).
        shardings: A tree of ``NamedSharding`` like ``params`` (default: each leaf's
            own ``.sharding``).

    Returns:
        A tree like the state, with a ``NamedSharding`` at each leaf.

    Raises:
        ValueError: If a leaf has no ``NamedSharding`` or the shardings span several
            meshes.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from lorajax.sharding import make_mesh, state_shardings
        >>> mesh = make_mesh({"fsdp": -1})
        >>> w = jax.ShapeDtypeStruct((16, 8), jnp.float32,
        ...                          sharding=NamedSharding(mesh, P("fsdp", None)))
        >>> tx = lorajax.lora(1e-3, 2)
        >>> out = state_shardings(tx, {"w": w})
        >>> moments = out[0].inner_state.mu["w"]
        >>> moments.a.spec, moments.b.spec
        (P('fsdp', None), P(None, None))
    """
    if shardings is None:
        shardings = jax.tree.map(_sharding_of, params)
    mesh = _mesh_of(shardings)
    abstract_mesh = mesh.abstract_mesh.update(axis_types=(AxisType.Explicit,) * len(mesh.shape))

    def abstract(x: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(abstract_mesh, sharding.spec)
        )

    tree = jax.tree.map(abstract, params, shardings)
    with jax.sharding.use_abstract_mesh(abstract_mesh):
        out = jax.eval_shape(tx.init, tree)

    def concrete(x: jax.ShapeDtypeStruct) -> NamedSharding:
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(concrete, out)


def place(tree: Any, shardings: Any) -> Any:
    """Puts host or device arrays on their shardings, in one or many processes.

    Every process passes the same full values (e.g. weights each host read from the same
    file); each keeps only the shards its devices hold. Arrays already laid out as asked
    are returned as they are.

    Args:
        tree: Arrays (numpy or jax) or ``None`` leaves.
        shardings: A tree of ``NamedSharding`` like ``tree``.

    Returns:
        ``tree`` as ``jax.Array`` with the given shardings.

    Examples:
        >>> import numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from lorajax.sharding import make_mesh, place
        >>> mesh = make_mesh({"fsdp": -1})
        >>> w = place({"w": np.ones((8, 2))}, {"w": NamedSharding(mesh, P("fsdp"))})["w"]
        >>> w.sharding.spec, float(w.sum())
        (P('fsdp',), 16.0)
    """

    def one(x: Any, sharding: NamedSharding) -> Any:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)
