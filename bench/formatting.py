"""How the benchmarks' tables write numbers: one formatter per kind, so every table reads alike."""

from __future__ import annotations

MiB = 1 << 20  # memory and checkpoint sizes are shown in MiB


def number(value: float | None, digits: int = 1) -> str:
    """`1,234.5` (thousands separated, `digits` decimals); `-` for a missing value."""
    return "-" if value is None else f"{value:,.{digits}f}"


def percent(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: 0.123 -> `12.3%`; `-` for a missing value."""
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def change(percent_change: float) -> str:
    """A change already in percent, signed: 12.34 -> `+12.3%`."""
    return f"{percent_change:+.1f}%"


def ratio(value: float) -> str:
    """A ratio to a baseline: 1.0104 -> `1.010x`."""
    return f"{value:.3f}x"
