r"""LoRA-Pro: adapter gradients whose equivalent full-weight step is optimal.

An SGD step on the factors of ``W = W0 + s·a·b`` moves ``W`` by, to first order,
``-η·g̃`` with the *equivalent gradient* ``g̃ = s (grad_a b + a grad_b)``. Plain LoRA uses
``grad_a = g_a = s G bᵀ`` and ``grad_b = g_b = s aᵀ G``, so ``g̃ = s² (G bᵀ b + a aᵀ G)``,
which is not the best rank-``r`` tangent step. LoRA-Pro picks the factor gradients whose
``g̃`` is the orthogonal projection of ``G`` onto the tangent space of the factors,

.. math:: \tilde g = P_a G + G P_b - P_a G P_b, \qquad
   P_a = a (a^\top a)^+ a^\top, \quad P_b = b^\top (b b^\top)^+ b .

See :func:`lora_pro` for the closed form in our layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from lorajax._src import checks, shard
from lorajax._src.adapters.tree import LoRA, flatten_up_to, is_lora
from lorajax._src.bases import per_matrix
from lorajax._src.targets import path_str

__all__ = ["MODES", "X_MODES", "FullMoment", "LoraProState", "lora_pro"]

MODES = ("sgd", "adam")
X_MODES = ("sylvester", "symmetry", "zero")
_HI = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


class FullMoment(NamedTuple):
    """Adam moment of one adapter in ``mode="adam"``.

    Attributes:
        w: Moment of the equivalent gradient, full kernel size ``(*batch, n, m)``.
        magnitude: Moment of DoRA's magnitude gradient ``(*batch, m)``, or ``None``.
    """

    w: jax.Array
    magnitude: jax.Array | None


class LoraProState(NamedTuple):
    """State of :func:`lora_pro`.

    Attributes:
        count: Number of updates taken (int32).
        mu: ``mode="adam"``: first moments, a tree like the params with a
            :class:`FullMoment` at each adapter; ``None`` with ``mode="sgd"``.
        nu: Second moments, laid out like ``mu``.
    """

    count: jax.Array
    mu: Any
    nu: Any


def _mm(subscripts: str, *xs: jax.Array) -> jax.Array:
    return shard.einsum(subscripts, *xs, precision=_HI)


class _Eig(NamedTuple):
    """A symmetric PSD ``r × r`` matrix ``K = V diag(w) Vᵀ`` with its pseudo-inverse."""

    k: jax.Array
    w: jax.Array  # eigenvalues, those below the cutoff set to 0
    inv: jax.Array  # 1/w where kept, else 0
    v: jax.Array

    def pinv(self) -> jax.Array:
        return _mm("...rk,...sk->...rs", self.v * self.inv[..., None, :], self.v)


def _eig_psd(k: jax.Array, eps: jax.Array) -> _Eig:
    """Eigendecomposition with a relative cutoff: ``w <= eps·max(w)`` counts as zero."""
    w, v = per_matrix(jnp.linalg.eigh, k)
    keep = w > eps * jnp.max(w, axis=-1, keepdims=True)
    w = jnp.where(keep, w, 0.0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
    return _Eig(k, w, inv, v)


def _sylvester_eig(left: _Eig, right: _Eig, c: jax.Array) -> jax.Array:
    """Minimum-norm ``X`` with ``K1 X + X K2 = C`` from the two eigendecompositions."""
    f = _mm("...rk,...rs,...sl->...kl", left.v, c, right.v)
    d = left.w[..., :, None] + right.w[..., None, :]
    z = jnp.where(d > 0, f / jnp.where(d > 0, d, 1.0), 0.0)
    return _mm("...rk,...kl,...sl->...rs", left.v, z, right.v)


def _sylvester(
    k1: Float[Array, "*batch r r"],
    k2: Float[Array, "*batch r r"],
    c: Float[Array, "*batch r r"],
    eps: float = 1e-6,
) -> Float[Array, "*batch r r"]:
    """Solves ``K1 X + X K2 = C`` for symmetric PSD ``K1``, ``K2`` (minimum norm)."""
    eps = jnp.asarray(eps, _F32)
    return _sylvester_eig(_eig_psd(k1, eps), _eig_psd(k2, eps), c)


class _Geometry(NamedTuple):
    """What the closed form needs of one adapter's factors (float32)."""

    a: jax.Array
    b: jax.Array
    scale: float
    frozen: bool
    ka: _Eig  # aᵀ a
    kb: _Eig | None  # b bᵀ (None when a is frozen)


def _geometry(lora: LoRA, frozen: bool, eps: jax.Array) -> _Geometry:
    a, b = lora.a.astype(_F32), lora.b.astype(_F32)
    ka = _eig_psd(_mm("...nr,...ns->...rs", a, a), eps)
    kb = None if frozen else _eig_psd(_mm("...rm,...sm->...rs", b, b), eps)
    return _Geometry(a, b, float(lora.scale), frozen, ka, kb)


