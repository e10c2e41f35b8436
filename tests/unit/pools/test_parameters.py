"""StorageClass parameters of pool classes (volplane.pools.parameters)."""

from __future__ import annotations

import pytest

from volplane.pools.parameters import (
    BEST_FIT,
    SPREAD,
    ClassParams,
    ParameterError,
    parse_class_parameters,
    parse_selector,
)

from .world import pool

# --- parse_class_parameters ------------------------------------------------------------------


@pytest.mark.parametrize("params, expected", [
    (None, ClassParams()),
    ({}, ClassParams()),
    ({"pool": "a, b,a"}, ClassParams(pools=("a", "b"))),
    ({"media": "ssd", "tier": "gold"}, ClassParams(match=(("media", "ssd"), ("tier", "gold")))),
    ({"match.region": "eu"}, ClassParams(match=(("region", "eu"),))),
    ({"placement": "Spread"}, ClassParams(placement=SPREAD)),
    ({"placement": "BestFit"}, ClassParams(placement=BEST_FIT)),
    ({"csi.storage.k8s.io/fstype": "xfs"}, ClassParams(fs_type="xfs")),
])
def test_parse_class_parameters(params, expected):
    assert parse_class_parameters(params) == expected


def test_parse_pool_selector():
    p = parse_class_parameters({"poolSelector": "tier=gold, env!=dev, fast, !slow, "
                                                "zone in (a, b), rack notin (r1)"})
    assert p.pool_selector == {
        "matchLabels": {"tier": "gold"},
        "matchExpressions": [
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "fast", "operator": "Exists"},
            {"key": "slow", "operator": "DoesNotExist"},
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "rack", "operator": "NotIn", "values": ["r1"]},
        ],
    }
    assert p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "a"}))
    assert not p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "c"}))
    assert not p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "a", "slow": "1"}))


@pytest.mark.parametrize("params, field", [
    ({"poool": "a"}, "poool"),
    ({"fstype": "ext4"}, "fstype"),
    ({"csi.storage.k8s.io/provisioner-secret-name": "s"},
     "csi.storage.k8s.io/provisioner-secret-name"),
    ({"placement": "Random"}, "placement"),
    ({"placement": "bestfit"}, "placement"),
    ({"pool": "Not_A_Name"}, "pool"),
    ({"pool": "a,,b"}, "pool"),
    ({"poolSelector": ""}, "poolSelector"),
    ({"poolSelector": "a=b,"}, "poolSelector"),
    ({"poolSelector": "in valid"}, "poolSelector"),
    ({"poolSelector": "k=v v"}, "poolSelector"),
    ({"poolSelector": "zone in ()"}, "poolSelector"),
    ({"media": ""}, "media"),
    ({"match.": "x"}, "match."),
    ({"csi.storage.k8s.io/fstype": "ntfs"}, "csi.storage.k8s.io/fstype"),
    ({"media": "ssd", "match.media": "hdd"}, "media"),
])
def test_parse_class_parameters_rejects(params, field):
    with pytest.raises(ParameterError) as err:
        parse_class_parameters(params)
    assert err.value.field == field
    assert f'"{field}"' in str(err.value)


def test_unknown_parameter_message_lists_the_accepted_ones():
    with pytest.raises(ParameterError, match="unknown parameter.*poolSelector.*placement"):
        parse_class_parameters({"mediaa": "ssd"})


def test_parse_selector_double_equals():
    assert parse_selector("a==b") == {"matchLabels": {"a": "b"}}
