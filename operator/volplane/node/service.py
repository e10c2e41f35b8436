"""CSI Identity and Node services of `pool.volplane.io` (gRPC, csi.v1).

Each handler validates its request (volumes.py), takes the volume's lock and calls one
NodeOps method. Two calls for one volume never run at once: the second gets ABORTED,
which the kubelet retries (the CSI spec's answer to "an operation is pending"). Errors
map to gRPC codes: CsiError carries its own; a failing command is INTERNAL with the
command and its stderr in the message.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import wrappers_pb2
from prometheus_client import Counter, Histogram

from .. import __version__, logs, metrics
from .backing import DRIVER
from .gen import csi_pb2, csi_pb2_grpc
from .ops import NodeOps
from .system import CommandError
from .volumes import CsiError, parse_capability, precondition, require, require_abs

log = logs.get("csi")

TOPOLOGY_KEY = "topology.pool.volplane.io/node"

csi_calls = Counter("volplane_csi_operations_total",
                    "CSI calls served by the node plugin, by method and gRPC code",
                    ["method", "code"])
csi_seconds = Histogram("volplane_csi_operation_duration_seconds",
                        "Time to serve a CSI call, by method", ["method"],
                        buckets=metrics.LATENCY_BUCKETS)


class VolumeLocks:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, volume_id: str):
        with self._mu:
            if volume_id in self._held:
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"an operation on volume {volume_id} is already in progress")
            self._held.add(volume_id)
        try:
            yield
        finally:
            with self._mu:
                self._held.discard(volume_id)


def rpc(fn):
    """Serve one CSI method: errors to gRPC codes, a log line and metrics per call."""
    method = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        t0 = time.monotonic()
        code = grpc.StatusCode.OK
        message = ""
        try:
            return fn(self, request, context)
        except CsiError as e:
            code, message = e.code, e.message
        except CommandError as e:
            code, message = grpc.StatusCode.INTERNAL, str(e)
        except OSError as e:
            code, message = grpc.StatusCode.INTERNAL, f"{e.strerror or e}: {e.filename or ''}"
        except Exception as e:  # a bug: say so rather than kill the server thread
            log.exception("unexpected error", method=method)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            csi_calls.labels(method, code.name).inc()
            csi_seconds.labels(method).observe(time.monotonic() - t0)
            if method not in ("Probe", "NodeGetCapabilities", "NodeGetVolumeStats",
                              "GetPluginInfo", "GetPluginCapabilities") or \
                    code != grpc.StatusCode.OK:
                (log.info if code == grpc.StatusCode.OK else log.warning)(
                    "csi call", method=method, code=code.name,
                    volume=getattr(request, "volume_id", None) or None,
                    error=message or None, duration_ms=round((time.monotonic() - t0) * 1e3, 1))
        context.abort(code, message)

    return wrapper


@dataclass
class NodeInfo:
    node_id: str
    max_volumes: Callable[[], int]
    topology_key: str = TOPOLOGY_KEY


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ready: Callable[[], bool]):
        self.ready = ready

    @rpc
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=DRIVER, vendor_version=__version__)

    @rpc
    def GetPluginCapabilities(self, request, context):
        cap = csi_pb2.PluginCapability
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            cap(service=cap.Service(type=cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS))])

    @rpc
    def Probe(self, request, context):
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.ready()))


class Node(csi_pb2_grpc.NodeServicer):
    CAPABILITIES = ("STAGE_UNSTAGE_VOLUME", "EXPAND_VOLUME", "GET_VOLUME_STATS",
                    "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER")

    def __init__(self, ops: NodeOps, info: NodeInfo):
        self.ops = ops
        self.info = info
        self.locks = VolumeLocks()

    @staticmethod
    def _cap(request, required: bool = True):
        if request.HasField("volume_capability"):
            return parse_capability(request.volume_capability, dict(request.volume_context)
                                    if hasattr(request, "volume_context") else None)
        if required:
            return parse_capability(None)
        return None

    @rpc
    def NodeStageVolume(self, request, context):
        vid = require(request.volume_id, "volume_id")
        staging = require_abs(request.staging_target_path, "staging_target_path")
        cap = self._cap(request)
        with self.locks.hold(vid):
            self.ops.stage(vid, staging, cap, dict(request.publish_context))
        return csi_pb2.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(self, request, context):
        vid = require(request.volume_id, "volume_id")
        staging = require_abs(request.staging_target_path, "staging_target_path")
        with self.locks.hold(vid):
            self.ops.unstage(vid, staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    @rpc
    def NodePublishVolume(self, request, context):
        vid = require(request.volume_id, "volume_id")
        target = require_abs(request.target_path, "target_path")
        cap = self._cap(request)
        if not request.staging_target_path:
            raise precondition("staging_target_path is required (the plugin has "
                               "STAGE_UNSTAGE_VOLUME)")
        staging = require_abs(request.staging_target_path, "staging_target_path")
        with self.locks.hold(vid):
            self.ops.publish(vid, staging, target, cap, request.readonly,
                             dict(request.publish_context))
        return csi_pb2.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request, context):
        vid = require(request.volume_id, "volume_id")
        target = require_abs(request.target_path, "target_path")
        with self.locks.hold(vid):
            self.ops.unpublish(vid, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request, context):
        vid = require(request.volume_id, "volume_id")
        path = require_abs(request.volume_path, "volume_path")
        s = self.ops.stats(vid, path)
        usage = csi_pb2.VolumeUsage
        out = [usage(unit=usage.BYTES, total=s.total, available=s.available, used=s.used)]
        if not s.block:
            out.append(usage(unit=usage.INODES, total=s.inodes_total,
                             available=s.inodes_free, used=s.inodes_used))
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=out, volume_condition=csi_pb2.VolumeCondition(abnormal=s.abnormal,
                                                                message=s.message))

    @rpc
    def NodeExpandVolume(self, request, context):
        vid = require(request.volume_id, "volume_id")
        path = require_abs(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            self._cap(request)  # validated; the state file knows Block vs Filesystem
        rng = request.capacity_range
        with self.locks.hold(vid):
            size = self.ops.expand(vid, path, rng.required_bytes, rng.limit_bytes)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc
    def NodeGetCapabilities(self, request, context):
        t = csi_pb2.NodeServiceCapability.RPC.Type
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(
                type=t.Value(name))) for name in self.CAPABILITIES])

    @rpc
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.info.node_id, max_volumes_per_node=self.info.max_volumes(),
            accessible_topology=csi_pb2.Topology(
                segments={self.info.topology_key: self.info.node_id}))


def add_to_server(server: grpc.Server, identity: Identity, node: Node) -> None:
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)
    csi_pb2_grpc.add_NodeServicer_to_server(node, server)
