r"""Creating adapters: every known LoRA initialisation, over a whole parameter tree.

Each init sets the factors of ``W = W0 + s·a·b`` (``a: (d_in, r)``, ``b: (r, d_out)``,
batched for stacked layers) for every targeted kernel:

========== ================================================================ ===============
init        ``a`` and ``b``                                                   base ``W0``
========== ================================================================ ===============
default     ``a ~ U(−1/√d_in, 1/√d_in)`` (PEFT's Kaiming-uniform), ``b = 0``  unchanged
gaussian    ``a ~ N(0, 1/r²)``, ``b = 0``                                       unchanged
pissa       ``W0 = U S Vᵀ``: ``a = U_r √(S_r/s)``, ``b = √(S_r/s) V_rᵀ``        ``W0 − s·a·b``
olora       ``W0ᵀ = Q R``: ``a = R_rᵀ``, ``b = Q_rᵀ``                           ``W0 − s·a·b``
lora_ga     ``G = U S Vᵀ``: ``a = c U[:, :r]``, ``b = c V[:, r:2r]ᵀ``            ``W0 − s·a·b``
lora_fa     as default, ``a`` frozen                                          unchanged
lori        as default, ``a`` frozen, ``b`` later trained under a sparse mask    unchanged
========== ================================================================ ===============

with ``s = α/r`` (or ``α/√r`` with rsLoRA) and, for LoRA-GA, ``c = d_out^{1/4}/√γ``,
``γ = 16``. ``"pissa_niter_<k>"`` computes PiSSA's SVD by a randomized range finder with
``k`` power iterations instead of an exact SVD.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src.adapters.tree import LoRA, flatten_up_to
from lorajax._src.bases import per_matrix
from lorajax._src.checks import static_int
from lorajax._src.matrices import MatrixLayout
from lorajax._src.randomized_svd import randomized_svd
from lorajax._src.targets import Targets, select_targets

__all__ = ["INITS", "LORA_GA_GAMMA", "init"]

#: The initialisations :func:`init` accepts (plus ``"pissa_niter_<k>"``).
INITS = ("default", "gaussian", "pissa", "olora", "lora_ga", "lora_fa", "lori")
#: LoRA-GA's ``γ``: both factors are scaled by ``d_out^{1/4} / √γ``.
LORA_GA_GAMMA = 16.0

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
_CHANGES_BASE = ("pissa", "olora", "lora_ga")
_KERNEL_SUFFIXES = ("kernel", "weight", "w", "value", "raw_value", "embedding")

Factors = tuple[Float[Array, "*batch n r"], Float[Array, "*batch r m"]]


def _init_name(init: Any) -> tuple[str, int | None]:
    """Validates ``init``; returns the family and, for ``pissa_niter_<k>``, ``k``."""
    if isinstance(init, str):
        match = _PISSA_NITER.fullmatch(init)
        if match:
            return "pissa", int(match.group(1))
        if init in INITS:
            return init, None
    raise ValueError(
        f"`init` must be one of {', '.join(repr(i) for i in INITS)} or 'pissa_niter_<k>'; "
        f"got {init!r}."
    )


def _check_alpha(alpha: Any, name: str) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a positive number, got {alpha!r}.") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be a positive number, got {alpha!r}. The scale is alpha/r "
            "(alpha/sqrt(r) with use_rslora); pass alpha=None for alpha = rank."
        )
    return value


def _check_pattern(pattern: Any, name: str) -> dict[str, Any]:
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(
            f"`{name}` must map regular expressions to values, e.g. {{'q_proj': 16}}; got "
            f"{pattern!r}."
        )
    for key in pattern:
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"`{name}` key {key!r} is not a valid regular expression: {e}."
            ) from None
    return dict(pattern)


def _module_path(path: str) -> str:
    parts = path.split("/")
    while len(parts) > 1 and parts[-1] in _KERNEL_SUFFIXES:
        parts = parts[:-1]
    return "/".join(parts)


def _pattern_value(pattern: dict[str, Any], path: str) -> tuple[str, Any] | None:
    """The first ``(key, value)`` whose regex matches the end of the module path.

    As PEFT's ``rank_pattern``: a key matches when it equals the module path or one of
    its trailing segments, e.g. ``"q_proj"`` or ``"layers/0/.*_proj"`` match
    ``"layers/0/attn/q_proj"``. Keys may use ``.`` or ``/`` between modules.
    """
    module = _module_path(path)
    for key, value in pattern.items():
        for candidate in (module, module.replace("/", ".")):
            if re.fullmatch(rf"(?:.*[/.])?(?:{key})", candidate):
                return key, value
    return None


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, int) and not isinstance(key, bool):
        return jax.random.key(key)
    if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape == (2,) and key.dtype == jnp.uint32:
            return jax.random.wrap_key_data(key)
        raise TypeError(
            f"`key` must be a PRNG key (jax.random.key(0)), raw uint32[2] key data or an int; "
            f"got an array of shape {key.shape} and dtype {key.dtype}."
        )
    if not isinstance(key, jax.Array):
        raise TypeError(f"`key` must be a PRNG key or an int, got {key!r}.")
    return key


def _kaiming_uniform(key: jax.Array, layout: MatrixLayout, rank: int) -> jax.Array:
    bound = 1.0 / math.sqrt(layout.n)
    shape = (*layout.batch_shape, layout.n, rank)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _zeros_b(layout: MatrixLayout, rank: int) -> jax.Array:
    return jnp.zeros((*layout.batch_shape, rank, layout.m), jnp.float32)


def _pissa(key: jax.Array, w: jax.Array, rank: int, scale: float, niter: int | None) -> Factors:
    """Principal singular components, split evenly between the two factors."""
    if niter is None:
        u, s, vt = per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False), w)
        u, s, v = u[..., :rank], s[..., :rank], jnp.swapaxes(vt[..., :rank, :], -1, -2)
    else:
        u, s, v = randomized_svd(w, rank, key=key, power_iters=niter)
    root = jnp.sqrt(s / scale)
    return u * root[..., None, :], root[..., :, None] * jnp.swapaxes(v, -1, -2)


def _olora(w: jax.Array, rank: int) -> Factors:
    """QR of the output-major weight ``Wᵀ = Q R`` (PEFT's OLoRA, in our layout)."""
    q, r = per_matrix(jnp.linalg.qr, jnp.swapaxes(w, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


def _lora_ga(g: jax.Array, rank: int, d_out: int) -> Factors:
    """Singular vectors 1..r (d_in side) and r+1..2r (d_out side) of the gradient."""
    u, _, vt = per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False), g)
    c = d_out**0.25 / math.sqrt(LORA_GA_GAMMA)
    return c * u[..., :, :rank], c * vt[..., rank : 2 * rank, :]


def init(
    key: jax.Array | int,
    params: Any,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Targets = "all-linear",
    init: str = "default",
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    grads: Any = None,
    sparsity: float | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Any, Any]:
    r"""Creates LoRA adapters for the targeted kernels of ``params``.

    For every targeted kernel ``W0`` (read as a batch of ``(d_in, d_out)`` matrices, see
    :class:`~lorajax.MatrixSpec`) it sets factors ``a: (*batch, d_in, r)`` and
    ``b: (*batch, r, d_out)`` so that the adapted weight is

    .. math:: W = W_0 + s\,a\,b, \qquad s = \alpha / r \;\text{or}\; \alpha/\sqrt{r}
        \text{ (rsLoRA)}.

    The inits (see the module docstring for the formulas):

    - ``"default"``: PEFT's, ``a ~ U(−1/√d_in, 1/√d_in)``, ``b = 0``;
    - ``"gaussian"``: ``a ~ N(0, 1/r²)``, ``b = 0``;
    - ``"pissa"`` (and ``"pissa_niter_<k>"``): the principal singular components of
      ``W0`` go into the adapter, the residual stays in the base;
    - ``"olora"``: orthonormal factors from the QR decomposition of ``W0``;
    - ``"lora_ga"``: singular vectors of the averaged gradient ``grads`` so that the
      first step moves ``W`` along the best rank-``2r`` approximation of ``-G``;
    - ``"lora_fa"``: default init with ``a`` frozen;
    - ``"lori"``: default init with ``a`` frozen; after a short dense run,
      :func:`lorajax.adapters.lori_mask` picks the entries of ``b`` to train.

    PiSSA, OLoRA and LoRA-GA move part of ``W0`` into the adapter and return the
    residual base ``W0 − s·a·b``, so that ``merge(base, adapters)`` equals ``W0``. Every
    other init returns ``params`` itself (the same object).

    Args:
        key: A PRNG key (or an int seed) for the random factors.
        params: The parameter tree (arrays; under ``jax.jit`` tracers are fine).
        rank: The rank ``r`` of every adapter (see ``rank_pattern``).
        alpha: The ``α`` of the scale; ``None`` means ``α = r`` (``s = 1``).
        targets: Which kernels get adapters, as for :func:`lorajax.low_rank`: a preset
            (``"all-linear"``, ``"attention"``, ``"mlp"``), a regex searched in the
            ``"/"``-joined path, a callable, a pytree of specs, or ``None`` (every leaf
            with at least 2 axes).
        init: One of :data:`INITS` or ``"pissa_niter_<k>"``.
        use_rslora: Use ``s = α/√r`` (rank-stabilised LoRA) instead of ``α/r``.
        rank_pattern: Per-target ranks: ``{regex: rank}``. A regex applies to the kernels
            whose module path ends with a match (as PEFT's ``rank_pattern``); the first
            matching key wins.
        alpha_pattern: Per-target ``α`` values, matched the same way.
        grads: For ``"lora_ga"`` only: the gradient tree (same structure as ``params``),
            averaged over a few batches.
        sparsity: For ``"lori"`` only: the fraction of ``b``'s entries the mask will
            drop (default 0.9), recorded as the default of ``lori_mask``.
        dtype: The factors' dtype. Float32 by default, also for bf16 params.

    Returns:
        ``(adapters, base_params)``: ``adapters`` has the structure of ``params`` with a
        :class:`~lorajax.adapters.LoRA` at every targeted kernel and ``None`` elsewhere.

    Raises:
        ValueError: for an unknown ``init``, a rank larger than a targeted matrix
            (``2r`` for LoRA-GA), ``alpha <= 0``, ``"lora_ga"`` without ``grads``,
            ``grads`` that do not match ``params``, or ``targets`` that select nothing.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 16))}},
        ...           "mlp": {"up_proj": {"kernel": jnp.ones((16, 64))}}}
        >>> adapters, base = lorajax.adapters.init(
        ...     jax.random.key(0), params, rank=4, alpha=8, rank_pattern={"up_proj": 8})
        >>> a = adapters["mlp"]["up_proj"]["kernel"]
        >>> a.a.shape, a.b.shape, a.scale, base is params
        ((16, 8), (8, 64), 1.0, True)
        >>> pissa, residual = lorajax.adapters.init(
        ...     jax.random.key(0), params, rank=1, init="pissa")
        >>> merged = lorajax.adapters.merge(residual, pissa)
        >>> bool(jnp.allclose(merged["mlp"]["up_proj"]["kernel"], 1.0, atol=1e-5))
        True

    References:
        Hu et al., 2021, LoRA, https://arxiv.org/abs/2106.09685;
        Kalajdzievski, 2023, rsLoRA, https://arxiv.org/abs/2312.03732;
        Meng et al., 2024, PiSSA, https://arxiv.org/abs/2404.02948;
        Büyükakyüz, 2024, OLoRA, https://arxiv.org/abs/2406.01775;
        Wang et al., 2024, LoRA-GA, https://arxiv.org/abs/2407.05000;
        Zhang et al., 2023, LoRA-FA, https://arxiv.org/abs/2308.03303;
        Zhang et al., 2025, LoRI, https://arxiv.org/abs/2504.07448.
    """
    family, niter = _init_name(init)
    default_rank = static_int(rank, "rank")
    if default_rank is None:
        raise TypeError("`rank` must be a Python int (it sizes the factors), got a tracer.")
    default_alpha = None if alpha is None else _check_alpha(alpha, "alpha")
    ranks = _check_pattern(rank_pattern, "rank_pattern")
    alphas = _check_pattern(alpha_pattern, "alpha_pattern")
    for k, v in ranks.items():
        static_int(v, f"rank_pattern[{k!r}]")
    for k, v in alphas.items():
        _check_alpha(v, f"alpha_pattern[{k!r}]")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"`use_rslora` must be a bool, got {use_rslora!r}.")
    if sparsity is not None:
        if family != "lori":
            raise ValueError(
                f"`sparsity` applies to init='lori' only, got init={init!r} with "
                f"sparsity={sparsity!r}. Drop `sparsity` or use init='lori'."
            )
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
    if family == "lori" and sparsity is None:
        sparsity = 0.9
    if family == "lora_ga" and grads is None:
        raise ValueError(
            "init='lora_ga' needs `grads`: the gradient of the loss with respect to `params`, "
            "averaged over a few batches (e.g. jax.grad(loss)(params, batch))."
        )
    if family != "lora_ga" and grads is not None:
        raise ValueError(f"`grads` is used by init='lora_ga' only, got init={init!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype (e.g. jnp.float32), got {dtype!r}.")

    specs, paths = select_targets(params, targets)
    leaves, treedef = jax.tree.flatten(params)
    grad_leaves: list[Any] = [None] * len(leaves)
    if grads is not None:
        grad_leaves = flatten_up_to(
            treedef,
            grads,
            "`grads` must have the structure of `params`",
            "Pass the gradient of the loss with respect to these params.",
        )

    # Resolve everything (and raise on any bad target) before touching an array.
    plan: list[tuple[int, MatrixLayout, int, float]] = []
    for i, (spec, path, leaf) in enumerate(zip(specs, paths, leaves)):
        if spec is None:
            continue
        layout = spec.resolve(leaf.shape, path)
        hit = _pattern_value(ranks, path)
        r = default_rank if hit is None else int(hit[1])
        hit_alpha = _pattern_value(alphas, path)
        a_val = default_alpha if hit_alpha is None else float(hit_alpha[1])
        a_val = float(r) if a_val is None else a_val
        needed = 2 * r if family == "lora_ga" else r
        if needed > min(layout.n, layout.m):
            what = "2·rank" if family == "lora_ga" else "rank"
            raise ValueError(
                f"{what}={needed} is larger than the matrix at {path!r} "
                f"(d_in={layout.n}, d_out={layout.m}). Use rank <= "
                f"{min(layout.n, layout.m) // (2 if family == 'lora_ga' else 1)} for it "
                "(rank_pattern sets per-target ranks) or leave it out of `targets`."
            )
        if grads is not None and tuple(grad_leaves[i].shape) != tuple(leaf.shape):
            raise ValueError(
                f"`grads` at {path!r} has shape {tuple(grad_leaves[i].shape)}, but the "
                f"param has shape {tuple(leaf.shape)}."
            )
        plan.append((i, layout, r, a_val))

    keys = jax.random.split(_as_key(key), max(len(plan), 1))
    adapters: list[LoRA | None] = [None] * len(leaves)
    new_leaves = list(leaves)
    for k, (i, layout, r, a_val) in zip(keys, plan):
        scale = a_val / (math.sqrt(r) if use_rslora else r)
        if family in ("default", "lora_fa", "lori"):
            a, b = _kaiming_uniform(k, layout, r), _zeros_b(layout, r)
        elif family == "gaussian":
            shape = (*layout.batch_shape, layout.n, r)
            a, b = jax.random.normal(k, shape, jnp.float32) / r, _zeros_b(layout, r)
        else:
            w = layout.to_matrix(leaves[i]).astype(jnp.float32)
            if family == "pissa":
                a, b = _pissa(k, w, r, scale, niter)
            elif family == "olora":
                a, b = _olora(w, r)
            else:
                g = layout.to_matrix(grad_leaves[i]).astype(jnp.float32)
                a, b = _lora_ga(g, r, layout.m)
            residual = w - scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
            new_leaves[i] = layout.from_matrix(residual).astype(leaves[i].dtype)
        adapters[i] = LoRA(
            a=a.astype(dtype),
            b=b.astype(dtype),
            scale=scale,
            alpha=a_val,
            rank=r,
            frozen_a=family in ("lora_fa", "lori"),
            layout=layout,
            sparsity=sparsity if family == "lori" else None,
        )
    adapter_tree = treedef.unflatten(adapters)
    if family not in _CHANGES_BASE:
        return adapter_tree, params
    return adapter_tree, treedef.unflatten(new_leaves)
