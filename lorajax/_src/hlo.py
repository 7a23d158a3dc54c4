"""The collectives of a compiled XLA program, read from its HLO text.

A sharded program's communication is visible in its compiled HLO
(``jax.jit(f).lower(...).compile().as_text()``): after SPMD partitioning every transfer
between devices is one of a handful of collective instructions. :func:`collectives` lists
them with their result shapes, so a test can bound how much an update moves without
timing anything, and :func:`collective_bytes` / :func:`collective_elements` total them
by kind.

What is counted, and how:

- The kinds are :data:`COLLECTIVE_KINDS`: ``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all`` and ``collective-permute``, in their synchronous form
  and their asynchronous ``-start`` form (``all-reduce-start``, ``all-gather-start``,
  ``collective-permute-start``). The matching ``-done`` is not counted again. A collective
  wrapped in a generic ``async-start`` is counted once, where its wrapped computation
  holds it.
- The size of a collective is the size of its **result**, as one device holds it: HLO
  after SPMD partitioning is the program each device runs, so shapes are per-device
  shards. For an all-gather that is the gathered array, for an all-reduce the reduced
  array (its operand's size), for a reduce-scatter the device's scattered piece (a
  ring moves about its *operand's* size, so it is understated there), for an all-to-all
  and a collective-permute the received array. A tuple result (several arrays reduced
  by one combined instruction) counts every element of the tuple. For an async
  ``-start``, whose result tuple also carries its operands (and, for a permute, context
  scalars), only the output part counts.
- Every instruction in the text counts, including both branches of a ``conditional``
  (the text cannot tell which one runs). An instruction inside a ``while`` body counts
  once per iteration when the loop states its trip count (``known_trip_count`` in its
  ``backend_config``, as XLA writes for scans and ``fori_loop``); :attr:`Collective.repeats`
  holds that multiplier, 1 outside loops and for loops of unknown trip count.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any

__all__ = [
    "COLLECTIVE_KINDS",
    "Collective",
    "collective_bytes",
    "collective_elements",
    "collectives",
]

#: The collective kinds :func:`collectives` reports, by their HLO opcode.
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

# Async starts whose result tuple is (operands, outputs, ...): the output is element 1.
_START_OUTPUT_IS_ELEMENT_1 = ("all-gather", "collective-permute")

# Bits per element of the HLO primitive types.
_BITS = {
    "pred": 8,
    "s2": 2,
    "u2": 2,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "c64": 64,
    "c128": 128,
    "token": 0,
}
_NARROW_FLOAT = re.compile(r"^f(\d)e\d+m\d+")  # f8e4m3fn, f8e5m2, f4e2m1fn, f6e3m2fn, ...

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=%(){},]+)\s*=\s*")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][a-z0-9\-]*)\(")
_ANY_OPCODE = re.compile(r"[\s)}\]](?P<op>[a-z][a-z0-9\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_CALL_KEYS = (
    "calls",
    "to_apply",
    "body",
    "condition",
    "branch_computations",
    "true_computation",
    "false_computation",
)
_CALL = re.compile(r"\b(?P<key>" + "|".join(_CALL_KEYS) + r")=(?P<value>\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_SKIPPED_CALLERS = re.compile(r"-(done|update)$")  # they name the computation of a start


def _bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    match = _NARROW_FLOAT.match(dtype)
    if match:
        return int(match.group(1))
    raise ValueError(
        f"Unknown HLO element type {dtype!r} in a collective's result. Pass the text of "
        "a compiled XLA program (jax.jit(f).lower(...).compile().as_text())."
    )


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program and the arrays it produces.

    Attributes:
        kind: One of :data:`COLLECTIVE_KINDS` (an async ``-start`` reports its base kind).
        name: The instruction's name in the HLO text, e.g. ``"all-gather.3"``.
        shapes: The result shape of each array it produces, per device (one entry, or one
            per element of a tuple result).
        dtypes: The HLO element type of each result (``"f32"``, ``"bf16"``, ...).
        computation: The HLO computation that holds it (``""`` for bare text).
        is_async: Whether it is an async ``-start`` instruction.
        repeats: How often one run of the program executes it: the product of the
            stated trip counts of the ``while`` loops around it (1 outside loops).

    Examples:
        >>> from lorajax.sharding import Collective
        >>> c = Collective("all-gather", "all-gather.1", ((2, 8), (4,)), ("f32", "bf16"))
        >>> c.elements, c.bytes
        (20, 72)
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    computation: str = ""
    is_async: bool = False
    repeats: int = 1

    @property
    def elements(self) -> int:
        """Elements of the result(s), per device, for one execution."""
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def bytes(self) -> int:
        """Bytes of the result(s), per device, for one execution (sub-byte types packed)."""
        return sum(
            (math.prod(shape) * _bits(dtype) + 7) // 8
            for shape, dtype in zip(self.shapes, self.dtypes)
        )


# -- shapes ------------------------------------------------------------------------


class _ShapeParser:
    """Reads one HLO shape (an array type or a nested tuple) from a position of a line."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def parse(self) -> Any:
        self._skip()
        if self.text.startswith("(", self.pos):
            self.pos += 1
            items = []
            self._skip()
            if self.text.startswith(")", self.pos):
                self.pos += 1
                return items
            while True:
                items.append(self.parse())
                self._skip()
                if self.text.startswith(",", self.pos):
                    self.pos += 1
                    continue
                if self.text.startswith(")", self.pos):
                    self.pos += 1
                    return items
                raise ValueError(f"Malformed HLO tuple shape near {self.text[self.pos :]!r}.")
        match = _ARRAY.match(self.text, self.pos)
        if not match:
            raise ValueError(f"Malformed HLO shape near {self.text[self.pos :]!r}.")
        self.pos = match.end()
        dims = []
        for entry in filter(None, (e.strip() for e in match.group(2).split(","))):
            size = entry.removeprefix("<=")  # a bounded dynamic size: count its bound
            if not size.isdigit():
                raise ValueError(
                    f"Cannot count the elements of the dynamic shape {match.group(0)!r}."
                )
            dims.append(int(size))
        if self.text.startswith("{", self.pos):  # layout, e.g. {1,0} or {1,0:T(8,128)}
            end = self.text.find("}", self.pos)
            self.pos = len(self.text) if end < 0 else end + 1
        return (match.group(1), tuple(dims))


