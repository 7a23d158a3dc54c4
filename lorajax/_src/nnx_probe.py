r"""Running a Flax NNX model with probes (projected backward) or unmerged adapters.

A training step that never forms a weight gradient needs the model's targeted matmuls
to take extra arrays that change every step: probes and zero coordinates
(:mod:`lorajax._src.probed`), or LoRA factors. :class:`ProbedGraph` prepares a model
once, outside ``jax.jit``; its :meth:`ProbedGraph.merge` is then a cheap pure function
that rebuilds the model from the trainer's plain params dict with those arrays in place:

.. code-block:: python

    graph = ProbedGraph.build(model, "all-linear")   # once
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def loss(coords, params, probes, batch):          # inside jax.jit
        logits = graph.merge(params, probes=probes, coords=coords)(batch["tokens"])
        return cross_entropy(logits, batch["labels"])

    coords = graph.zero_coords(probes)
    grads = jax.grad(loss)(coords, params, probes, batch)  # P_ℓᵀ G and G P_r per kernel

Every targeted layer computes its own output and then, per mode:

- **probes** (``probes=``, ``coords=``: trees shaped like the params with a
  :class:`~lorajax._src.probe.Probe` / :class:`~lorajax._src.probe.Coordinates` at
  targeted kernels and ``None`` elsewhere): ``y`` passes through
  :func:`~lorajax._src.probed.probe_tap`, whose backward gives
  ``∂L/∂Z_ℓ = P_ℓᵀ G`` and ``∂L/∂Z_r = G P_r`` in factored form;
- **adapters** (``adapters=``: a tree of :class:`lorajax.adapters.LoRA`):
  ``y + s·(x a) b``, unmerged. For ``nnx.LinearGeneral`` and ``nnx.Einsum`` the factors
  are reshaped to the kernel's input and output axes and contracted in turn, so
  ``a b`` is never formed either. Differentiate the adapter tree;
- neither: the plain model (every extra array has width 0 and is skipped).

Widths may change between calls (rank ``r`` on normal steps, sketch widths on refresh
steps, 0 for an unused side): the static graph holds no shapes, so only ``jax.jit``
retraces. Stacked layers (``Llama(scan_layers=True)``: kernels ``(L, n, m)``) take
arrays with the same leading axes; they live in the layer's own state, so the scan over
the stacked state slices them together with the kernels. ``nnx.remat`` and bfloat16
compute work unchanged.

Design. Each targeted ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum`` is
replaced by a subclass of its own type (:class:`ProbedLinear`, ...) that holds six
extra variables and whose ``__call__`` calls the original ``__call__`` and then adds
the terms above. The alternative, a wrapper module holding the layer as ``base``, was
rejected:

- With a subclass the parameter paths do not change (``.../q_proj/kernel``), so the
  trainer's params dict, the probe, coordinate and adapter trees, checkpoints,
  sharding rules and target regexes all use one set of paths, and ``merge`` only adds
  entries. A wrapper moves every targeted kernel to ``.../q_proj/base/kernel``, which
  needs path surgery on the way in and on every tree that comes back.
- The forward pass is the layer's own, bit for bit: its dtype promotion, custom
  ``dot_general``/``einsum_op``, ``preferred_element_type``, bias and ``out_sharding``.
- The layer is still an ``nnx.Linear`` (etc.), so code that reads ``layer.kernel`` or
  checks the type keeps working.

The price: only layers of exactly these three types can be probed (a user subclass
may override ``__call__`` with a contraction we cannot know), and the probed instance
is made from the original by NNX's node protocol (a new object of the subclass with
the original's attributes), once, on an abstract copy: the user's model is not touched.

The probe and adapter products use ``jnp.einsum`` with the layer's ``precision``; a
custom ``dot_general`` or ``einsum_op`` of the layer (e.g. a quantised one) applies to
the layer's own output only.

The extra variables are :class:`ProbeVariable` (``probe_left``, ``probe_right``),
:class:`CoordinateVariable` (``coord_left``, ``coord_right``), neither an ``nnx.Param``
nor an ``nnx.LoRAParam``, and ``nnx.LoRAParam`` (``lora_a`` holding ``s·a``, and
``lora_b``), as in :mod:`lorajax.nnx`.

References:
    Su, "The gradient view of LoRA", 2023 (``ALGORITHMS.md``, section 1).
    Zhao et al., "GaLore", 2024, https://arxiv.org/abs/2403.03507.
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
    https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorajax._src.adapters.tree import LoRA
from lorajax._src.matrices import MatrixLayout, MatrixSpec
from lorajax._src.nnx_graph import (
    complete_targets,
    factor_partition,
    factor_variable,
    join_path,
    nest,
    replace_node,
    walk,
)
from lorajax._src.nnx_layer import SUPPORTED, layer_spec
from lorajax._src.probe import Coordinates, Probe
from lorajax._src.probed import Contraction, check_probe_shapes, kernel_roles, probe_tap
from lorajax._src.targets import Targets, path_str, select_targets

__all__ = [
    "CoordinateVariable",
    "ProbeVariable",
    "ProbedEinsum",
    "ProbedGraph",
    "ProbedLinear",
    "ProbedLinearGeneral",
]

_FULL_GRADIENT = (
    "Exclude it from `targets`, or train with the full gradient (Trainer(..., projected=False))."
)


class ProbeVariable(nnx.Variable):
    """A probe ``P_ℓ`` or ``P_r`` held by a probed layer; never trained.

    Neither an ``nnx.Param`` nor an ``nnx.LoRAParam``, so optimizers and filters built
    for those leave it alone.

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> graph = lorajax.nnx.ProbedGraph.build(model, targets="kernel")
        >>> layer = graph.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param))).layers[0]
        >>> isinstance(layer, nnx.Linear), type(layer.probe_left).__name__
        (True, 'ProbeVariable')
        >>> type(layer.coord_left).__name__, layer.coord_left.shape  # width 0: no probe
        ('CoordinateVariable', (0, 3))
    """


class CoordinateVariable(nnx.Variable):
    """Zero coordinates ``Z_ℓ`` or ``Z_r`` of a probed layer: differentiated, never updated.

    Neither an ``nnx.Param`` nor an ``nnx.LoRAParam``.

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> graph = lorajax.nnx.ProbedGraph.build(model, targets="kernel")
        >>> layer = graph.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param))).layers[0]
        >>> isinstance(layer, nnx.Linear), type(layer.probe_left).__name__
        (True, 'ProbeVariable')
        >>> type(layer.coord_left).__name__, layer.coord_left.shape  # width 0: no probe
        ('CoordinateVariable', (0, 3))
    """


# -- the probed layers ----------------------------------------------------------------


def _factored(x: jax.Array, a: jax.Array, b: jax.Array, c: Contraction, y_shape, precision):
    """``x`` contracted with ``from_matrix(a b)`` as ``c`` contracts the kernel, unformed."""
    batch, ins, outs = c.dims(x.shape, y_shape)
    r = a.shape[-1]
    (rho,) = c.unused(1)
    h_letters = "".join(ch for ch in c.lhs if ch not in c.ins) + rho
    kw = dict(precision=precision, preferred_element_type=jnp.float32)
    a = a.reshape(*batch, *ins, r).astype(x.dtype)
    h = jnp.einsum(f"{c.lhs},{c.batch}{c.ins}{rho}->{h_letters}", x, a, **kw)
    b = b.reshape(*batch, r, *outs).astype(x.dtype)
    return jnp.einsum(f"{h_letters},{c.batch}{rho}{c.outs}->{c.out}", h.astype(x.dtype), b, **kw)


def _own_ndim(layer: Any) -> int:
    """The number of axes of one layer's kernel (a stacked kernel has more)."""
    if isinstance(layer, nnx.Einsum):
        return len(layer.einsum_str.replace(" ", "").split("->")[0].split(",")[1])
    if isinstance(layer, nnx.LinearGeneral):
        return len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
    return 2


