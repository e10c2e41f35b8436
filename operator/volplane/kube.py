"""The effect layer's one door to the Kubernetes API.

A thin JSON client over the `kubernetes` package's ApiClient (which owns
kubeconfig / in-cluster auth and TLS): raw dicts in and out, no model
classes, so a write costs one HTTP round trip and one json.loads. The
synchronous client runs in a bounded thread pool; a token bucket in front of
it is our client-side QPS limit (Kopf has none), and 429/5xx/connection errors
are retried with backoff. Conflicts (409) are NOT retried here: they mean the
decision was made on stale data and the caller must re-read and re-decide.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import __version__

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: Any = None):
        self.status = status
        self.reason = reason
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else None
        super().__init__(f"{status} {reason}: {msg or body}")

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and isinstance(self.body, dict) and (
            self.body.get("reason") == "AlreadyExists"
        )


class TokenBucket:
    """Client-side rate limit like client-go's flowcontrol: qps refill, burst size."""

    def __init__(self, qps: float, burst: int, clock=time.monotonic):
        self.qps = qps
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.clock = clock
        self.last = clock()
        self.lock = asyncio.Lock()

    def delay(self) -> float:
        """Take one token; return how long the caller must wait for it."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.qps)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.qps

    async def acquire(self) -> None:
        if self.qps <= 0:
            return
        async with self.lock:
            wait = self.delay()
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    conflicts: int = 0


class Kube:
    def __init__(self, kubeconfig: str | None = None, *, qps: float = 200.0, burst: int = 400,
                 workers: int = 16, retries: int = 5, user_agent: str | None = None):
        cfg = kubernetes.client.Configuration()
        try:
            if kubeconfig:
                kubernetes.config.load_kube_config(config_file=kubeconfig,
                                                   client_configuration=cfg)
            else:
                try:
                    kubernetes.config.load_incluster_config(client_configuration=cfg)
                except kubernetes.config.ConfigException:
                    kubernetes.config.load_kube_config(client_configuration=cfg)
        except Exception as e:  # a clear message beats a traceback here
            raise SystemExit(f"cannot load Kubernetes credentials: {e}") from e
        cfg.connection_pool_maxsize = workers
        self.api = kubernetes.client.ApiClient(cfg)
        # The field manager and audit user-agent: volplane's writes are identifiable.
        self.api.user_agent = user_agent or f"volplane/{__version__}"
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self.bucket = TokenBucket(qps, burst)
        self.retries = retries
        self.stats = Stats()
        # Called before every write; the leader elector installs a check that the lease
        # is still ours (so a paused-then-resumed ex-leader never writes).
        self.write_guard = None

    def _call(self, method: str, path: str, body: Any, query: dict | None,
              content_type: str) -> Any:
        # kubernetes>=35 (openapi-generator v7): serialize (auth, host), send, read.
        _, url, headers, payload, _ = self.api.param_serialize(
            method, path,
            query_params=list((query or {}).items()) or None,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(method, url, header_params=headers, body=payload,
                                     _request_timeout=60)
        except ApiException as e:
            raise ApiError(e.status or 0, e.reason or "", e.body) from None
        data = resp.read()
        if not 200 <= resp.status < 300:
            try:
                parsed = json.loads(data) if data else None
            except ValueError:
                parsed = data
            raise ApiError(resp.status, resp.reason or "", parsed)
        return json.loads(data) if data else None

    async def request(self, method: str, path: str, body: Any = None, *,
                      query: dict | None = None, content_type: str = "application/json") -> Any:
        if method != "GET" and self.write_guard is not None:
            self.write_guard()
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            await self.bucket.acquire()
            self.stats.requests += 1
            try:
                return await loop.run_in_executor(
                    self.pool, self._call, method, path, body, query, content_type)
            except ApiError as e:
                if e.conflict:
                    self.stats.conflicts += 1
                retryable = e.status == 429 or e.status >= 500
                if not retryable or attempt >= self.retries:
                    raise
            except Exception:  # connection errors from urllib3 surface as various types
                if attempt >= self.retries:
                    raise
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))

    # Conveniences ------------------------------------------------------------------------
    async def get(self, path: str, **kw) -> Any:
        return await self.request("GET", path, **kw)

    async def create(self, path: str, body: dict) -> Any:
        return await self.request("POST", path, body)

    async def replace(self, path: str, body: dict) -> Any:
        return await self.request("PUT", path, body)

    async def merge_patch(self, path: str, patch: dict) -> Any:
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def json_patch(self, path: str, ops: list) -> Any:
        return await self.request("PATCH", path, ops, content_type=JSON_PATCH)

    async def delete(self, path: str, body: dict | None = None) -> Any:
        return await self.request("DELETE", path, body)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.api.close()


def pv_path(name: str, sub: str = "") -> str:
    return f"/api/v1/persistentvolumes/{name}" + (f"/{sub}" if sub else "")


def pvc_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}" + (
        f"/{sub}" if sub else "")