def _adjust(geo: _Geometry, g_a: jax.Array, g_b: jax.Array, x_mode: str) -> tuple[Any, Any]:
    """LoRA-Pro's ``(grad_a, grad_b)`` from the plain adapter gradients (float32)."""
    inv_s2 = 1.0 / geo.scale**2
    ka_p = geo.ka.pinv()
    if geo.frozen:  # LoRA-FA: only b moves; its best step is (1/s²) (aᵀa)⁺ g_b.
        return jnp.zeros_like(g_a), inv_s2 * _mm("...rs,...sm->...rm", ka_p, g_b)
    kb_p = geo.kb.pinv()
    grad_a = inv_s2 * _mm("...nr,...rs->...ns", g_a, kb_p)
    gb_bt = _mm("...rm,...sm->...rs", g_b, geo.b)
    rest = g_b - _mm("...rs,...st,...tm->...rm", gb_bt, kb_p, geo.b)  # g_b (I - P_b)
    grad_b = inv_s2 * _mm("...rs,...sm->...rm", ka_p, rest)
    if x_mode == "zero":
        return grad_a, grad_b
    if x_mode == "sylvester":
        c = -inv_s2 * _mm("...rs,...ns,...nt->...rt", kb_p, g_a, geo.a)
        x = _sylvester_eig(geo.kb, geo.ka, c)
    else:  # symmetry
        x = (-0.5 * inv_s2) * _mm("...rs,...ts,...tu->...ru", kb_p, gb_bt, geo.ka.k)
    grad_a = grad_a + _mm("...nr,...sr->...ns", geo.a, x)
    grad_b = grad_b - _mm("...sr,...sm->...rm", x, geo.b)
    return grad_a, grad_b


def _equivalent(geo: _Geometry, g_a: jax.Array, g_b: jax.Array) -> jax.Array:
    """``g̃ = s (grad_a b + a grad_b)`` (``X`` cancels), full size ``(*batch, n, m)``."""
    ka_p = geo.ka.pinv()
    if geo.frozen:
        coef = _mm("...rs,...sm->...rm", ka_p, g_b)
        return (1.0 / geo.scale) * _mm("...nr,...rm->...nm", geo.a, coef)
    kb_p = geo.kb.pinv()
    gb_bt = _mm("...rm,...sm->...rs", g_b, geo.b)
    rest = g_b - _mm("...rs,...st,...tm->...rm", gb_bt, kb_p, geo.b)
    left = jnp.concatenate([_mm("...nr,...rs->...ns", g_a, kb_p), geo.a], axis=-1)
    right = jnp.concatenate([geo.b, _mm("...rs,...sm->...rm", ka_p, rest)], axis=-2)
    return (1.0 / geo.scale) * _mm("...nk,...km->...nm", left, right)


def _kind(x: Any) -> str:
    return "a LoRA" if isinstance(x, LoRA) else f"a {type(x).__name__}"


def _moment_spec(lora: Any) -> tuple | None:
    """Layout of a ``(*batch, n, m)`` moment: ``a``'s batch and ``n`` axes, ``b``'s ``m``."""
    sa, sb = shard.explicit_spec(lora.a), shard.explicit_spec(lora.b)
    if sa is None and sb is None:
        return None
    nd = len(lora.a.shape)
    sa = sa or (None,) * nd
    sb = sb or (None,) * nd
    spec = [*sa[:-1], sb[-1]]
    if spec[-1] is not None and spec[-1] in spec[:-1]:
        spec[-1] = None  # one mesh axis cannot shard two axes
    return tuple(spec)


