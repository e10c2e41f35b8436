"""The effect layer's one door to the Kubernetes API.

The `kubernetes` package loads the credentials (kubeconfig, in-cluster
service account, exec plugins, token refresh); the requests themselves go out
on aiohttp sessions in the event loop: raw dicts in and out, no model classes,
no thread pool, so a write costs one HTTP round trip and one json.loads and no
GIL hand-off. (Until 0.2 the kubernetes client's urllib3 ran in a 16-thread
pool; the profiles showed those threads competing with the event loop.)

A token bucket in front of every request is our client-side QPS limit (Kopf
has none), and 429/5xx/connection errors are retried with backoff. Conflicts
(409) are NOT retried here: they mean the decision was made on stale data and
the caller must re-read and re-decide. Kopf does the watching (informers.py) on its
own sessions, so long-lived streams never take a connection from the writes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import kubernetes

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
        self.cfg = cfg
        self.host = cfg.host.rstrip("/")
        self.ssl = _ssl_context(cfg)
        # The audit user-agent: volplane's writes are identifiable.
        self.user_agent = user_agent or f"volplane/{__version__}"
        self.workers = workers
        # One slot per connection: a request holding a slot never queues for a
        # connection, so nothing waits between the write guard and the send.
        self.slots = asyncio.Semaphore(workers * 2)
        # Shared by reference with the views `with_own_limit` makes.
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self.bucket = TokenBucket(qps, burst)
        self.retries = retries
        self.stats = Stats()
        # Called before every write; the leader elector installs a check that the lease
        # is still ours (so a paused-then-resumed ex-leader never writes).
        self.write_guard = None

    # Sessions are created lazily: they belong to the running event loop.
    def _new_session(self, limit: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl, limit=limit),
            headers={"User-Agent": self.user_agent, "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("Accept-Encoding",),
        )

    def _shared_session(self, name: str, limit: int) -> aiohttp.ClientSession:
        s = self._sessions.get(name)
        if s is None or s.closed:
            s = self._sessions[name] = self._new_session(limit)
        return s

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._shared_session("requests", self.workers * 2)

    def with_own_limit(self, qps: float, burst: int) -> Kube:
        """The same client (credentials, connections, write guard, stats) with a token
        bucket of its own."""
        view = copy.copy(self)
        view.bucket = TokenBucket(qps, burst)
        return view

    def _auth(self) -> dict:
        # auth_settings() runs the client's refresh hook (in-cluster token rotation).
        token = self.cfg.auth_settings().get("BearerToken")
        if token and token.get("value"):
            return {"Authorization": token["value"]}
        return {}

    def url(self, path: str, query: dict | None = None) -> str:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return self.host + path + ("?" + urlencode(q) if q else "")

    async def _call(self, method: str, path: str, body: Any, query: dict | None,
                    content_type: str) -> Any:
        headers = self._auth()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        async with self.session.request(
                method, self.url(path, query), data=data, headers=headers,
                proxy=self.cfg.proxy or None,
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10)) as resp:
            raw = await resp.read()
            if not 200 <= resp.status < 300:
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = raw.decode(errors="replace")
                raise ApiError(resp.status, resp.reason or "", parsed)
            return json.loads(raw) if raw else None

    async def request(self, method: str, path: str, body: Any = None, *,
                      query: dict | None = None, content_type: str = "application/json") -> Any:
        attempt = 0
        while True:
            await self.bucket.acquire()
            try:
                async with self.slots:
                    # The guard runs after every wait (token bucket, free connection) and
                    # right before the bytes go out: a leader paused mid-wait (SIGSTOP,
                    # a VM freeze) checks its lease when it resumes, not before it paused.
                    if method != "GET" and self.write_guard is not None:
                        self.write_guard()
                    self.stats.requests += 1
                    return await self._call(method, path, body, query, content_type)
            except ApiError as e:
                if e.conflict:
                    self.stats.conflicts += 1
                retryable = e.status == 429 or e.status >= 500
                if not retryable or attempt >= self.retries:
                    raise
            except (TimeoutError, aiohttp.ClientError, OSError):
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

    async def aclose(self) -> None:
        for s in list(self._sessions.values()):
            if not s.closed:
                await s.close()


def _ssl_context(cfg) -> ssl.SSLContext:
    """TLS as the kubernetes client would set it up from the same configuration."""
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


async def get_or_none(kube: Any, path: str) -> Any:
    """The object at path, or None when the API server says it does not exist (kube: the
    Kube door, or anything with its async get)."""
    try:
        return await kube.get(path)
    except ApiError as e:
        if e.not_found:
            return None
        raise


def pv_path(name: str, sub: str = "") -> str:
    return f"/api/v1/persistentvolumes/{name}" + (f"/{sub}" if sub else "")


def pvc_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}" + (
        f"/{sub}" if sub else "")
