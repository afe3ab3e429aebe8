"""z selections: '5', '3,7,9', '0:40', 'a:b:step', 'all', negatives, combinations."""

from __future__ import annotations

import pytest

from core.errors import ProtoscopeError
from core.zspec import ZSpecError, parse_z_spec


@pytest.mark.parametrize("spec, expected", [
    ("5", [5]),
    ("3,7,9", [3, 7, 9]),
    ("9,3,7", [9, 3, 7]),  # order kept
    ("0:4", [0, 1, 2, 3]),  # half-open like Python
    ("0:10:3", [0, 3, 6, 9]),
    ("all", list(range(12))),
    (" ALL ", list(range(12))),
    ("-1", [11]),
    ("-3:", [9, 10, 11]),
    (":3", [0, 1, 2]),
    ("10:", [10, 11]),
    ("0:12", list(range(12))),
    ("0:3,9", [0, 1, 2, 9]),
    ("2, 0:4", [2, 0, 1, 3]),  # repeats dropped, first occurrence kept
    ("5:2:-1", [5, 4, 3]),
])
def test_valid_specs(spec, expected):
    assert parse_z_spec(spec, 12) == expected


@pytest.mark.parametrize("spec, problem", [
    ("12", "z 12 is outside the stack"),
    ("-13", "z -13 is outside the stack"),
    ("0:40", "ends outside the stack"),
    ("12:", "starts outside the stack"),
    ("5:5", "selects no slices"),
    ("0:4:0", "has step 0"),
    ("abc", "cannot read z selection 'abc'"),
    ("1-3", "cannot read z selection '1-3'"),
    ("1,,2", "has an empty item"),
    ("", "empty z selection"),
    ("1:2:3:4", "cannot read z selection"),
])
def test_invalid_specs_say_the_valid_range(spec, problem):
    with pytest.raises(ZSpecError, match="valid z: 0..11") as info:
        parse_z_spec(spec, 12)
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ProtoscopeError)


def test_bad_slice_count():
    with pytest.raises(ZSpecError, match="0 slices"):
        parse_z_spec("all", 0)
