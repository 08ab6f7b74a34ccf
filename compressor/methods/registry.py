"""The method registry: a method scores and plans, it never edits graphs. A new method is one module in this folder.

A method is a planning function `plan(analysis, options) -> Plan` registered with its metadata by
`@register("name", needs_ratio=..., exact=..., scores=...)`:

- options: the `--method-option` keys it reads from PlanOptions.extra (any other key is an error);
- needs_ratio: whether `--ratio` (or a latency budget) is required; a method without one cannot target latency;
- exact: the method only removes what is already zero, so the result must equal the original (it is verified
  against the original, and an empty plan is a valid answer);
- scores: its per-unit importance `scores(analysis, options) -> {group index: array of unit scores}`, which
  `--target latency` allocates with instead of the method's own plan (None: l1 norms stand in, and the report
  says so); scores_note: what the report says about where the scores come from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from compressor.errors import CompressorError

if TYPE_CHECKING:
    import numpy as np

    from compressor.engine.analysis import Analysis
    from compressor.engine.plan import Plan, PlanOptions

PlanFn = Callable[["Analysis", "PlanOptions"], "Plan"]
ScoresFn = Callable[["Analysis", "PlanOptions"], "dict[int, np.ndarray]"]

BUILTIN_MODULES = ("zeros", "norms", "random_method", "graph_rw")


@dataclass(frozen=True)
class Method:
    """A registered method and what callers need to know about it."""

    name: str
    plan: PlanFn
    needs_ratio: bool = True
    exact: bool = False
    scores: ScoresFn | None = None
    scores_note: str | None = None
    options: tuple[str, ...] = ()


METHODS: dict[str, Method] = {}


def register(name: str, *, options: tuple[str, ...] = (), needs_ratio: bool = True, exact: bool = False,
             scores: ScoresFn | None = None, scores_note: str | None = None) -> Callable[[PlanFn], PlanFn]:
    """Register a planning function under `name` with its metadata (see the module docstring)."""

    def decorator(fn: PlanFn) -> PlanFn:
        METHODS[name] = Method(name, fn, needs_ratio, exact, scores, scores_note, tuple(options))
        return fn

    return decorator


def load_builtins() -> None:
    """Import the built-in method modules (each registers itself)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"compressor.methods.{module}")


def available() -> list[str]:
    """Names of all registered methods."""
    load_builtins()
    return sorted(METHODS)


def get(name: str) -> Method:
    """The method registered as `name`; a CompressorError names the choices otherwise."""
    load_builtins()
    if name not in METHODS:
        raise CompressorError(f"unknown method '{name}' (choose from: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def check_options(name: str, keys, also_known: tuple[str, ...] = ()) -> None:
    """Raise CompressorError for an option key method `name` does not read ('-' and '_' are the same);
    `also_known` adds keys read elsewhere (e.g. by the latency planner)."""
    known = get(name).options + tuple(also_known)
    unknown = [k for k in keys if str(k).replace("-", "_") not in known]
    if unknown:
        listed = f"its options: {', '.join(known)}" if known else "it takes no options"
        raise CompressorError(f"unknown option '{unknown[0]}' for method {name} ({listed})")
