"""The node agent's watch layer: a small Kopf operator of its own, in the agent's thread.

`volplane node` runs the agent in a thread with its own asyncio loop (main.py); Kopf
runs there embedded (``kopf.operator``), with the operator's building blocks:

- ``informers.Informers`` registers, per watched kind, one ``@kopf.index`` (the lister)
  and one ``@kopf.on.event`` (the listeners): StoragePools and StorageAllocations (what
  to create, grow, delete and report), PersistentVolumes slimmed to their CSI handle
  (they only veto deletions), and the agent's own Node, field-selected by name (its
  labels say which pools reach it);
- the "caches synced" barrier is the Node's first event: Kopf runs no handler before
  every index is populated, and the node the agent runs on exists (the operator uses
  the ``default`` namespace the same way; the agent reads nodes, not namespaces);
- Kopf writes nothing: ``settings.configure`` as for the operator (no change-detecting
  handler, no diff-base, posting off, no peering), scanning off and cluster-wide, so
  Kopf reads only the API's discovery documents (readable by every authenticated
  client) and the watched kinds: no CustomResourceDefinitions, no namespaces;
- not the main thread: Kopf installs no signal handlers there (the main thread handles
  SIGTERM and asks the agent to stop), and its "ultimate termination" is off: when its
  operator ends without the stop flag, Kopf would SIGKILL its thread, which is the whole
  process, CSI server included. The stop flag is an ``asyncio.Event`` of this loop (set
  through ``call_soon_threadsafe``): Kopf waits for a ``threading.Event`` in an executor
  thread, which would keep ``asyncio.run`` from ever returning after a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from .. import logs, settings
from ..informers import Informers
from ..kinds import Kind, slim_node

log = logs.get("node-agent")

WATCH_TIMEOUT = 300  # seconds the API server keeps one watch open (then Kopf resumes)


def slim_pv(pv: Mapping[str, Any]) -> dict[str, Any]:
    """A PV reduced to what vetoes a deletion: its CSI driver and volume handle."""
    md = pv.get("metadata") or {}
    csi = (pv.get("spec") or {}).get("csi") or {}
    return {"metadata": {k: md[k] for k in ("name", "resourceVersion", "uid") if k in md},
            "spec": {"csi": {k: csi[k] for k in ("driver", "volumeHandle") if k in csi}}}


PVS = Kind("", "v1", "persistentvolumes", "PersistentVolume", slim_pv)


def node_kind(name: str) -> Kind:
    """This node's Node object only (a server-side field selector)."""
    return Kind("", "v1", "nodes", "Node", slim_node, field_selector=f"metadata.name={name}")


def connection(cfg: Any) -> kopf.ConnectionInfo:
    """Kopf's credentials from the agent's own client configuration (--kubeconfig or
    in-cluster), so that its watches and the agent's writes are one identity. Kopf asks
    again after a 401; ``auth_settings()`` re-reads a rotated service-account token."""
    header = ((cfg.auth_settings().get("BearerToken") or {}).get("value") or "").strip()
    scheme, _, token = header.partition(" ")
    if not token:
        scheme, token = "", scheme
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert or None, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file or None, private_key_path=cfg.key_file or None)


class _NotMainThread(logging.Filter):
    """Kopf warns that it ignores OS signals off the main thread: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not in the main thread" not in record.getMessage()


_NOT_MAIN_THREAD = _NotMainThread()


def operator_settings(kinds: list[Kind], streaming: bool) -> kopf.OperatorSettings:
    opts = kopf.OperatorSettings()
    settings.configure(opts, kinds, initial_streaming=streaming, server_timeout=WATCH_TIMEOUT)
    opts.process.ultimate_exiting_timeout = None  # see the module's docstring
    return opts


def registry(informers: Informers, kube: Any) -> kopf.OperatorRegistry:
    """The informers' index and event handlers, the login, and the binding of the
    listers to Kopf's indexes at start-up: nothing else."""
    reg = kopf.OperatorRegistry()
    informers.register(reg)

    @kopf.on.login(registry=reg, id="volplane.agent-login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection(kube.cfg)

    @kopf.on.startup(registry=reg, id="volplane.agent-startup")
    async def startup(**kwargs: Any) -> None:
        informers.bind(kwargs)  # Kopf's (still empty) indexes: populated before handlers

    return reg


async def run(informers: Informers, kube: Any, stop: asyncio.Event) -> None:
    """Run Kopf for the kinds declared on `informers` until `stop` is set (or Kopf
    ends: the caller starts over)."""
    streaming = await settings.initial_streaming(kube)
    kinds = list(informers.kinds.values())
    opts = operator_settings(kinds, streaming)
    reg = registry(informers, kube)
    logging.getLogger("kopf._core.reactor.running").addFilter(_NOT_MAIN_THREAD)
    log.info("agent watching", kinds=[k.plural for k in kinds],
             initial="stream" if streaming else "list")
    await kopf.operator(registry=reg, settings=opts, clusterwide=True, standalone=True,
                        stop_flag=stop)
