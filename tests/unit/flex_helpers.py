"""Builders shared by the FlexVolume unit tests."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path

from prometheus_client import REGISTRY

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "hack" / "flexvolume" / "volplane-demo~disk"
DRIVER = "volplane-demo/disk"


# -- builders ------------------------------------------------------------------------------
def flex_pv(name="pv-1", *, driver=DRIVER, modes=("ReadWriteOnce",), fs_type="ext4",
            options=None, secret_ref=None, read_only_in_source=False):
    src = {"driver": driver, "fsType": fs_type, "readOnly": read_only_in_source}
    if options is not None:
        src["options"] = options
    if secret_ref is not None:
        src["secretRef"] = secret_ref
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"accessModes": list(modes), "capacity": {"storage": "1Gi"},
                     "flexVolume": src}}


def inline_flex(name="data", *, driver=DRIVER, read_only=False, options=None, secret=None):
    src = {"driver": driver, "readOnly": read_only}
    if options is not None:
        src["options"] = options
    if secret is not None:
        src["secretRef"] = {"name": secret}
    return {"name": name, "flexVolume": src}


def fake_driver(plugin_dir: Path, body: str, name="acme~fake") -> Path:
    """A driver <plugin_dir>/<name>/<exe>: a POSIX sh script whose body handles "$1"."""
    exe = name.split("~")[-1]
    d = plugin_dir / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / exe
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0
