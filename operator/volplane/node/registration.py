"""Kubelet plugin registration, served by the node plugin itself.

The kubelet's plugin watcher looks for sockets in /var/lib/kubelet/plugins_registry/.
For each one it calls ``GetInfo`` (pluginregistration.v1: type CSIPlugin, driver name,
the CSI endpoint as seen from the host, supported versions), registers the driver
(NodeGetInfo, CSINode object, node labels for the topology key) and reports back with
``NotifyRegistrationStatus``. This is what kubernetes-csi's node-driver-registrar
sidecar does; volplane serves it in-process (one container fewer, and that sidecar's Go
module is not available to this project's builds).
"""

from __future__ import annotations

import threading

from .. import logs
from .gen import pluginregistration_pb2 as pb
from .gen import pluginregistration_pb2_grpc as pb_grpc

log = logs.get("registration")

CSI_PLUGIN = "CSIPlugin"
SUPPORTED_VERSIONS = ("1.0.0",)


class Registration(pb_grpc.RegistrationServicer):
    def __init__(self, driver: str, endpoint: str):
        self.driver = driver
        self.endpoint = endpoint
        self.registered = threading.Event()
        self.error: str | None = None

    def GetInfo(self, request, context):
        return pb.PluginInfo(type=CSI_PLUGIN, name=self.driver, endpoint=self.endpoint,
                             supported_versions=list(SUPPORTED_VERSIONS))

    def NotifyRegistrationStatus(self, request, context):
        if request.plugin_registered:
            self.error = None
            self.registered.set()
            log.info("registered with the kubelet", driver=self.driver, endpoint=self.endpoint)
        else:
            self.error = request.error or "registration failed"
            self.registered.clear()
            log.error("the kubelet refused the registration", driver=self.driver,
                      error=self.error)
        return pb.RegistrationStatusResponse()


def add_to_server(server, registration: Registration) -> None:
    pb_grpc.add_RegistrationServicer_to_server(registration, server)
