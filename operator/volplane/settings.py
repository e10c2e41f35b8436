"""Every Kopf setting volplane uses, in one place, so the load profile can be reviewed.

What this means for the API server:
- posting: Kopf does not turn log lines into Events; controllers post the
  upstream-style Events themselves (events.py), deduplicated.
- persistence: volplane registers no on.create/update/delete/daemon/timer
  handlers for built-in objects, so Kopf never writes its progress or diff-base
  annotations or its finalizer onto PVs, PVCs, Pods or Nodes. The storages are
  still set to volplane-owned keys so that a stray handler could never collide
  with another Kopf operator's annotations.
- watching: one watch stream per resource kind, cluster-wide; the server-side
  timeout makes streams reconnect periodically, like client-go's reflector.
- queueing/batching: no worker limit (a limit below the object count can
  deadlock index population); a short batch window so an object's events are
  handed to the controllers within milliseconds.
- peering: off; high availability uses a coordination.k8s.io Lease instead.
"""

from __future__ import annotations

import logging

import kopf


def configure(settings: kopf.OperatorSettings) -> None:
    settings.posting.enabled = False
    settings.posting.level = logging.WARNING

    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="volplane.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="volplane.io", key="last-handled-configuration")
    settings.persistence.finalizer = "volplane.io/kopf-finalizer"

    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0

    settings.queueing.worker_limit = None
    settings.batching.batch_window = 0.01
    settings.batching.idle_timeout = 30.0
    settings.batching.exit_timeout = 2.0

    settings.peering.standalone = True
    settings.networking.request_timeout = 60
