"""Merge methods registered by name, each declaring its parameters (default, type, help, check).

The CLI documents ``--method-arg density=0.2`` from these declarations, and ``merge`` validates
user arguments against them, so adding a method is one function plus ``@register_method``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class MergeError(ValueError):
    """Bad input to a merge: wrong method, parameter or task vectors."""


@dataclass(frozen=True)
class MethodParam:
    """One declared parameter of a merge method; ``type(default)`` is its type."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[str, Any], None] | None = None

    @property
    def type(self) -> type:
        return type(self.default)

    def validate(self, value: Any) -> Any:
        """Return ``value`` coerced to the declared type, or raise a MergeError saying what is wrong."""
        expected = self.type
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise MergeError(
                f"parameter {self.name!r} must be {expected.__name__}, got {value!r} "
                f"({type(value).__name__}); e.g. {self.name}={self.default!r}."
            )
        if self.choices is not None and value not in self.choices:
            raise MergeError(
                f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}."
            )
        if self.check is not None:
            self.check(self.name, value)
        return value

    def parse(self, text: str) -> Any:
        """Convert a CLI string (``density=0.2`` → ``"0.2"``) to the declared type, then validate."""
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(text)
                value: Any = lowered in {"true", "1", "yes"}
            else:
                value = self.type(text)
        except ValueError:
            raise MergeError(
                f"parameter {self.name!r} expects {self.type.__name__}, got {text!r}; "
                f"e.g. --method-arg {self.name}={self.default}."
            ) from None
        return self.validate(value)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, declared parameters, source paper and λ search grid."""

    name: str
    fn: Callable[..., dict]
    params: Mapping[str, MethodParam]
    paper: str
    summary: str
    grid: tuple[float, ...] | None = None
    needs_data: bool = False  # learns its coefficients on inputs (AdaMerging): no pure ``merge`` call

    @property
    def scalable(self) -> bool:
        """True when the method has a λ (``scaling``) that multiplies its output linearly."""
        return "scaling" in self.params

    def resolve(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by validated ``args``; unknown names raise listing the valid ones."""
        unknown = [key for key in args if key not in self.params]
        if unknown:
            valid = ", ".join(self.params) or "none"
            raise MergeError(
                f"method {self.name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}."
            )
        resolved = {name: p.default for name, p in self.params.items()}
        resolved.update({key: self.params[key].validate(value) for key, value in args.items()})
        return resolved

    def describe(self) -> str:
        """Multi-line help text: summary, paper and one line per parameter (used by ``--help``)."""
        lines = [f"{self.name}: {self.summary} [{self.paper}]"]
        for p in self.params.values():
            choices = f" (one of {list(p.choices)})" if p.choices else ""
            lines.append(f"  {p.name}={p.default!r}: {p.help}{choices}")
        return "\n".join(lines)


METHODS: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    params: Sequence[MethodParam] = (),
    paper: str,
    summary: str,
    grid: Sequence[float] | None = None,
    needs_data: bool = False,
) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering a merge function under ``name`` with its declared parameters."""

    def decorator(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in METHODS:
            raise MergeError(f"merge method {name!r} is already registered; pick another name.")
        METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            params={p.name: p for p in params},
            paper=paper,
            summary=summary,
            grid=tuple(grid) if grid is not None else None,
            needs_data=needs_data,
        )
        return fn

    return decorator


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``, or a MergeError listing the available ones."""
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; available methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def parse_method_args(method: str, items: Sequence[str]) -> dict[str, Any]:
    """Parse CLI ``key=value`` strings against ``method``'s declared parameters."""
    spec = get_method(method)
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MergeError(f"method argument {item!r} is not key=value; e.g. density=0.2.")
        if key not in spec.params:
            raise MergeError(
                f"method {method!r} has no parameter {key!r}; valid parameters: "
                f"{', '.join(spec.params) or 'none'}."
            )
        parsed[key] = spec.params[key].parse(text)
    return parsed


# --------------------------------------------------------------------------- shared checks/params
def check_positive_finite(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise MergeError(f"parameter {name!r} must be a finite number > 0, got {value!r}.")


def check_fraction(name: str, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise MergeError(
            f"parameter {name!r} is the kept fraction and must lie in (0, 1], got {value!r}; "
            "e.g. 0.2 keeps 20%."
        )


def scaling_param(default: float) -> MethodParam:
    """λ, the coefficient the merged task vector is multiplied by (PEFT's ``weights``)."""
    return MethodParam(
        "scaling", default, "λ: merged task vector = λ · merge(τ_1..τ_n)", check=check_positive_finite
    )


def density_param(default: float, what: str) -> MethodParam:
    return MethodParam("density", default, what, check=check_fraction)


DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))

__all__ = [
    "DEFAULT_GRID",
    "METHODS",
    "MergeError",
    "MergeMethod",
    "MethodParam",
    "get_method",
    "parse_method_args",
    "register_method",
]
