"""Volume plugins the attach/detach controller consults by volume source (upstream's
VolumePluginMgr): CSI, attached through VolumeAttachments, and FlexVolume drivers found
in --flex-volume-plugin-dir by a prober, run as executables. See docs/flexvolume.md."""

from .flex import FlexDriver, FlexVolumeError, FlexVolumePlugin
from .prober import DEFAULT_PLUGIN_DIR, FlexVolumeProber, ProbeEvent, ProbeOp, ProbeProblem
from .registry import (
    CSIPlugin,
    MultiplePluginsMatched,
    NoPluginMatched,
    VolumePluginRegistry,
    get_unique_volume_name,
    split_unique_name,
    unique_volume_name,
)
from .spec import VolumeSpec, multi_attach_allowed

__all__ = [
    "CSIPlugin", "DEFAULT_PLUGIN_DIR", "FlexDriver", "FlexVolumeError", "FlexVolumePlugin",
    "FlexVolumeProber", "MultiplePluginsMatched", "NoPluginMatched", "ProbeEvent", "ProbeOp",
    "ProbeProblem", "VolumePluginRegistry", "VolumeSpec", "get_unique_volume_name",
    "multi_attach_allowed", "split_unique_name", "unique_volume_name",
]
