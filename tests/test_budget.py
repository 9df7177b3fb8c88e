import pytest

from fxmem import BudgetError, format_bytes, parse_budget


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        (" 64 KiB ", 65536),
        ("1e3B", 1000),
        ("3gib", 3 * 2**30),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "2 GiBs", "MiB", "", "-1GiB", 0, -5, 1.5, True, None, [1]])
def test_bad_budgets_are_clear_errors(bad):
    with pytest.raises(BudgetError):
        parse_budget(bad)


def test_unknown_unit_names_the_known_units():
    with pytest.raises(BudgetError, match=r"unknown unit 'parsecs'.*MiB"):
        parse_budget("12 parsecs")


def test_budget_error_is_a_value_error_with_a_floor():
    err = BudgetError("too small", floor=123, holders={"parameters": 100})
    assert isinstance(err, ValueError) and err.floor == 123 and err.holders == {"parameters": 100}


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(5 * 2**30) == "5.00 GiB"
