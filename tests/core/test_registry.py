"""Registry: lookup with close-match suggestions, parameter validation, catalogue kinds."""
import pytest

import attnlab
from attnlab.core.errors import ParameterError, UnknownNameError
from attnlab.core.registry import Param


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'softmax'"):
        attnlab.get("sotfmax")
    with pytest.raises(KeyError):
        attnlab.build("nothing-like-it", dim=8)


def test_unknown_and_missing_parameters() -> None:
    with pytest.raises(ParameterError, match="did you mean 'heads'"):
        attnlab.build("softmax", dim=16, head=2)
    with pytest.raises(ParameterError, match="'dim' is required"):
        attnlab.build("softmax", heads=2)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"dim": 0}, "expected >= 1, got 0"),
        ({"dim": 16, "heads": 2.5}, "expected int, got float 2.5"),
        ({"dim": 16, "causal": "yes"}, "expected bool, got str"),
        ({"dim": 16, "heads": True}, "got bool True"),
        ({"dim": 15, "heads": 2}, "not divisible"),
    ],
)
def test_bad_parameter_values(params: dict, needle: str) -> None:
    with pytest.raises(ParameterError, match=needle):
        attnlab.build("softmax", **params)


def test_param_choices_and_ranges() -> None:
    p = Param("variant", str, "a", choices=("alpha", "beta"))
    with pytest.raises(ParameterError, match="did you mean alpha"):
        p.validate("x", "alpa")
    r = Param("rate", float, 0.5, low=0.0, high=1.0)
    assert r.validate("x", 1) == 1.0
    with pytest.raises(ParameterError, match="<= 1.0"):
        r.validate("x", 2.0)


def test_list_mechanisms_by_family() -> None:
    names_a = {s.name for s in attnlab.list_mechanisms(family="A")}
    assert "softmax" in names_a
    assert all(s.family == "A" for s in attnlab.list_mechanisms(family="A"))
    with pytest.raises(ParameterError, match="family"):
        attnlab.list_mechanisms(family="Z")


def test_spec_dict_has_every_field() -> None:
    d = attnlab.get("softmax").as_dict()
    for key in ("name", "kind", "paper", "family", "cost", "exponent", "supports", "params"):
        assert key in d
    assert d["supports"]["causal"] and d["supports"]["grids"] == [1]
