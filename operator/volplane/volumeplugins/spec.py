"""VolumeSpec: upstream's volume.Spec, the one value every volume plugin is asked about.

A spec wraps exactly one of a PersistentVolume (a pod's claim, dereferenced to its bound
PV) or an inline pod volume (``pod.spec.volumes[i]``). For a PV, ``read_only`` is the
pod's ``persistentVolumeClaim.readOnly`` (upstream NewSpecFromPersistentVolume(pv,
pvcSource.ReadOnly)); an inline volume carries its own ``readOnly`` in its source.

Plain dicts in (API objects as the cache holds them); nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=True)
class VolumeSpec:
    pv: Mapping[str, Any] | None = None
    volume: Mapping[str, Any] | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        if (self.pv is None) == (self.volume is None):
            raise ValueError("a VolumeSpec wraps exactly one of a PersistentVolume or a pod volume")

    __hash__ = None  # type: ignore[assignment]  # wraps dicts

    @classmethod
    def from_pv(cls, pv: Mapping[str, Any], read_only: bool = False) -> VolumeSpec:
        """A pod's claim volume: the bound PV and the pod's ``persistentVolumeClaim.readOnly``."""
        return cls(pv=pv, read_only=bool(read_only))

    @classmethod
    def from_volume(cls, volume: Mapping[str, Any]) -> VolumeSpec:
        """An inline pod volume (``pod.spec.volumes[i]``)."""
        return cls(volume=volume)

    @property
    def name(self) -> str:
        """upstream Spec.Name(): the PV's name, or the pod volume's name."""
        if self.pv is not None:
            return ((self.pv.get("metadata") or {}).get("name")) or ""
        return (self.volume or {}).get("name") or ""

    def source(self, key: str) -> Mapping[str, Any] | None:
        """The volume source ``key`` ("csi", "flexVolume", ...) of the PV spec or pod volume."""
        if self.pv is not None:
            src = (self.pv.get("spec") or {}).get(key)
        else:
            src = (self.volume or {}).get(key)
        return src if isinstance(src, Mapping) else None

    @property
    def access_modes(self) -> tuple[str, ...]:
        if self.pv is None:
            return ()
        return tuple((self.pv.get("spec") or {}).get("accessModes") or ())


MULTI_ATTACH_MODES = ("ReadWriteMany", "ReadOnlyMany")


def multi_attach_allowed(spec: VolumeSpec | None) -> bool:
    """upstream util.IsMultiAttachAllowed: only a PV with access modes, none of them RWX or
    ROX, is known to forbid attaching to a second node. Inline volumes (flexVolume
    included) and PVs without access modes are allowed; the attacher must refuse itself.
    (Upstream's inline exceptions, azureDisk and cinder, are not attachable here.)"""
    if spec is None or spec.pv is None:
        return True
    modes = spec.access_modes
    if not modes:
        return True
    return any(m in MULTI_ATTACH_MODES for m in modes)
