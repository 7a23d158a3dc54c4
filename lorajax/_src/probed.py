r"""Probed matmuls: a linear map whose backward pass yields ``P_ℓᵀ G`` and ``G P_r``.

A targeted matmul ``y = x W`` (``x: (..., n)``, ``W: (n, m)``, ``G = ∂L/∂W = xᵀ dY`` with
the leading axes of ``x`` as tokens) is computed as

.. math::

    y = x W + (x P_\ell) Z_\ell + (x Z_r) P_r^\top, \qquad Z_\ell = 0,\; Z_r = 0,

and only the zero coordinates ``Z`` (a :class:`~lorajax._src.probe.Coordinates`) are
differentiated. Their gradients come straight from the backward pass,

.. math::

    \frac{\partial L}{\partial Z_\ell} = (x P_\ell)^\top dY = P_\ell^\top G, \qquad
    \frac{\partial L}{\partial Z_r} = x^\top (dY P_r) = G P_r,

at a cost of ``2t(na + am)`` and ``2t(mb + nb)`` flops for ``t`` tokens, and ``G`` is
never formed.

Because ``Z = 0`` the extra terms are zero in the forward pass and contribute nothing
to ``∂L/∂x`` or ``∂L/∂P``. The forward pass is therefore the plain ``x W``, computed by
whatever op the caller uses, and :func:`probe_tap` (a ``jax.custom_vjp``) is an identity
on ``y`` whose backward adds the two coordinate gradients and passes ``dY`` through.
The input gradient ``dY Wᵀ`` comes from the ordinary transpose of the matmul. The weight
gradient is computed only when ``W`` itself is differentiated (then it is the true
``G``): with only the coordinates differentiated, no weight-gradient matmul runs.

The same holds for any contraction whose kernel is read as a (batch of) matrices by a
:class:`~lorajax.MatrixSpec` (``nnx.LinearGeneral``, ``nnx.Einsum``): the probes are
reshaped to the kernel's input and output axes and contracted with ``x`` and ``dY`` in
factored form (:func:`probed_einsum`), never forming a kernel-sized array.

References:
    Su, "The gradient view of LoRA", 2023 (lorajax's ``ALGORITHMS.md``, section 1).
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", 2024, https://arxiv.org/abs/2403.03507.
    Hao et al., "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", 2024,
    https://arxiv.org/abs/2402.03293.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lorajax._src.matrices import MatrixLayout
from lorajax._src.probe import Coordinates, Probe

__all__ = [
    "Contraction",
    "check_probe_shapes",
    "kernel_roles",
    "probe_tap",
    "probed_einsum",
    "probed_matmul",
]


def _split_subscripts(subscripts: str) -> tuple[str, str, str]:
    eq = subscripts.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1 or eq.count("->") != 1:
        raise ValueError(
            f"`subscripts`={subscripts!r} must be an explicit two-operand equation "
            "'input,kernel->output', e.g. '...d,dk->...k'."
        )
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    return lhs, rhs, out


def kernel_roles(subscripts: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The batch, input and output axes of the kernel of ``'input,kernel->output'``.

    A kernel axis shared by the input and the output indexes independent matrices
    (batch); one contracted with the input only is an input axis; one that reaches the
    output only is an output axis.

    Args:
        subscripts: The contraction, with one distinct letter per kernel axis.

    Returns:
        ``(batch_axes, in_axes, out_axes)``, each in kernel-axis order.

    Raises:
        ValueError: if the equation is not of that form, or if a kernel axis is summed on
            its own, or if the kernel has no input or no output axis.

    Examples:
        >>> from lorajax._src.probed import kernel_roles
        >>> kernel_roles("btd,hdk->bthk")  # kernel (heads, d, head_dim)
        ((), (1,), (0, 2))
    """
    lhs, rhs, out = _split_subscripts(subscripts)
    if "." in rhs or len(set(rhs)) != len(rhs) or not rhs.isalpha():
        raise ValueError(
            f"`subscripts`={subscripts!r}: the kernel needs one distinct letter per axis "
            f"and no ellipsis, got {rhs!r}."
        )
    batch, ins, outs = [], [], []
    for ax, c in enumerate(rhs):
        if c in lhs and c in out:
            batch.append(ax)
        elif c in lhs:
            ins.append(ax)
        elif c in out:
            outs.append(ax)
        else:
            raise ValueError(
                f"`subscripts`={subscripts!r} sums kernel axis {c!r} on its own, so the "
                "kernel is not a linear map from input to output features."
            )
    if not ins or not outs:
        missing = "contracted with the input" if not ins else "in the output"
        raise ValueError(
            f"`subscripts`={subscripts!r} has no kernel axis {missing}, so the kernel is "
            "not a matrix from input to output features."
        )
    return tuple(batch), tuple(ins), tuple(outs)


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A contraction ``y = einsum(lhs + ',' + kernel + '->' + out, x, W)`` by its letters.

    Static and hashable. The kernel letters are grouped by role, each group in the
    order of the kernel's matrix view (its :class:`~lorajax.MatrixLayout`), so that
    ``P_ℓ: (*batch, n, a)`` reshapes to ``(*batch_dims, *in_dims, a)`` and
    ``P_r: (*batch, m, b)`` to ``(*batch_dims, *out_dims, b)``.

    Attributes:
        lhs: Letters of ``x``, one per axis, ellipsis expanded.
        out: Letters of ``y``.
        batch: Kernel letters of the batch axes (in ``x`` and ``y``).
        ins: Kernel letters contracted with ``x`` (the ``n`` side).
        outs: Kernel letters that reach ``y`` only (the ``m`` side).
    """

    lhs: str
    out: str
    batch: str
    ins: str
    outs: str

    @classmethod
    def parse(cls, subscripts: str, x_ndim: int, layout: MatrixLayout | None = None):
        """Reads ``subscripts`` for an ``x`` with ``x_ndim`` axes.

        Args:
            subscripts: ``'input,kernel->output'``; the input (and output) may use
                ``...``.
            x_ndim: The number of axes of ``x``.
            layout: How the kernel is read as matrices; ``None`` takes the kernel's
                axes of each role in their own order. When given, each of its groups
                must hold exactly the kernel axes of that role.

        Returns:
            The :class:`Contraction`.

        Raises:
            ValueError: on a malformed equation, one that does not fit ``x_ndim``, or a
                ``layout`` whose axes do not play the roles it gives them.
        """
        lhs, rhs, out = _split_subscripts(subscripts)
        batch_axes, in_axes, out_axes = kernel_roles(subscripts)
        if "..." in lhs:
            extra = x_ndim - (len(lhs) - 3)
            if extra < 0:
                raise ValueError(
                    f"`subscripts`={subscripts!r} names {len(lhs) - 3} axes of an input with "
                    f"{x_ndim} axes."
                )
            free = "".join(c for c in string.ascii_letters if c not in lhs + rhs + out)[:extra]
            lhs = lhs.replace("...", free)
            out = out.replace("...", free)
        if "." in lhs + out or not (lhs + out).isalpha():
            raise ValueError(f"`subscripts`={subscripts!r} has a misplaced ellipsis.")
        if len(lhs) != x_ndim:
            raise ValueError(
                f"`subscripts`={subscripts!r} names {len(lhs)} axes of the input, which has "
                f"{x_ndim}. Write one letter per axis or use '...' for leading axes."
            )
        if len(set(lhs)) != len(lhs) or len(set(out)) != len(out):
            raise ValueError(
                f"`subscripts`={subscripts!r} repeats a letter in the input or the output; "
                "a probed contraction needs distinct letters there."
            )
        if layout is not None:
            if len(layout.shape) != len(rhs):
                raise ValueError(
                    f"`layout` is for a kernel with {len(layout.shape)} axes, but "
                    f"`subscripts`={subscripts!r} has {len(rhs)}. Build it for this kernel."
                )
            roles = {"batch_axes": batch_axes, "in_axes": in_axes, "out_axes": out_axes}
            for name, axes in roles.items():
                if set(getattr(layout, name)) != set(axes):
                    raise ValueError(
                        f"`layout` has {name}={getattr(layout, name)}, but in "
                        f"`subscripts`={subscripts!r} the kernel's {name} are {axes}. Use "
                        f"MatrixSpec(in_axes={in_axes}, out_axes={out_axes}, "
                        f"batch_axes={batch_axes})."
                    )
            batch_axes, in_axes, out_axes = layout.batch_axes, layout.in_axes, layout.out_axes
        pick = lambda axes: "".join(rhs[ax] for ax in axes)  # noqa: E731
        return cls(lhs, out, pick(batch_axes), pick(in_axes), pick(out_axes))

    def unused(self, count: int) -> str:
        """``count`` letters that the contraction does not use."""
        used = set(self.lhs + self.out + self.batch + self.ins + self.outs)
        return "".join(c for c in string.ascii_letters if c not in used)[:count]

    def dims(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]):
        """``(batch_dims, in_dims, out_dims)`` read off the shapes of ``x`` and ``y``."""
        of_x = lambda letters: tuple(x_shape[self.lhs.index(c)] for c in letters)  # noqa: E731
        out_dims = tuple(y_shape[self.out.index(c)] for c in self.outs)
        return of_x(self.batch), of_x(self.ins), out_dims


def _shape_error(name: str, shape: tuple[int, ...], want: str, fix: str) -> ValueError:
    return ValueError(f"`{name}` has shape {shape}, but this kernel needs {want}. {fix}")


def check_probe_shapes(probe: Any, coords: Any, batch: tuple[int, ...], n: int, m: int) -> None:
    """Raises a clear error unless ``probe`` and ``coords`` fit matrices ``(*batch, n, m)``."""
    if not isinstance(probe, Probe):
        raise TypeError(f"`probe` must be a Probe(left, right), got {type(probe).__name__}.")
    if not isinstance(coords, Coordinates):
        raise TypeError(
            f"`coords` must be a Coordinates(left, right), got {type(coords).__name__}."
        )
    arrays = {
        "probe.left": probe.left,
        "probe.right": probe.right,
        "coords.left": coords.left,
        "coords.right": coords.right,
    }
    for name, arr in arrays.items():
        dtype = getattr(arr, "dtype", None)
        if getattr(arr, "shape", None) is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a floating-point array, got {arr!r}.")
    pl, pr = tuple(probe.left.shape), tuple(probe.right.shape)
    cl, cr = tuple(coords.left.shape), tuple(coords.right.shape)
    nb = len(batch)
    if len(pl) != nb + 2 or pl[:-1] != (*batch, n):
        raise _shape_error(
            "probe.left",
            pl,
            f"(*batch, n, a) = {(*batch, n)} + (a,)",
            "Build P_ℓ in the kernel's matrix view, with any width a (0 turns the side off).",
        )
    if len(pr) != nb + 2 or pr[:-1] != (*batch, m):
        raise _shape_error(
            "probe.right",
            pr,
            f"(*batch, m, b) = {(*batch, m)} + (b,)",
            "Build P_r in the kernel's matrix view, with any width b (0 turns the side off).",
        )
    a, b = pl[-1], pr[-1]
    if cl != (*batch, a, m):
        raise _shape_error(
            "coords.left",
            cl,
            f"(*batch, a, m) = {(*batch, a, m)} for probe.left {pl}",
            "Pass zeros of that shape.",
        )
    if cr != (*batch, n, b):
        raise _shape_error(
            "coords.right",
            cr,
            f"(*batch, n, b) = {(*batch, n, b)} for probe.right {pr}",
            "Pass zeros of that shape.",
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tap(y, x, probe, coords, contraction, precision, dtypes):
    del x, probe, coords, contraction, precision, dtypes
    return y


def _tap_fwd(y, x, probe, coords, contraction, precision, dtypes):
    del coords  # zero by contract; only its dtypes (static) are needed
    return y, (x, probe)


def _matmul(subscripts: str, a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """One einsum in ``a``'s dtype with float32 accumulation."""
    return jnp.einsum(
        subscripts, a, b.astype(a.dtype), precision=precision, preferred_element_type=jnp.float32
    )


