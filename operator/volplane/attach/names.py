"""Names the Attach/Detach controller shares with the kubelet and CSI attachers.

``volume_attachment_name`` is upstream's (csi_attacher.go getAttachmentName), so the
kubelet and any external-attacher find the attachments volplane creates; a unique
volume name is what ``node.status.volumesAttached``/``volumesInUse`` list. Pure.
"""

from __future__ import annotations

import hashlib

CSI_PLUGIN = "kubernetes.io/csi"
CSI_VOLUME_SEP = "^"
FAILED_ATTACH = "FailedAttachVolume"
FAILED_DETACH = "FailedDetachVolume"
SUCCESSFUL_ATTACH = "SuccessfulAttachVolume"


def volume_attachment_name(volume_handle: str, attacher: str, node_name: str) -> str:
    """The VolumeAttachment name upstream's CSI attacher uses (csi_attacher.go
    getAttachmentName(volName, csiDriverName, nodeName), called with the PV's
    ``spec.csi.volumeHandle``): ``csi-`` + hex sha256 of handle + driver + node.

    The kubelet and external-attachers look attachments up by this name."""
    digest = hashlib.sha256(f"{volume_handle}{attacher}{node_name}".encode()).hexdigest()
    return f"csi-{digest}"


def unique_volume_name(driver: str, handle: str) -> str:
    """The kubelet/controller UniqueVolumeName of a CSI volume:
    ``kubernetes.io/csi/<driver>^<volumeHandle>`` (what node.status lists)."""
    return f"{CSI_PLUGIN}/{driver}{CSI_VOLUME_SEP}{handle}"


def parse_unique_volume_name(name: str) -> tuple[str, str] | None:
    """(driver, handle) of a CSI unique volume name, None for other plugins."""
    prefix = CSI_PLUGIN + "/"
    if not name.startswith(prefix):
        return None
    driver, sep, handle = name[len(prefix):].partition(CSI_VOLUME_SEP)
    return (driver, handle) if sep and driver and handle else None


def plugin_name(driver: str) -> str:
    """upstream GetFullQualifiedPluginNameForVolume for CSI: ``kubernetes.io/csi:<driver>``."""
    return f"{CSI_PLUGIN}:{driver}"