class _ProbeTerms:
    """What the three probed layer types share: the extra terms after the layer's output."""

    def _check_unstacked(self) -> None:
        kernel = self.kernel.get_value()  # type: ignore[attr-defined]
        if kernel.ndim != _own_ndim(self):
            raise ValueError(
                f"This {type(self).__name__} holds a stacked kernel {kernel.shape} (one "
                "per layer); call it on one layer's slice, e.g. inside "
                "the jax.lax.scan over the stacked state."
            )

    def _terms(self, inputs: jax.Array, y: jax.Array, subscripts: str) -> jax.Array:
        kernel = self.kernel.get_value()  # type: ignore[attr-defined]
        bias = self.bias.get_value() if self.bias is not None else None  # type: ignore[attr-defined]
        x, _, _ = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)  # type: ignore[attr-defined]
        precision = self.precision  # type: ignore[attr-defined]
        contraction = Contraction.parse(subscripts, x.ndim)
        a, b = self.lora_a.get_value(), self.lora_b.get_value()
        if a.shape[-1] > 0:
            y = y + _factored(x, a, b, contraction, y.shape, precision).astype(y.dtype)
        probe = Probe(self.probe_left.get_value(), self.probe_right.get_value())
        if probe.left.shape[-1] > 0 or probe.right.shape[-1] > 0:
            coords = Coordinates(self.coord_left.get_value(), self.coord_right.get_value())
            y = probe_tap(y, x, probe, coords, subscripts, precision=precision)
        return y