def _tap_bwd(contraction: Contraction, precision: Any, dtypes: Any, res: Any, dy: jax.Array):
    x, probe = res
    c = contraction
    batch_dims, in_dims, out_dims = c.dims(x.shape, dy.shape)
    n, m = math.prod(in_dims), math.prod(out_dims)
    a, b = probe.left.shape[-1], probe.right.shape[-1]
    alpha, beta = c.unused(2)
    dy_c = dy.astype(x.dtype)  # the matmuls run in the compute dtype of x
    if a == 0:
        left = jnp.zeros((*batch_dims, 0, m), dtypes[0])
    else:
        # (x P_ℓ)ᵀ dY: contract x with P_ℓ on the kernel's input axes, then with dY on the
        # tokens (every axis that is not a kernel axis).
        p = probe.left.reshape(*batch_dims, *in_dims, a)
        h_letters = "".join(ch for ch in c.lhs if ch not in c.ins) + alpha
        h = _matmul(f"{c.lhs},{c.batch}{c.ins}{alpha}->{h_letters}", x, p, precision)
        g = _matmul(
            f"{h_letters},{c.out}->{c.batch}{alpha}{c.outs}", h.astype(x.dtype), dy_c, precision
        )
        left = g.reshape(*batch_dims, a, m).astype(dtypes[0])
    if b == 0:
        right = jnp.zeros((*batch_dims, n, 0), dtypes[1])
    else:
        # xᵀ (dY P_r): contract dY with P_r on the kernel's output axes, then with x.
        p = probe.right.reshape(*batch_dims, *out_dims, b)
        u_letters = "".join(ch for ch in c.out if ch not in c.outs) + beta
        u = _matmul(f"{c.out},{c.batch}{c.outs}{beta}->{u_letters}", dy_c, p, precision)
        g = _matmul(f"{c.lhs},{u_letters}->{c.batch}{c.ins}{beta}", x, u.astype(x.dtype), precision)
        right = g.reshape(*batch_dims, n, b).astype(dtypes[1])
    return dy, None, None, Coordinates(left, right)


