"""How the PV controller talks to volume plugins: one interface, chosen by name.

A plugin serves one provisioner / CSI driver name (``pool.volplane.io`` for volplane's
own pools). The PV controller decides (decide.py) and hands the plugin what only it can
do: make a volume for a claim, delete or recycle a Released volume, grow a volume to
its claim's new request. The wiring (runtime.py) gives the PV controller the plugins of
the enabled controllers; a plugin never touches the PV controller's queues or caches,
it only asks its host to look at the Pending claims of its provisioner again (space
was freed, a pool appeared).

Upstream's counterparts: the provisionable, deletable, recyclable and expandable
volume plugins of ``pkg/volume``, found by name with ``findProvisionablePluginByName``
and friends.
"""

from __future__ import annotations

from typing import Protocol


class PluginHost(Protocol):
    def retry_claims(self, provisioner: str) -> None:
        """Sync the unbound claims whose class names `provisioner` again, soon."""


class VolumePlugin(Protocol):
    name: str  # the provisioner / CSI driver it serves

    def attach(self, host: PluginHost) -> None:
        """Called once by the wiring with the PV controller the plugin serves."""

    async def provision(self, claim: dict, storage_class: str,
                        selected_node: str | None) -> None:
        """Make (or finish making) the PV for a Pending claim; the PV controller binds
        it. Failures are reported on the claim by the plugin (an Event)."""

    async def delete(self, pv: dict) -> bool:
        """Delete a Released volume (reclaim policy Delete). False: not now, retry."""

    async def recycle(self, pv: dict) -> bool:
        """Scrub a Released volume and make it Available (reclaim policy Recycle)."""

    async def expand(self, claim: dict, pv: dict) -> None:
        """Grow the volume to the claim's request and record the new size on both."""
