"""CPU list parsing and formatting, as libvirt and the kernel write them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import CpuListError


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", set()),
        ("3", {3}),
        ("0-3", {0, 1, 2, 3}),
        ("0-3,8", {0, 1, 2, 3, 8}),
        ("0-3,8,^2", {0, 1, 3, 8}),
        (" 1 , 4-5 ", {1, 4, 5}),
    ],
)
def test_parse(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "1,,2", "-1", "1-2-3", "99999", "^"])
def test_parse_refuses_malformed_lists_with_the_list_in_the_message(text: str) -> None:
    with pytest.raises(CpuListError) as info:
        parse_cpu_list(text)
    assert repr(text) in str(info.value) or text.strip() in str(info.value)


def test_format_uses_ranges() -> None:
    assert format_cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert format_cpu_list([]) == ""


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_round_trip(cpus: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