def lora_pro(
    *,
    mode: str = "sgd",
    x_mode: str = "sylvester",
    eps: float = 1e-6,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pro: adjusts adapter gradients so that each step is the best rank-r step.

    For every :class:`~lorajax.adapters.LoRA` ``W = W0 + s·a·b`` (``a: (*batch, n, r)``,
    ``b: (*batch, r, m)``) with plain gradients ``g_a = s G bᵀ`` and ``g_b = s aᵀ G``,
    the adjusted gradients are

    .. math::

       \mathrm{grad}_a = \tfrac{1}{s^2}\, g_a (b b^\top)^+ + a X^\top, \qquad
       \mathrm{grad}_b = \tfrac{1}{s^2}\, (a^\top a)^+ g_b
           \big(I - b^\top (b b^\top)^+ b\big) - X^\top b .

    Whatever ``X: (r, r)`` is, an SGD step on them moves ``W`` (to first order) along
    ``g̃ = s(grad_a b + a grad_b) = P_a G + G P_b − P_a G P_b``: the orthogonal projection
    of the full gradient onto the tangent space of the factors, the closest step to full
    fine-tuning that the adapter can take (LoRA-Pro's optimal equivalent gradient).
    ``X`` only moves the split between ``a`` and ``b``:

    - ``x_mode="sylvester"`` solves ``(b bᵀ) X + X (aᵀ a) = −(1/s²) (b bᵀ)⁺ g_aᵀ a``, the
      ``X`` that keeps ``‖grad_a − g_a‖² + ‖grad_b − g_b‖²`` smallest;
    - ``"symmetry"``: ``X = −(1/(2s²)) (b bᵀ)⁺ b g_bᵀ (aᵀ a)``, the released code's
      option of that name;
    - ``"zero"``: ``X = 0``.

    Pseudo-inverses come from eigendecompositions of the ``r × r`` Gram matrices, with
    eigenvalues below ``eps·λ_max`` treated as zero. The cutoff is relative, so the
    result does not depend on the factors' scale; the released code instead adds an
    absolute ``1e-8·I`` before inverting. The same formula covers the first step of a
    zero-initialised ``b``: then ``grad_a = g_a = 0`` and
    ``grad_b = (1/s²) (aᵀa)⁻¹ g_b``. For a frozen ``a`` (``LoRA.frozen_a``, LoRA-FA),
    ``grad_a = 0`` and ``grad_b = (1/s²)(aᵀa)⁺ g_b``: LoRA-FA's projected gradient, whose
    step is ``P_a G``, the best one with ``a`` fixed.

    ``mode="sgd"`` adjusts the raw gradients; put any optimizer after it (as in the
    paper's efficient mode, Adam's moments then live on the adjusted factor gradients).
    DoRA magnitudes and other leaves pass through unchanged.

    ``mode="adam"`` is the paper's released "full" mode: it keeps float32 Adam moments
    of ``g̃`` itself, one ``(*batch, n, m)`` pair per adapter, **as much optimizer memory
    as full fine-tuning**, forms ``ĝ = m̂ / (√v̂ + adam_eps)`` with bias correction,
    projects it back to ``g_a' = s ĝ bᵀ`` and ``g_b' = s aᵀ ĝ`` and outputs their
    adjusted gradients (with ``X``). Follow it by the learning rate only
    (``optax.scale_by_learning_rate``, plus ``optax.add_decayed_weights`` before it for
    weight decay). Other leaves (DoRA magnitudes included) get plain Adam directions.
    The released code keeps these moments in bfloat16; here they are float32, and under
    explicit sharding they are laid out like the adapted kernel (``a``'s ``d_in`` axis).

    ``update`` needs the adapters as ``params``. Everything is computed in float32 and
    returned in the gradients' dtype; stacked factors ``(L, n, r)`` are handled per layer.

    Args:
        mode: ``"sgd"`` (adjust the gradients) or ``"adam"`` (the full mode above).
        x_mode: ``"sylvester"``, ``"symmetry"`` or ``"zero"``: the choice of ``X``.
        eps: Relative eigenvalue cutoff of the pseudo-inverses (``> 0``).
        b1: ``mode="adam"``: decay of the first moment.
        b2: ``mode="adam"``: decay of the second moment.
        adam_eps: ``mode="adam"``: added to ``√v̂``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
        params)`` takes the adapter tree as ``params``.

    Raises:
        ValueError: for an unknown ``mode``/``x_mode``, ``eps <= 0``, ``adam_eps <= 0``,
            ``b1``/``b2`` outside ``[0, 1)``, or (at ``update``) when ``params`` is
            missing or does not fit the updates.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> k1, k2 = jax.random.split(jax.random.key(0))
        >>> lora = lorajax.adapters.LoRA(
        ...     a=jax.random.normal(k1, (6, 2)), b=jnp.zeros((2, 4)), scale=2.0, rank=2)
        >>> adapters = {"dense": lora, "bias": jnp.zeros(4)}
        >>> tx = optax.chain(
        ...     lorajax.lora_pro(), optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3))
        >>> state = tx.init(adapters)
        >>> grads = jax.tree.map(jnp.ones_like, adapters)
        >>> updates, state = tx.update(grads, state, adapters)
        >>> adapters = optax.apply_updates(adapters, updates)
        >>> adapters["dense"].b.shape
        (2, 4)

    References:
        - Wang et al., `LoRA-Pro: Are Low-Rank Adapters Properly Optimized?
          <https://arxiv.org/abs/2407.18242>`_, 2024.
        - Zhang et al., `LoRA-FA <https://arxiv.org/abs/2308.03303>`_, 2023.
    """
    checks.check_choice(mode, "mode", MODES)
    checks.check_choice(x_mode, "x_mode", X_MODES)
    checks.check_positive(eps, "eps")
    checks.check_positive(adam_eps, "adam_eps")
    for name, beta in (("b1", b1), ("b2", b2)):
        if not checks.is_traced(beta) and not 0.0 <= float(beta) < 1.0:
            raise ValueError(
                f"`{name}` must be in [0, 1), got {beta!r}. (Under optax.inject_hyperparams "
                "with bfloat16 params, pass hyperparam_dtype=jnp.float32: 0.999 rounds to 1 "
                "in bfloat16.)"
            )

    def split(params: Any) -> tuple[list[Any], Any]:
        return jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)

    def moment_zeros(p: Any) -> Any:
        if isinstance(p, LoRA):
            *batch, n, _ = p.a.shape
            w = shard.zeros((*batch, n, p.b.shape[-1]), _F32, _moment_spec(p))
            mag = None
            if p.magnitude is not None:
                mag = shard.zeros(p.magnitude.shape, _F32, shard.explicit_spec(p.magnitude))
            return FullMoment(w, mag)
        return shard.zeros(p.shape, _F32, shard.explicit_spec(p))

    def init_fn(params: optax.Params) -> LoraProState:
        count = jnp.zeros([], jnp.int32)
        if mode == "sgd":
            return LoraProState(count, None, None)
        flat, treedef = split(params)
        zeros = treedef.unflatten([moment_zeros(p) for _, p in flat])
        return LoraProState(count, zeros, jax.tree.map(jnp.copy, zeros))

    def pair_up(updates: Any, params: Any) -> tuple[list[Any], list[Any], Any]:
        if params is None:
            raise ValueError(
                "lora_pro needs the adapters as params: call tx.update(grads, state, adapters)."
            )
        flat, treedef = split(params)
        grads = flatten_up_to(
            treedef,
            updates,
            "lora_pro: the updates do not have the structure of the params",
            "Pass the adapter tree the gradients were taken with as params.",
        )
        for (path, p), g in zip(flat, grads):
            if isinstance(p, LoRA) != isinstance(g, LoRA):
                raise ValueError(
                    f"lora_pro: at {path_str(path)!r} the params hold {_kind(p)} but the "
                    f"updates hold {_kind(g)}. Pass the adapter tree the gradients were "
                    "taken with as params."
                )
        return [p for _, p in flat], grads, treedef

    def adjusted(g: LoRA, geo: _Geometry, g_a: Any, g_b: Any) -> LoRA:
        grad_a, grad_b = _adjust(geo, g_a, g_b, x_mode)
        return g.replace(a=grad_a.astype(g.a.dtype), b=grad_b.astype(g.b.dtype))

    def update_fn(
        updates: optax.Updates,
        state: LoraProState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LoraProState]:
        del extra_args
        ps, gs, treedef = pair_up(updates, params)
        count = optax.safe_int32_increment(state.count)
        cut = jnp.asarray(eps).astype(_F32)

        def geometry(p: LoRA, g: LoRA) -> _Geometry:
            return _geometry(p, bool(p.frozen_a or g.frozen_a), cut)

        if mode == "sgd":
            out = []
            for p, g in zip(ps, gs):
                if not isinstance(p, LoRA):
                    out.append(g)
                    continue
                geo = geometry(p, g)
                out.append(adjusted(g, geo, g.a.astype(_F32), g.b.astype(_F32)))
            return treedef.unflatten(out), LoraProState(count, None, None)

        beta1 = jnp.asarray(b1).astype(_F32)
        beta2 = jnp.asarray(b2).astype(_F32)
        tiny = jnp.asarray(adam_eps).astype(_F32)
        t = count.astype(_F32)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t

        def adam(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[Any, Any, Any]:
            g = shard.like(g.astype(_F32), m)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            return (m / bc1) / (jnp.sqrt(v / bc2) + tiny), m, v

        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        out, new_mu, new_nu = [], [], []
        for p, g, mu, nu in zip(ps, gs, mus, nus):
            if not isinstance(p, LoRA):
                direction, m, v = adam(g, mu, nu)
                out.append(direction.astype(g.dtype))
                new_mu.append(m)
                new_nu.append(v)
                continue
            geo = geometry(p, g)
            equiv = _equivalent(geo, g.a.astype(_F32), g.b.astype(_F32))
            g_hat, m, v = adam(equiv, mu.w, nu.w)
            g_a = geo.scale * _mm("...nm,...rm->...nr", g_hat, geo.b)
            g_b = geo.scale * _mm("...nr,...nm->...rm", geo.a, g_hat)
            new = adjusted(g, geo, g_a, g_b)
            m_mag = v_mag = None
            if g.magnitude is not None:
                d_mag, m_mag, v_mag = adam(g.magnitude, mu.magnitude, nu.magnitude)
                new = new.replace(magnitude=d_mag.astype(g.magnitude.dtype))
            out.append(new)
            new_mu.append(FullMoment(m, m_mag))
            new_nu.append(FullMoment(v, v_mag))
        new_state = LoraProState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