class ProbedLinear(_ProbeTerms, nnx.Linear):
    """An ``nnx.Linear`` that also takes probes or adapters; built by :class:`ProbedGraph`.

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> graph = lorajax.nnx.ProbedGraph.build(model, targets="kernel")
        >>> layer = graph.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param))).layers[0]
        >>> isinstance(layer, nnx.Linear), type(layer.probe_left).__name__
        (True, 'ProbeVariable')
        >>> type(layer.coord_left).__name__, layer.coord_left.shape  # width 0: no probe
        ('CoordinateVariable', (0, 3))
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """The layer's output, then the probe tap and the adapter term (if any)."""
        self._check_unstacked()
        y = super().__call__(inputs, out_sharding=out_sharding)
        lead = string.ascii_lowercase[: inputs.ndim - 1]
        return self._terms(inputs, y, f"{lead}N,NM->{lead}M")


class ProbedLinearGeneral(_ProbeTerms, nnx.LinearGeneral):
    """An ``nnx.LinearGeneral`` that also takes probes or adapters (see :class:`ProbedGraph`).

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0)))
        >>> graph = lorajax.nnx.ProbedGraph.build(model, targets="kernel")
        >>> graph.layouts["layers/0/kernel"].matrix_shape
        (4, 6)
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """The layer's output, then the probe tap and the adapter term (if any)."""
        self._check_unstacked()
        y = super().__call__(inputs, out_sharding=out_sharding)
        ndim = inputs.ndim
        axis = tuple(sorted(ax % ndim for ax in self.axis))  # as the layer normalises them
        batch = tuple(sorted(ax % ndim for ax in self.batch_axis))
        letters = string.ascii_lowercase[:ndim]
        outs = string.ascii_uppercase[: len(self.out_features)]
        of = lambda axes: "".join(letters[ax] for ax in axes)  # noqa: E731
        free = of(ax for ax in range(ndim) if ax not in axis and ax not in batch)
        # dot_general puts batch axes first, then the input's free axes, then the outputs.
        subscripts = f"{letters},{of(batch)}{of(axis)}{outs}->{of(batch)}{free}{outs}"
        return self._terms(inputs, y, subscripts)