_tap.defvjp(_tap_fwd, _tap_bwd)


def probe_tap(
    y: Array,
    x: Array,
    probe: Probe,
    coords: Coordinates,
    subscripts: str,
    *,
    layout: MatrixLayout | None = None,
    precision: Any = None,
) -> Array:
    r"""Returns ``y`` unchanged; its backward pass gives ``coords`` their gradients.

    ``y`` must be the output of the contraction ``subscripts`` of ``x`` with a kernel
    ``W`` (plus anything that does not depend on ``W``, e.g. a bias), computed by the
    caller in any way. The backward pass passes ``dY`` through to ``y`` and returns

    .. math::

        \frac{\partial L}{\partial Z_\ell} = P_\ell^\top G, \qquad
        \frac{\partial L}{\partial Z_r} = G P_r, \qquad G = \frac{\partial L}{\partial W}
        \text{ in the matrix view } (*\mathrm{batch}, n, m),

    in factored form; ``x`` and ``probe`` get no cotangent from it (their true one is
    zero because ``Z = 0``). This is the building block of :func:`probed_matmul`,
    :func:`probed_einsum` and the probed NNX layers.

    The two matmuls of each side run in ``x``'s dtype (``dY`` and the probes are cast to
    it) with float32 accumulation; each gradient is returned in its coordinate's dtype.
    A side of width 0 costs nothing.

    Args:
        y: The contraction's output.
        x: Its input, in the dtype the contraction computed in.
        probe: ``P_ℓ: (*batch, n, a)`` and ``P_r: (*batch, m, b)``.
        coords: Zeros ``Z_ℓ: (*batch, a, m)`` and ``Z_r: (*batch, n, b)``: the arrays to
            differentiate. Their values are never read.
        subscripts: ``'input,kernel->output'`` (e.g. ``'...n,nm->...m'``).
        layout: The kernel's matrix view; ``None`` takes the kernel axes of each role in
            their own order (as :func:`lorajax.nnx.layer_spec` does).
        precision: Passed to the matmuls.

    Returns:
        ``y``.

    Raises:
        ValueError: if the shapes do not fit the contraction.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.probe import Coordinates, Probe
        >>> from lorajax._src.probed import probe_tap
        >>> x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
        >>> probe = Probe(jnp.ones((3, 1)), jnp.zeros((2, 0)))
        >>> coords = Coordinates(jnp.zeros((1, 2)), jnp.zeros((3, 0)))
        >>> loss = lambda c: jnp.sum(probe_tap(x @ w, x, probe, c, "tn,nm->tm"))
        >>> jax.grad(loss)(coords).left  # P_ℓᵀ G with G = xᵀ 1 = 4
        Array([[12., 12.]], dtype=float32)
    """
    contraction = Contraction.parse(subscripts, x.ndim, layout)
    if y.ndim != len(contraction.out):
        raise ValueError(
            f"`y` has {y.ndim} axes, but `subscripts`={subscripts!r} gives an output with "
            f"{len(contraction.out)}. Pass the output of that contraction."
        )
    batch, ins, outs = contraction.dims(x.shape, y.shape)
    check_probe_shapes(probe, coords, batch, math.prod(ins), math.prod(outs))
    if probe.left.shape[-1] == 0 and probe.right.shape[-1] == 0:
        return y
    dtypes = (np.dtype(coords.left.dtype), np.dtype(coords.right.dtype))
    return _tap(y, x, probe, coords, contraction, precision, dtypes)


