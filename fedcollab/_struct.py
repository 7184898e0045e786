"""protobuf's Struct stores every number as a double: values read back from one."""

from __future__ import annotations

from typing import Any


def integral(value: Any) -> Any:
    """`value` with integral floats given back their int type, in lists and dicts too
    (model parameters such as `hidden = [16]` must come back as ints)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    return value