def _flatten(shape: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    if isinstance(shape, tuple):
        yield shape
        return
    for item in shape:
        yield from _flatten(item)


def _result_arrays(kind: str, is_async: bool, shape: Any) -> list[tuple[str, tuple[int, ...]]]:
    if is_async and kind in _START_OUTPUT_IS_ELEMENT_1:
        if not isinstance(shape, list) or len(shape) < 2:
            raise ValueError(f"A {kind}-start must have a tuple result, got {shape!r}.")
        shape = shape[1]
    return list(_flatten(shape))


# -- the call graph ----------------------------------------------------------------


def _called(value: str) -> list[str]:
    return [name.lstrip("%") for name in re.findall(r"%?[\w.\-]+", value.strip("{}"))]


def _repeats(callers: dict[str, list[tuple[str, int]]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def visit(name: str, seen: frozenset[str]) -> int:
        if name in memo:
            return memo[name]
        sites = [(c, f) for c, f in callers.get(name, []) if c not in seen and c != name]
        total = 1 if not sites else sum(visit(c, seen | {name}) * f for c, f in sites)
        memo[name] = total
        return total

    return {name: visit(name, frozenset()) for name in callers}


# -- public ------------------------------------------------------------------------


def _text_of(hlo: Any) -> str:
    if isinstance(hlo, str):
        return hlo
    if hasattr(hlo, "as_text"):
        return hlo.as_text()
    raise TypeError(
        f"`hlo_text` must be HLO text or a compiled program with .as_text(), got "
        f"{type(hlo).__name__}. Pass jax.jit(f).lower(...).compile().as_text()."
    )


def collectives(hlo_text: Any) -> list[Collective]:
    """Lists the collective instructions of compiled HLO text, in text order.

    Sizes are those of each collective's **result, per device** (see the module notes):
    the gathered array of an all-gather, the reduced array of an all-reduce, a device's
    piece of a reduce-scatter. Async pairs count once (at the ``-start``), both branches of
    a conditional count, and :attr:`Collective.repeats` carries the trip counts of the
    loops around each instruction.

    Args:
        hlo_text: The text of a compiled program, e.g.
            ``jax.jit(f).lower(*args).compile().as_text()`` (a compiled object with an
            ``as_text()`` method is accepted too). Bare instruction lines work as well.

    Returns:
        One :class:`Collective` per collective instruction.

    Raises:
        TypeError: If ``hlo_text`` is neither text nor has ``as_text()``.
        ValueError: On a collective whose result shape cannot be read.

    Examples:
        >>> from lorajax.sharding import collectives
        >>> hlo = '''
        ... %ag = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %p), dimensions={0}
        ... %ar = (f32[4,16]{1,0}, bf16[4]{0}) all-reduce(%x, %y), to_apply=%add
        ... %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%z)
        ... %cd = f32[8]{0} collective-permute-done(%cp)
        ... '''
        >>> for c in collectives(hlo):
        ...     print(c.kind, c.shapes, c.dtypes, c.elements, c.bytes)
        all-gather ((64, 16),) ('f32',) 1024 4096
        all-reduce ((4, 16), (4,)) ('f32', 'bf16') 68 264
        collective-permute ((8,),) ('f32',) 8 32
    """
    text = _text_of(hlo_text)
    found: list[tuple[str, str, str, bool, list[tuple[str, tuple[int, ...]]]]] = []
    callers: dict[str, list[tuple[str, int]]] = {}
    computation = ""
    starts = {f"{kind}-start": kind for kind in COLLECTIVE_KINDS}
    for raw in text.splitlines():
        line = _COMMENT.sub("", raw)
        if not line.strip() or line.startswith("HloModule"):
            continue
        if not line[0].isspace():
            header = _HEADER.match(line)
            if header:
                computation = header.group("name")
                callers.setdefault(computation, [])
                continue
            if line.strip() == "}":
                computation = ""
                continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        parser = _ShapeParser(line, match.end())
        try:
            shape, error = parser.parse(), None
            op_match = _OPCODE.match(line, parser.pos)
        except ValueError as e:
            shape, error = None, e
            op_match = _ANY_OPCODE.search(line, match.end())
        op = op_match.group("op") if op_match else None
        if op in COLLECTIVE_KINDS or op in starts:
            if error is not None:
                raise ValueError(f"{error} The instruction: {raw.strip()!r}.")
            kind = starts.get(op, op)
            arrays = _result_arrays(kind, op in starts, shape)
            for dtype, _ in arrays:
                _bits(dtype)  # an unknown element type fails here, not when sizes are read
            found.append((kind, match.group("name"), computation, op in starts, arrays))
        if op is not None and _SKIPPED_CALLERS.search(op):
            continue
        trips = _TRIP_COUNT.search(line)
        for call in _CALL.finditer(line):
            key = call.group("key")
            factor = 1
            if op == "while" and trips and key in ("body", "condition"):
                factor = int(trips.group(1)) + (key == "condition")
            for callee in _called(call.group("value")):
                callers.setdefault(callee, []).append((computation, factor))
    repeats = _repeats(callers)
    return [
        Collective(
            kind=kind,
            name=name,
            shapes=tuple(dims for _, dims in arrays),
            dtypes=tuple(dtype for dtype, _ in arrays),
            computation=comp,
            is_async=is_async,
            repeats=repeats.get(comp, 1) if comp else 1,
        )
        for kind, name, comp, is_async, arrays in found
    ]


def _totals(hlo_text: Any, size: str) -> dict[str, int]:
    out = dict.fromkeys(COLLECTIVE_KINDS, 0)
    for c in collectives(hlo_text):
        out[c.kind] += getattr(c, size) * c.repeats
    return out


def collective_bytes(hlo_text: Any) -> dict[str, int]:
    """Bytes of collective results per device, by kind, for one run of the program.

    The sum over :func:`collectives` of ``bytes * repeats``: what a device receives as
    collective results (the reduced array of an all-reduce, the gathered array of an
    all-gather, its own piece of a reduce-scatter).

    Args:
        hlo_text: Compiled HLO text (see :func:`collectives`).

    Returns:
        ``{kind: bytes}`` with every kind of :data:`COLLECTIVE_KINDS` (0 when absent).

    Examples:
        >>> from lorajax.sharding import collective_bytes
        >>> collective_bytes("%ar = bf16[128]{0} all-reduce(%x), to_apply=%add")["all-reduce"]
        256
    """
    return _totals(hlo_text, "bytes")


def collective_elements(hlo_text: Any) -> dict[str, int]:
    """Elements of collective results per device, by kind, for one run of the program.

    The sum over :func:`collectives` of ``elements * repeats`` (see
    :func:`collective_bytes`).

    Args:
        hlo_text: Compiled HLO text (see :func:`collectives`).

    Returns:
        ``{kind: elements}`` with every kind of :data:`COLLECTIVE_KINDS`.

    Examples:
        >>> from lorajax.sharding import collective_elements
        >>> hlo = '''
        ... %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
        ...   %rs = f32[2]{0} reduce-scatter(f32[8]{0} %x), dimensions={0}, to_apply=%add
        ... }
        ... ENTRY %main (a: f32[8]) -> f32[8] {
        ...   %w = (s32[]) while(%t), body=%body, backend_config={"known_trip_count":{"n":"3"}}
        ...   ROOT %ag = f32[32]{0} all-gather(f32[8]{0} %a), dimensions={0}
        ... }
        ... '''
        >>> totals = collective_elements(hlo)
        >>> totals["reduce-scatter"], totals["all-gather"]  # 3 iterations of 2; 32 once
        (6, 32)
    """
    return _totals(hlo_text, "elements")
