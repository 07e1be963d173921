"""Small helpers with no moeflow dependencies."""

from __future__ import annotations

from typing import TypeGuard


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (JSON and metadata readers must not take True for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
