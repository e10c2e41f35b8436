"""Kubernetes ``resource.Quantity`` strings <-> integer byte counts.

A quantity is ``<signed number><suffix>`` where the suffix is one of

* a binary SI suffix: ``Ki Mi Gi Ti Pi Ei`` (powers of 1024),
* a decimal SI suffix: ``n u m "" k M G T P E`` (powers of 1000),
* a decimal exponent: ``e<int>`` or ``E<int>`` (``1e3`` == 1000).

Storage sizes are whole bytes, so :func:`parse_quantity` rounds a fractional result
*up*, exactly like ``Quantity.Value()`` does upstream (``1.5`` -> 2, ``100m`` -> 1).
Arithmetic is done with :class:`fractions.Fraction`, so ``0.1Gi`` is exact.

String parsing is memoized (bounded LRU keyed on the exact input string): a cluster
has a handful of distinct sizes but every PV upsert and claim sync re-reads them, and
the Fraction arithmetic dominated the matching cost. The cached result is a plain
``int`` (immutable), and invalid strings are not cached, so they raise every time.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import lru_cache

__all__ = ["parse_quantity", "format_quantity"]

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -3, "u": -2, "m": -1, "": 0, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}

# number: optional sign, digits with at most one decimal point (".5" and "5." are legal),
# then the (possibly empty) suffix, which is validated separately for a precise message.
_QUANTITY_RE = re.compile(r"^(?P<num>[+-]?(?:\d+\.?\d*|\.\d+))(?P<suffix>.*)$")
_EXPONENT_RE = re.compile(r"^[eE](?P<exp>[+-]?\d+)$")

# Exponents beyond this are rejected: upstream caps quantities far below it and a huge
# exponent would make Fraction arithmetic allocate absurd integers.
_MAX_EXPONENT = 100

# Distinct quantity strings kept by the parse cache. Real clusters use tens of sizes;
# the bound only keeps pathological input (unique sizes per object) from growing it.
_CACHE_SIZE = 4096


def _suffix_multiplier(suffix: str, text: str) -> Fraction:
    """Return the multiplier a suffix stands for, or raise ValueError naming the input."""
    if suffix in _BINARY:
        return Fraction(1024 ** _BINARY[suffix])
    if suffix in _DECIMAL:
        return Fraction(1000) ** _DECIMAL[suffix]
    match = _EXPONENT_RE.match(suffix)
    if match:
        exp = int(match.group("exp"))
        if abs(exp) > _MAX_EXPONENT:
            raise ValueError(f"invalid quantity {text!r}: exponent {exp} is out of range")
        return Fraction(10) ** exp
    raise ValueError(
        f"invalid quantity {text!r}: unknown suffix {suffix!r} "
        "(expected one of Ki Mi Gi Ti Pi Ei, n u m k M G T P E, or e<exponent>)"
    )


def parse_quantity(value: str | int | float) -> int:
    """Convert a Kubernetes quantity to an integer, rounding any fraction up.

    >>> parse_quantity("1.5Gi")
    1610612736
    >>> parse_quantity("100m")
    1

    Raises ValueError (with the offending input in the message) for anything that is
    not a valid quantity: empty strings, unknown suffixes, NaN/inf floats, booleans.
    """
    if isinstance(value, str):
        # str(): a str subclass must not put a foreign object into the cache.
        return _parse_text(value if type(value) is str else str(value))
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}: booleans are not quantities")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"invalid quantity {value!r}: not a finite number")
        return math.ceil(Fraction(value))
    raise ValueError(f"invalid quantity {value!r}: expected a string or a number")


@lru_cache(maxsize=_CACHE_SIZE)
def _parse_text(value: str) -> int:
    """parse_quantity for a string; memoized (lru_cache does not cache exceptions)."""
    text = value.strip()
    if not text:
        raise ValueError("invalid quantity '': empty string")
    match = _QUANTITY_RE.match(text)
    if not match:
        raise ValueError(f"invalid quantity {value!r}: expected <number><suffix>, e.g. '10Gi'")
    number = Fraction(match.group("num"))
    return math.ceil(number * _suffix_multiplier(match.group("suffix"), value))


def format_quantity(n: int) -> str:
    """Format a byte count in the shortest exact binary form, else as plain bytes.

    >>> format_quantity(8 * 1024**3)
    '8Gi'
    >>> format_quantity(1536 * 1024**2)
    '1536Mi'
    >>> format_quantity(1000)
    '1000'
    """
    if n == 0:
        return "0"
    sign = "-" if n < 0 else ""
    magnitude = abs(n)
    for suffix, power in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
        unit = 1024**power
        if magnitude % unit == 0:
            return f"{sign}{magnitude // unit}{suffix}"
    return f"{sign}{magnitude}"