class ProbedEinsum(_ProbeTerms, nnx.Einsum):
    """An ``nnx.Einsum`` that also takes probes or adapters (see :class:`ProbedGraph`).

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> layer = nnx.Einsum("btd,dh->bth", (4, 6), rngs=nnx.Rngs(0))
        >>> graph = lorajax.nnx.ProbedGraph.build(nnx.Sequential(layer), targets="kernel")
        >>> graph.layouts["layers/0/kernel"].matrix_shape
        (4, 6)
    """

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        """The layer's output, then the probe tap and the adapter term (if any)."""
        self._check_unstacked()
        y = super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        own = self.einsum_str.replace(" ", "")
        subscripts = own if einsum_str is None else einsum_str.replace(" ", "")
        if subscripts != own and kernel_roles(subscripts) != kernel_roles(own):
            raise ValueError(
                f"einsum_str={einsum_str!r} reads the kernel with other input/output axes "
                f"than the layer's own {self.einsum_str!r}, for which its probes and adapters "
                "were built; call it with an equation that keeps the kernel's roles."
            )
        return self._terms(inputs, y, subscripts)


_PROBED = {
    nnx.Linear: ProbedLinear,
    nnx.LinearGeneral: ProbedLinearGeneral,
    nnx.Einsum: ProbedEinsum,
}
SLOTS = ("probe_left", "probe_right", "coord_left", "coord_right", "lora_a", "lora_b")


def _layout(layer: nnx.Module, where: str) -> MatrixLayout:
    """The matrix view of a supported layer's kernel, leading stacked axes as batch axes."""
    shape = tuple(layer.kernel.get_value().shape)  # type: ignore[attr-defined]
    if type(layer) is nnx.Linear:
        return layer_spec(layer, where).resolve(shape, where)
    if type(layer) is nnx.Einsum and layer.einsum_str is None:
        raise ValueError(
            f"The nnx.Einsum at {where!r} has no einsum_str of its own (it is passed at "
            "call time), so its kernel's input and output axes are unknown. Give the "
            f"layer its equation when you build it. {_FULL_GRADIENT}"
        )
    own = _own_ndim(layer)
    lead = len(shape) - own
    if lead < 0:
        raise ValueError(
            f"The {type(layer).__name__} at {where!r} has a kernel {shape} with fewer axes "
            f"than its features ({own}). {_FULL_GRADIENT}"
        )
    if type(layer) is nnx.Einsum:
        try:
            batch, ins, outs = kernel_roles(layer.einsum_str)
        except ValueError as e:
            raise ValueError(
                f"The nnx.Einsum at {where!r} cannot be probed: {e} {_FULL_GRADIENT}"
            ) from None
    else:  # LinearGeneral: its own axes as layer_spec reads them, after any stacked ones
        own_layout = layer_spec(layer, where).resolve(shape[lead:], where)
        batch, ins, outs = own_layout.batch_axes, own_layout.in_axes, own_layout.out_axes
    shift = lambda axes: tuple(ax + lead for ax in axes)  # noqa: E731
    spec = MatrixSpec(shift(ins), shift(outs), tuple(range(lead)) + shift(batch))
    return spec.resolve(shape, where)


def _probed_copy(layer: nnx.Module) -> nnx.Module:
    """An instance of the probed subclass holding ``layer``'s attributes (NNX node protocol)."""
    new = object.__new__(_PROBED[type(layer)])
    vars(new).update(vars(layer))
    return new


def _slot_shapes(layout: MatrixLayout) -> dict[str, tuple[int, ...]]:
    """The width-0 shape of every extra variable of a layer with this layout."""
    *batch, n, m = layout.matrix_shape
    return {
        "probe_left": (*batch, n, 0),
        "probe_right": (*batch, m, 0),
        "coord_left": (*batch, 0, m),
        "coord_right": (*batch, n, 0),
        "lora_a": (*batch, n, 0),
        "lora_b": (*batch, 0, m),
    }


