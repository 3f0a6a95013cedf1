"""Strategy registry: names users type (`streaming:budget=0.2,sinks=4`) to configured policies.

Every module in this package is imported once; each KVStrategy subclass with a `name` registers itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.strategies.base import STRATEGIES, KVStrategy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_strategy(spec: str | KVStrategy) -> KVStrategy:
    """Build a strategy from `name` or `name:key=value,...`; unknown names and parameters raise KVConfigError."""
    if isinstance(spec, KVStrategy):
        return spec
    name, _, args = str(spec).strip().partition(":")
    if name not in STRATEGIES:
        raise KVConfigError(f"unknown strategy {name!r}: choose one of {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    params: dict[str, int | float | str] = {}
    for item in filter(None, (part.strip() for part in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise KVConfigError(f"strategy {spec!r}: expected key=value, got {item!r}")
        if key not in allowed:
            raise KVConfigError(f"strategy {name!r} has no parameter {key!r}; it takes: {', '.join(allowed) or 'none'}")
        params[key] = _value(value)
    return cls(**params)
