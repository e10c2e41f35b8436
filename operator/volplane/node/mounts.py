"""Pure parsers for what the node plugin reads from the system.

- ``/proc/self/mountinfo``      -> ``MountEntry`` list (proc(5) format)
- ``losetup -J -l [-j FILE]``   -> ``LoopDevice`` list
- ``blkid -p -o export DEV``    -> dict of the probed tags (TYPE, PTTYPE, ...)

Nothing here touches the system; ``system.py`` feeds these the text it reads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

__all__ = ["LoopDevice", "MountEntry", "find_mount", "mounts_of_source", "parse_blkid",
           "parse_losetup", "parse_mountinfo", "unescape"]

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\040 style octal."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str          # the path inside the mounted filesystem that is mounted here
    mount_point: str
    options: frozenset[str]   # per-mount options (ro/rw, nosuid, ...)
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def device(self) -> tuple[int, int]:
        return (self.major, self.minor)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse /proc/<pid>/mountinfo. Malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            major, minor = parts[2].split(":")
            out.append(MountEntry(
                mount_id=int(parts[0]), parent_id=int(parts[1]),
                major=int(major), minor=int(minor),
                root=unescape(parts[3]), mount_point=unescape(parts[4]),
                options=frozenset(parts[5].split(",")),
                fs_type=parts[sep + 1], source=unescape(parts[sep + 2]),
                super_options=frozenset(parts[sep + 3].split(",")) if len(parts) > sep + 3
                else frozenset()))
        except (ValueError, IndexError):
            continue
    return out


def find_mount(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The topmost mount at exactly `path` (the last one listed wins, as mounts stack)."""
    path = os.path.normpath(path)
    found = None
    for e in entries:
        if e.mount_point == path:
            found = e
    return found


def mounts_of_source(entries: list[MountEntry], device: tuple[int, int]) -> list[MountEntry]:
    """Every mount of the filesystem on `device` (major, minor), bind mounts included."""
    return [e for e in entries if e.device == device]


@dataclass(frozen=True)
class LoopDevice:
    name: str          # /dev/loopN
    back_file: str     # as the kernel reports it ("... (deleted)" suffix stripped)
    read_only: bool
    deleted: bool = False
    size_limit: int = 0
    offset: int = 0
    back_ino: int = 0
    back_dev: tuple[int, int] | None = None   # (major, minor) of the file's filesystem


def parse_losetup(text: str) -> list[LoopDevice]:
    """Parse `losetup -J -l` output (util-linux >= 2.27). Empty text is no devices."""
    if not text.strip():
        return []
    data = json.loads(text)
    out = []
    for d in data.get("loopdevices") or ():
        back = d.get("back-file") or ""
        deleted = back.endswith(" (deleted)")
        if deleted:
            back = back[: -len(" (deleted)")]

        def _bool(v: object) -> bool:
            return v in (True, 1, "1", "true")

        dev = None
        majmin = str(d.get("back-maj:min") or "").strip()
        if ":" in majmin:
            ma, _, mi = majmin.partition(":")
            if ma.strip().isdigit() and mi.strip().isdigit():
                dev = (int(ma), int(mi))
        out.append(LoopDevice(name=d.get("name") or "", back_file=back,
                              read_only=_bool(d.get("ro")), deleted=deleted,
                              size_limit=int(d.get("sizelimit") or 0),
                              offset=int(d.get("offset") or 0),
                              back_ino=int(d.get("back-ino") or 0), back_dev=dev))
    return out


def parse_blkid(text: str) -> dict[str, str]:
    """Parse `blkid -p -o export` (KEY=value lines). Nothing found is an empty dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out
