"""Kubernetes quantity parsing and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volplane.quantity import format_quantity, parse_quantity

KI, MI, GI, TI, PI, EI = (1024**i for i in range(1, 7))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("1Ki", KI),
        ("1Mi", MI),
        ("8Gi", 8 * GI),
        ("2Ti", 2 * TI),
        ("1Pi", PI),
        ("1Ei", EI),
        ("1.5Gi", 3 * GI // 2),
        ("0.5Ki", 512),
        (".5Ki", 512),
        ("5.", 5),
        ("1k", 1000),
        ("1M", 10**6),
        ("1G", 10**9),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1E", 10**18),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1.5e3", 1500),
        ("2e-1", 1),  # 0.2 rounds up
        ("100m", 1),  # milli rounds up
        ("1000m", 1),
        ("1500m", 2),
        ("1u", 1),
        ("1n", 1),
        ("+3", 3),
        ("-1Ki", -KI),
        ("0.1Gi", 107374183),  # exact arithmetic, then ceil
        ("  10Gi ", 10 * GI),
    ],
)
def test_parse(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(("value", "expected"), [(5, 5), (0, 0), (1.2, 2), (2.0, 2), (-1.5, -1)])
def test_parse_numbers(value: int | float, expected: int) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("Gi", "expected <number><suffix>"),
        ("abc", "expected <number><suffix>"),
        ("1x", "unknown suffix 'x'"),
        ("1KI", "unknown suffix 'KI'"),
        ("1K", "unknown suffix 'K'"),
        ("1e", "unknown suffix 'e'"),
        ("1..2", "unknown suffix"),
        ("1 Gi", "unknown suffix"),
        ("1e999", "out of range"),
        (True, "booleans"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (None, "expected a string"),
    ],
)
def test_parse_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid quantity") as info:
        parse_quantity(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1000, "1000"),
        (KI, "1Ki"),
        (1536 * MI, "1536Mi"),
        (8 * GI, "8Gi"),
        (1024 * GI, "1Ti"),
        (3 * EI, "3Ei"),
        (2048 * EI, "2048Ei"),
        (-8 * GI, "-8Gi"),
        (GI + 1, str(GI + 1)),
    ],
)
def test_format(n: int, text: str) -> None:
    assert format_quantity(n) == text


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_format_round_trips(n: int) -> None:
    assert parse_quantity(format_quantity(n)) == n


def test_parse_cache_returns_equal_values_for_equal_strings() -> None:
    from volplane.quantity import _parse_text

    _parse_text.cache_clear()
    # Equal but distinct string objects share one entry and give the same int.
    first = parse_quantity("".join(["1.5", "Gi"]))
    second = parse_quantity("".join(["1.", "5Gi"]))
    assert first == second == 3 * GI // 2
    assert isinstance(first, int)
    info = _parse_text.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert info.maxsize is not None  # bounded


def test_parse_cache_does_not_swallow_errors() -> None:
    from volplane.quantity import _parse_text

    _parse_text.cache_clear()
    for _ in range(3):  # invalid input raises every time, never cached as a value
        with pytest.raises(ValueError, match="unknown suffix 'x'"):
            parse_quantity("1x")
    assert _parse_text.cache_info().currsize == 0
    # A str subclass parses like the plain string, and the cache keeps only plain str.
    class Sub(str):
        pass

    assert parse_quantity(Sub("2Ki")) == 2 * KI
    assert parse_quantity("2Ki") == 2 * KI
    assert _parse_text.cache_info().hits == 1
