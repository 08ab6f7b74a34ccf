"""Method registry: a method scores and plans, it never edits graphs. A new method is one module here.

A method is a function `plan(analysis, options) -> Plan` registered under a name with `@register("name")`;
`@register("name", options=("key", ...))` declares the `--method-option` keys it reads (others are an error).
A method may also expose its per-unit importance, `scores(analysis, options) -> {group index: array of unit scores}`,
with `@register_scores("name")`: `--target latency` allocates with those scores instead of the method's plan.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from compressor.errors import CompressorError

if TYPE_CHECKING:
    from compressor.analysis import Analysis
    from compressor.plan import Plan, PlanOptions

MethodFn = Callable[["Analysis", "PlanOptions"], "Plan"]
ScoresFn = Callable[["Analysis", "PlanOptions"], dict]

_REGISTRY: dict[str, MethodFn] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}
_SCORES: dict[str, ScoresFn] = {}
_BUILTIN_MODULES = ("zeros", "norms", "random_method", "graph_rw")


def register(name: str, options: tuple[str, ...] = ()) -> Callable[[MethodFn], MethodFn]:
    """Register a planning function under `name`, with the option keys it reads from PlanOptions.extra."""

    def decorator(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = fn
        _OPTIONS[name] = tuple(options)
        return fn

    return decorator


def register_scores(name: str) -> Callable[[ScoresFn], ScoresFn]:
    """Register the per-unit scoring function of method `name`."""

    def decorator(fn: ScoresFn) -> ScoresFn:
        _SCORES[name] = fn
        return fn

    return decorator


def get_scores(name: str) -> ScoresFn | None:
    """The scoring function method `name` registered, or None when it has none."""
    _load_builtins()
    return _SCORES.get(name)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"compressor.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"compressor.methods.{module}":
                raise


def available() -> list[str]:
    """Names of all registered methods."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> MethodFn:
    """The planning function registered as `name`; a CompressorError names the choices otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise CompressorError(f"unknown method '{name}' (choose from: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def check_options(name: str, keys, also_known: tuple[str, ...] = ()) -> None:
    """Raise CompressorError for an option key method `name` does not read ('-' and '_' are the same);
    `also_known` adds keys read elsewhere (e.g. by the latency planner)."""
    get(name)
    known = _OPTIONS.get(name, ()) + tuple(also_known)
    unknown = [k for k in keys if str(k).replace("-", "_") not in known]
    if unknown:
        listed = f"its options: {', '.join(known)}" if known else "it takes no options"
        raise CompressorError(f"unknown option '{unknown[0]}' for method {name} ({listed})")