def probed_matmul(
    x: Float[Array, "*tokens n"],
    w: Float[Array, "n m"],
    probe: Probe,
    coords: Coordinates,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Float[Array, "*tokens m"]:
    r"""``x @ w`` whose backward pass gives the probed gradients ``P_ℓᵀ G`` and ``G P_r``.

    The forward pass is exactly ``x @ w``. Differentiating ``coords`` gives

    .. math::

        \frac{\partial L}{\partial Z_\ell} = (x P_\ell)^\top dY = P_\ell^\top G, \qquad
        \frac{\partial L}{\partial Z_r} = x^\top (dY P_r) = G P_r, \qquad
        G = x^\top dY,

    summed over every leading (token) axis of ``x``, without forming ``G``. ``∂L/∂x`` is
    ``dY wᵀ``. ``w`` is meant not to be differentiated, and then no weight gradient is
    computed; if it is, it gets its true gradient ``G``. ``probe`` gets a zero cotangent
    (exact, since ``Z = 0``).

    Dtypes: ``x`` and ``w`` are promoted to a common compute dtype (e.g. bfloat16); the
    probe matmuls run in it with float32 accumulation, and each coordinate gradient is
    returned in its coordinate's dtype (e.g. float32).

    Args:
        x: Input ``(..., n)``.
        w: Kernel ``(n, m)``; not differentiated in the intended use.
        probe: ``P_ℓ: (n, a)`` and ``P_r: (m, b)``. A width of 0 turns a side off.
        coords: Zeros ``Z_ℓ: (a, m)`` and ``Z_r: (n, b)``; the forward pass ignores
            their values (they are zero by contract).
        precision: Passed to every matmul.
        preferred_element_type: Passed to the forward matmul (as ``jnp.matmul`` takes it).

    Returns:
        ``x @ w``, shape ``(..., m)``.

    Raises:
        ValueError: if ``w`` is not 2-D, if ``x``'s last axis is not ``n``, or if a probe
            or coordinate has the wrong shape.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.probe import Coordinates, Probe
        >>> from lorajax._src.probed import probed_matmul
        >>> kx, kw, kp = jax.random.split(jax.random.key(0), 3)
        >>> x = jax.random.normal(kx, (2, 5, 4))  # (batch, seq, n)
        >>> w = jax.random.normal(kw, (4, 3))
        >>> probe = Probe(left=jax.random.normal(kp, (4, 2)), right=jnp.eye(3)[:, :1])
        >>> coords = Coordinates(left=jnp.zeros((2, 3)), right=jnp.zeros((4, 1)))
        >>> loss = lambda w, c: jnp.sum(jnp.sin(probed_matmul(x, w, probe, c)))
        >>> grads = jax.jit(jax.grad(loss, argnums=1))(w, coords)
        >>> G = jax.grad(loss)(w, coords)  # the full gradient, for comparison only
        >>> bool(jnp.allclose(grads.left, probe.left.T @ G, rtol=1e-5, atol=1e-5))
        True
        >>> bool(jnp.allclose(grads.right, G @ probe.right, rtol=1e-5, atol=1e-5))
        True

    References:
        Zhao et al., "GaLore", 2024, https://arxiv.org/abs/2403.03507.
        Hao et al., "Flora", 2024, https://arxiv.org/abs/2402.03293.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(
            f"`w` must be a kernel (n, m), got shape {w.shape}. For a stacked or N-D kernel "
            "use probed_einsum with its layout, or slice one layer."
        )
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"`x` must have shape (..., n) with n = {w.shape[0]} (w's first axis), got {x.shape}."
        )
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    y = jnp.matmul(x, w, precision=precision, preferred_element_type=preferred_element_type)
    return probe_tap(y, x, probe, coords, "...n,nm->...m", precision=precision)


def probed_einsum(
    subscripts: str,
    x: Array,
    w: Array,
    probe: Probe,
    coords: Coordinates,
    *,
    layout: MatrixLayout | None = None,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    r"""``jnp.einsum(subscripts, x, w)`` with the probed backward of :func:`probed_matmul`.

    The kernel ``w`` is read as a batch of matrices ``(*batch, n, m)``: kernel axes
    shared by ``x`` and the output are batch axes, axes contracted with ``x`` are the
    input side (``n``), axes that reach the output are the output side (``m``), as
    ``nnx.LinearGeneral`` and ``nnx.Einsum`` kernels are read by
    :func:`lorajax.nnx.layer_spec`. With ``G = ∂L/∂w`` in that view, differentiating
    ``coords`` gives ``P_ℓᵀ G`` and ``G P_r``. They are computed by contracting ``x``
    with ``P_ℓ`` reshaped to the kernel's input axes and then with ``dY``, and ``dY``
    with ``P_r`` reshaped to its output axes and then with ``x``. No kernel-sized array
    is formed.

    Args:
        subscripts: ``'input,kernel->output'``, e.g. ``'btd,dhk->bthk'``; the input and
            output may use ``...``.
        x: The input.
        w: The kernel; not differentiated in the intended use.
        probe: ``P_ℓ: (*batch, n, a)`` and ``P_r: (*batch, m, b)`` in the matrix view.
        coords: Zeros ``Z_ℓ: (*batch, a, m)`` and ``Z_r: (*batch, n, b)``.
        layout: The kernel's :class:`~lorajax.MatrixLayout`, e.g.
            ``MatrixSpec(...).resolve(w.shape)``. Its groups must hold the axes of each
            role; their order sets how ``n`` and ``m`` are flattened. ``None`` keeps the
            kernel's axis order.
        precision: Passed to every matmul.
        preferred_element_type: Passed to the forward einsum.

    Returns:
        ``jnp.einsum(subscripts, x, w)``.

    Raises:
        ValueError: on a malformed equation, a ``layout`` that does not fit it, or probes
            or coordinates of the wrong shape.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.probe import Coordinates, Probe
        >>> from lorajax._src.probed import probed_einsum
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 6))  # (batch, seq, d)
        >>> w = jax.random.normal(jax.random.key(1), (6, 3, 4))  # (d, heads, head_dim)
        >>> probe = Probe(left=jnp.ones((6, 2)), right=jnp.ones((12, 3)))  # n = 6, m = 12
        >>> coords = Coordinates(left=jnp.zeros((2, 12)), right=jnp.zeros((6, 3)))
        >>> f = lambda c: jnp.sum(probed_einsum("btd,dhk->bthk", x, w, probe, c) ** 2)
        >>> g = jax.grad(f)(coords)
        >>> g.left.shape, g.right.shape
        ((2, 12), (6, 3))
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _, rhs, _ = _split_subscripts(subscripts)
    if len(rhs) != w.ndim:
        raise ValueError(
            f"`subscripts`={subscripts!r} names {len(rhs)} kernel axes, but `w` has shape "
            f"{w.shape}."
        )
    if layout is not None and tuple(layout.shape) != tuple(w.shape):
        raise ValueError(
            f"`layout` was resolved for shape {layout.shape}, but `w` has shape {w.shape}. "
            "Resolve the spec against this kernel."
        )
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    y = jnp.einsum(
        subscripts, x, w, precision=precision, preferred_element_type=preferred_element_type
    )
    return probe_tap(y, x, probe, coords, subscripts, layout=layout, precision=precision)