def _add_slots(layer: nnx.Module, kernel: nnx.Variable, layout: MatrixLayout) -> None:
    names = factor_partition(kernel.get_metadata().get("out_sharding"), layout)
    a_names = b_names = r_names = None
    if names is not None:
        a_names, b_names = names
        r_names = (*b_names[:-2], b_names[-1], None)  # (*batch, m, width)
    kinds = {
        "probe_left": (ProbeVariable, a_names),
        "probe_right": (ProbeVariable, r_names),
        "coord_left": (CoordinateVariable, b_names),
        "coord_right": (CoordinateVariable, a_names),
        "lora_a": (nnx.LoRAParam, a_names),
        "lora_b": (nnx.LoRAParam, b_names),
    }
    for name, shape in _slot_shapes(layout).items():
        kind, axis_names = kinds[name]
        value = jax.ShapeDtypeStruct(shape, jnp.float32)
        setattr(layer, name, factor_variable(kind, value, kernel, axis_names))


# -- trees keyed by path ----------------------------------------------------------------


def _flat(tree: Any, name: str) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` for a nested dict (or ``nnx.State``) of arrays."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"`{name}` must be a nested dict such as "
            f"nnx.to_pure_dict(nnx.state(model, nnx.Param)), got {type(tree).__name__}."
        )
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nodes(tree: Any, kind: type, name: str) -> dict[str, Any]:
    """``{path: node}`` for the ``kind`` nodes of a tree with ``kind``/``None`` leaves."""
    if tree is None:
        return {}
    is_leaf = lambda x: x is None or isinstance(x, kind)  # noqa: E731
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        if leaf is None:
            continue
        if not isinstance(leaf, kind):
            raise TypeError(
                f"`{name}` holds a {type(leaf).__name__} at {path_str(kp)!r}; it must hold a "
                f"{kind.__name__} at each targeted kernel and None elsewhere."
            )
        out[path_str(kp)] = leaf
    return out


class ProbedGraph:
    """An NNX model prepared to run with probes or unmerged adapters at its targeted kernels.

    Build it once with :meth:`build`; call :meth:`merge` inside the step. See the module
    docstring for the maths and the design.

    Attributes:
        graphdef: The static graph of the probed model.
        layouts: ``{kernel path: MatrixLayout}`` for every targeted kernel, as its layer
            reads it (leading stacked axes are batch axes).
        targets: The targeted kernel paths, in model order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> graph = lorajax.nnx.ProbedGraph.build(model, targets="kernel")
        >>> graph.targets
        ('layers/0/kernel',)
        >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        >>> probed = graph.merge(params)  # no probes: the plain model's output
        >>> type(probed.layers[0]).__name__, probed(jnp.ones((2, 4))).shape
        ('ProbedLinear', (2, 3))
    """

    def __init__(self, graphdef: Any, template: list, layouts: dict, rest: dict) -> None:
        self.graphdef = graphdef
        self._template = template  # (path, role, key, abstract value) per variable
        self.layouts: dict[str, MatrixLayout] = layouts
        self.targets: tuple[str, ...] = tuple(layouts)
        self._rest = rest

    @classmethod
    def build(cls, model: nnx.Module, targets: Targets = "all-linear") -> ProbedGraph:
        """Prepares ``model`` (which is left unchanged) to take probes at ``targets``.

        Args:
            model: Any NNX model. Each targeted parameter must be the kernel of an
                ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum`` (the latter with
                its own ``einsum_str``).
            targets: Which kernels, as for :func:`lorajax.nnx.add_lora`: ``None`` (every
                parameter with at least two axes), a preset (``"all-linear"``,
                ``"attention"``, ``"mlp"``), a regex searched in the ``/``-joined path, a
                callable or a nested dict shaped like the params. The matrix view of each
                kernel always comes from its layer (see :attr:`specs`).

        Returns:
            The :class:`ProbedGraph`.

        Raises:
            TypeError: if ``model`` is not an ``nnx.Module``, or a targeted parameter
                belongs to another kind of layer (the error names its path).
            ValueError: if ``targets`` selects nothing, or an ``nnx.Einsum`` without an
                equation of its own.
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
        if isinstance(targets, MatrixSpec):
            raise ValueError(
                f"`targets`={targets!r}: each kernel is read as its layer reads it, so a "
                "MatrixSpec has no use here. Pass a preset, regex, callable or nested dict."
            )
        graphdef, state = nnx.split(model)
        abstract_state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
        abstract = nnx.merge(graphdef, abstract_state)
        rest = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
        rest = {join_path(p): v.get_value() for p, v in rest}

        params: dict[tuple[Any, ...], Any] = {}
        modules: dict[tuple[Any, ...], Any] = {}
        occurrences: dict[int, list[tuple[Any, ...]]] = {}
        for path, node in walk(abstract, stop=lambda n: False):
            if isinstance(node, nnx.Param):
                params.setdefault(path, node.get_value())
            elif isinstance(node, nnx.Module):
                occurrences.setdefault(id(node), []).append(path)
                modules.setdefault(path, node)
        if not params:
            raise ValueError("`model` has no nnx.Param to probe.")
        nested = nest(params)
        specs, paths = select_targets(nested, complete_targets(targets, nested))
        by_str = {join_path(p): p for p in params}
        layouts: dict[str, MatrixLayout] = {}
        chosen: list[tuple[Any, ...]] = []
        for spec, where in zip(specs, paths):
            if spec is None:
                continue
            path = by_str[where]
            owner = modules.get(path[:-1])
            if type(owner) not in _PROBED or path[-1] != "kernel":
                what = "no layer" if owner is None else f"an {type(owner).__name__}"
                raise TypeError(
                    f"`targets`={targets!r} selects {where!r}, a parameter of {what}; the "
                    "projected backward can probe only the kernels of "
                    f"{', '.join('nnx.' + t.__name__ for t in SUPPORTED)} layers. "
                    f"{_FULL_GRADIENT}"
                )
            layouts[where] = _layout(owner, join_path(path[:-1]))
            chosen.append(path)
        if not chosen:
            raise ValueError(f"`targets`={targets!r} selects no kernel of the model.")
        for path in chosen:
            layer = modules[path[:-1]]
            probed = _probed_copy(layer)
            _add_slots(probed, layer.kernel, layouts[join_path(path)])
            for module_path in occurrences[id(layer)]:
                replace_node(abstract, module_path, probed)

        graphdef, state = nnx.split(abstract)
        layer_of = {join_path(p[:-1]): join_path(p) for p in chosen}
        template = []
        for path, var in nnx.to_flat_state(state):
            key = join_path(path)
            owner = layer_of.get(join_path(path[:-1]))
            if owner is not None and path[-1] in SLOTS:
                role, key = path[-1], owner
            elif isinstance(var, nnx.Param):
                role = "param"
            else:
                role = "rest"
            template.append((path, role, key, var.get_value()))
        return cls(graphdef, template, layouts, rest)

    @property
    def specs(self) -> Any:
        """The params tree with each target's :class:`~lorajax.MatrixSpec` and ``None``.

        Pass it as ``targets`` to :func:`lorajax.low_rank` and
        :func:`lorajax.adapters.init`, so that bases, probes and adapters use the matrix
        view in which the layers take them.
        """
        flat = {}
        for path, role, key, _ in self._template:
            if role == "param":
                lay = self.layouts.get(key)
                flat[path] = (
                    None if lay is None else MatrixSpec(lay.in_axes, lay.out_axes, lay.batch_axes)
                )
        return nest(flat)

    def zero_coords(self, probes: Any, dtype: Any = jnp.float32) -> Any:
        """Zero :class:`~lorajax._src.probe.Coordinates` for ``probes``: the tree to differentiate.

        Args:
            probes: A tree with a ``Probe`` at (some) targeted kernels and ``None``
                elsewhere.
            dtype: The coordinates' dtype (their gradients come back in it).

        Returns:
            The same tree with ``Coordinates(zeros (*batch, a, m), zeros (*batch, n, b))``
            in place of each ``Probe``.
        """
        is_leaf = lambda x: x is None or isinstance(x, Probe)  # noqa: E731

        def zeros(kp: Any, probe: Any) -> Any:
            if probe is None:
                return None
            where = path_str(kp)
            layout = self._layout_of(where, "probes")
            *batch, n, m = layout.matrix_shape
            if not isinstance(probe, Probe):
                raise TypeError(
                    f"`probes` at {where!r} must be a Probe, got {type(probe).__name__}."
                )
            a, b = probe.left.shape[-1], probe.right.shape[-1]
            return Coordinates(jnp.zeros((*batch, a, m), dtype), jnp.zeros((*batch, n, b), dtype))

        return jax.tree_util.tree_map_with_path(zeros, probes, is_leaf=is_leaf)

    def _layout_of(self, where: str, name: str) -> MatrixLayout:
        if where not in self.layouts:
            raise ValueError(
                f"`{name}` has an entry at {where!r}, which is not a targeted kernel of this "
                f"ProbedGraph; its targets are {list(self.targets)}. Put None there, or build "
                "the graph with targets that include it."
            )
        return self.layouts[where]

    def _extras(self, probes: Any, coords: Any, adapters: Any) -> dict[str, dict[str, Any]]:
        """``{target: {slot: array}}`` for the slots that the trees fill."""
        if (probes is None) != (coords is None):
            raise ValueError(
                "Pass `probes` and `coords` together: coords = graph.zero_coords(probes)."
            )
        probe_at = _nodes(probes, Probe, "probes")
        coords_at = _nodes(coords, Coordinates, "coords")
        if set(probe_at) != set(coords_at):
            raise ValueError(
                f"`probes` are at {sorted(probe_at)} but `coords` at {sorted(coords_at)}; "
                "build them with graph.zero_coords(probes)."
            )
        out: dict[str, dict[str, Any]] = {}
        for where, probe in probe_at.items():
            layout = self._layout_of(where, "probes")
            *batch, n, m = layout.matrix_shape
            try:
                check_probe_shapes(probe, coords_at[where], tuple(batch), n, m)
            except (TypeError, ValueError) as e:
                raise type(e)(f"At {where!r} (kernel {layout.shape}): {e}") from None
            left, right = coords_at[where]
            out[where] = dict(
                probe_left=probe.left, probe_right=probe.right, coord_left=left, coord_right=right
            )
        for where, lora in _nodes(adapters, LoRA, "adapters").items():
            layout = self._layout_of(where, "adapters")
            *batch, n, m = layout.matrix_shape
            if lora.magnitude is not None:
                raise ValueError(
                    f"`adapters` at {where!r} is a DoRA adapter (it has a magnitude); it "
                    "cannot be applied unmerged. Call the model on "
                    "lorajax.adapters.merge(params, adapters) instead."
                )
            if lora.layout is not None and lora.layout != layout:
                raise ValueError(
                    f"`adapters` at {where!r} were built for {lora.layout}, but the layer "
                    f"reads its kernel as {layout}. Build them with "
                    "lorajax.adapters.init(..., targets=graph.specs)."
                )
            a_shape, b_shape = tuple(lora.a.shape), tuple(lora.b.shape)
            r = a_shape[-1] if a_shape else -1
            if a_shape != (*batch, n, r) or b_shape != (*batch, r, m):
                raise ValueError(
                    f"`adapters` at {where!r}: factors a {a_shape} and b {b_shape} do not fit "
                    f"the kernel's matrix view {layout.matrix_shape}; they must be "
                    f"(*batch, n, r) = {(*batch, n)} + (r,) and (*batch, r, m)."
                )
            out.setdefault(where, {}).update(lora_a=lora.scale * lora.a, lora_b=lora.b)
        return out

    def merge(
        self,
        params: Any,
        *,
        probes: Any = None,
        coords: Any = None,
        adapters: Any = None,
        rest: Any = None,
    ) -> nnx.Module:
        r"""The model with these params, and probes or adapters in its targeted layers.

        A pure function, cheap inside ``jax.jit``: it rebuilds the model from the static
        graph. Differentiate ``coords`` (probe mode) or ``adapters`` (adapter mode); with
        only those differentiated, no weight gradient is formed.

        Args:
            params: The original model's ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
                (or that ``nnx.State``); ``int`` or ``str`` keys for list indices.
            probes: ``None``, or a params-shaped tree with a ``Probe(P_ℓ (*batch, n, a),
                P_r (*batch, m, b))`` at targeted kernels and ``None`` elsewhere (a
                target with ``None`` takes no probe).
            coords: Zeros matching ``probes``, from :meth:`zero_coords`.
            adapters: ``None``, or a tree of :class:`lorajax.adapters.LoRA` (from
                ``lorajax.adapters.init(..., targets=graph.specs)``) applied as
                ``s·(x a) b`` without merging.
            rest: The model's variables other than ``nnx.Param`` (e.g. RNG state), as a
                nested dict or ``nnx.State``; by default those of the model at build.

        Returns:
            The NNX model to call.

        Raises:
            ValueError: if a tree does not fit (the error names the path and the shape
                it needs).

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from lorajax._src.nnx_probe import ProbedGraph
            >>> from lorajax._src.probe import Probe
            >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
            >>> graph = ProbedGraph.build(model, targets="kernel")
            >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            >>> x = jax.random.normal(jax.random.key(1), (8, 4))
            >>> probe = Probe(left=jnp.eye(4)[:, :2], right=jnp.zeros((3, 0)))
            >>> probes = {"layers": {0: {"kernel": probe, "bias": None}}}
            >>> coords = graph.zero_coords(probes)
            >>> def loss(coords):
            ...     model = graph.merge(params, probes=probes, coords=coords)
            ...     return jnp.sum(model(x) ** 2)
            >>> grads = jax.jit(jax.grad(loss))(coords)
            >>> g = grads["layers"][0]["kernel"]
            >>> bias = params["layers"][0]["bias"][None, :]
            >>> full = jax.grad(lambda k: jnp.sum((x @ k + bias) ** 2))(
            ...     params["layers"][0]["kernel"])
            >>> bool(jnp.allclose(g.left, full[:2], rtol=1e-5, atol=1e-5)), g.right.shape
            (True, (4, 0))
        """
        flat = _flat(params, "params")
        flat_rest = self._rest if rest is None else _flat(rest, "rest")
        extras = self._extras(probes, coords, adapters)
        values: dict[tuple[Any, ...], Any] = {}
        for path, role, key, abstract in self._template:
            if role == "param":
                if key not in flat:
                    raise ValueError(
                        f"`params` has no entry at {key!r}. Pass "
                        "nnx.to_pure_dict(nnx.state(model, nnx.Param)) of the model the graph "
                        "was built from."
                    )
                value = flat[key]
                if tuple(jnp.shape(value)) != tuple(abstract.shape):
                    raise ValueError(
                        f"`params` at {key!r} has shape {jnp.shape(value)}; the model has "
                        f"{abstract.shape}."
                    )
            elif role == "rest":
                if key not in flat_rest:
                    raise ValueError(f"`rest` has no entry at {key!r}.")
                value = flat_rest[key]
            else:
                value = extras.get(key, {}).get(role)
                if value is None:
                    value = jnp.zeros(abstract.shape, abstract.dtype)
            values[path] = value
        return nnx.merge(self.graphdef, nest(values))
