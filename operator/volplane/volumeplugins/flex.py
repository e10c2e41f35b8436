"""FlexVolume: drivers are executables called with a command and JSON options.

Upstream pkg/volume/flexvolume, the controller's half. A driver lives at
``<plugin dir>/<vendor>~<driver>/<driver>`` and answers every call with one JSON object
on stdout (stdout and stderr are read together, as upstream's CombinedOutput does)::

    {"status": "Success" | "Failure" | "Not supported", "message": "...",
     "device": "/dev/...", "volumeName": "...", "attached": true|false,
     "capabilities": {"attach": true, ...}, "volumeNewSize": 123}

Command lines (upstream's, argument for argument):

    init
    getvolumename <json>
    attach        <json> <node>            -> "device"
    isattached    <json> <node>            -> "attached"
    detach        <volume name> <node>     (the PV or pod volume name, not a device)
    waitforattach <device> <json>          (kubelet; the rest below too)
    mountdevice   <mount dir> <device> <json>
    unmountdevice <mount dir>
    mount         <mount dir> <json>
    unmount       <mount dir>

The JSON options (upstream NewOptionsForDriver, keys sorted as Go's json.Marshal writes
a map): ``kubernetes.io/fsType`` (the source's fsType, "" when unset),
``kubernetes.io/readwrite`` ("ro"/"rw"), ``kubernetes.io/pvOrVolumeName``, then the
caller's extra options, then the source's ``options`` (which win over both). The
controller's calls (attach, isattached, getvolumename) carry no extra options; only the
kubelet's ``mount`` adds ``kubernetes.io/pod.{name,namespace,uid}``,
``kubernetes.io/serviceAccount.name``, ``kubernetes.io/mounterArgs.FsGroup`` and
``kubernetes.io/secret/<key>`` (base64 of the secretRef Secret's data; the Secret's type
must be the driver name). ``mount_options`` builds that set from data the caller read.

How answers are handled (upstream DriverCall.Run / handleCmdResponse):

* "Success" and exit 0: the answer is used; missing capabilities default to
  attach, selinuxRelabel, fsGroup, requiresFSResize true and supportsMetrics false.
* "Failure" (any status other than Success / Not supported): an error
  ``<cmd> command failed, status: <status>, reason: <message>``.
* "Not supported": an error the caller falls back on, and the command is remembered as
  unsupported for the life of this plugin instance (until the prober re-probes the
  driver), so it is never executed again: attach -> success with no device path,
  detach -> success, isattached -> "cannot tell" (the caller keeps its state),
  getvolumename -> the plugin's own naming. ``init`` answering Not supported fails the
  probe, as upstream.
* Output that is not a JSON object of the right shape: an error naming the field.
* A non-zero exit with a Success answer: a driver bug, reported as an error.
* A run longer than the timeout: SIGTERM to the driver's process group, SIGKILL after a
  grace period, error ``timed out``. Upstream only bounds waitforattach (the kubelet's
  timeout); a hung attach would block its operation forever. volplane bounds every call
  (``call_timeout``, default 120 s) so a hung driver costs one retry, not a worker.

Every error is a ``FlexVolumeError`` whose text names the driver and the command
("flexVolume driver volplane-demo/disk: attach command failed, ..."), ready for the
controller's FailedAttachVolume / FailedDetachVolume Events.

Naming: the unique volume name of a flex volume is ``<driver>/<PV or volume name>``
(upstream GetUniqueVolumeNameFromSpec with the driver name as plugin name).
``getvolumename`` is called as upstream does (an error fails the lookup), but its
``volumeName`` is ignored, as upstream ignores it: the kubelet names volumes the same
way, and node.status.volumesAttached must match its volumesInUse.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import logs
from . import metrics
from .spec import VolumeSpec, multi_attach_allowed

log = logs.get("flexvolume")

# -- protocol names (upstream driver-call.go) -----------------------------------------------
INIT = "init"
GET_VOLUME_NAME = "getvolumename"
IS_ATTACHED = "isattached"
ATTACH = "attach"
WAIT_FOR_ATTACH = "waitforattach"
MOUNT_DEVICE = "mountdevice"
DETACH = "detach"
UNMOUNT_DEVICE = "unmountdevice"
MOUNT = "mount"
UNMOUNT = "unmount"
EXPAND_VOLUME = "expandvolume"
EXPAND_FS = "expandfs"

OPTION_FS_TYPE = "kubernetes.io/fsType"
OPTION_READ_WRITE = "kubernetes.io/readwrite"
OPTION_KEY_SECRET = "kubernetes.io/secret"
OPTION_FS_GROUP = "kubernetes.io/mounterArgs.FsGroup"
OPTION_PV_OR_VOLUME_NAME = "kubernetes.io/pvOrVolumeName"
OPTION_POD_NAME = "kubernetes.io/pod.name"
OPTION_POD_NAMESPACE = "kubernetes.io/pod.namespace"
OPTION_POD_UID = "kubernetes.io/pod.uid"
OPTION_SERVICE_ACCOUNT_NAME = "kubernetes.io/serviceAccount.name"

STATUS_SUCCESS = "Success"
STATUS_FAILURE = "Failure"
STATUS_NOT_SUPPORTED = "Not supported"

DEFAULT_CALL_TIMEOUT = 120.0
DEFAULT_KILL_GRACE = 10.0   # upstream exec Stop(): SIGTERM, SIGKILL 10 s later
MAX_OUTPUT = 1 << 20        # a driver printing more than 1 MiB is broken
SOURCE = "flexVolume"


# -- errors ---------------------------------------------------------------------------------
class FlexVolumeError(Exception):
    """A driver call that did not succeed. ``kind`` is the metrics status: failure,
    not_supported, invalid_output, timeout, exec_error, driver_bug, or options (the call
    could not be built)."""

    def __init__(self, driver: str, command: str, kind: str, detail: str):
        super().__init__(detail)
        self.driver = driver
        self.command = command
        self.kind = kind
        self.detail = detail

    @property
    def not_supported(self) -> bool:
        return self.kind == "not_supported"

    def __str__(self) -> str:
        return f"flexVolume driver {self.driver}: {self.detail}"


# -- answers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """upstream DriverCapabilities; defaults are defaultCapabilities()."""
    attach: bool = True
    selinux_relabel: bool = True
    supports_metrics: bool = False
    fs_group: bool = True
    requires_fs_resize: bool = True


@dataclass(frozen=True)
class DriverStatus:
    status: str
    message: str = ""
    device: str = ""
    volume_name: str = ""
    attached: bool = False
    capabilities: Capabilities = field(default_factory=Capabilities)
    volume_new_size: int = 0


# JSON member -> (attribute, type). Go's encoding/json matches member names to fields
# case-insensitively (the last matching member wins), so "Status" works like "status".
_STATUS_FIELDS = {"status": ("status", str), "message": ("message", str),
                  "device": ("device", str), "volumename": ("volume_name", str),
                  "attached": ("attached", bool), "capabilities": ("capabilities", dict),
                  "volumenewsize": ("volume_new_size", int)}
_CAP_FIELDS = {"attach": "attach", "selinuxrelabel": "selinux_relabel",
               "supportsmetrics": "supports_metrics", "fsgroup": "fs_group",
               "requiresfsresize": "requires_fs_resize"}
_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object"}


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _typed(v: Any, want: type) -> bool:
    if want is bool:
        return isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < (1 << 63)
    return isinstance(v, want)


def _shown(output: bytes | str, limit: int = 200) -> str:
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode_status(command: str, output: bytes | str) -> tuple[DriverStatus | None, str | None]:
    """Pure: a driver's output as (DriverStatus, None), or (None, why it is not a valid
    answer). Does not judge the status (see ``check_status``)."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(doc, dict):
        return None, f"a JSON {_json_type(doc)}, not an object"
    values: dict[str, Any] = {}
    caps = Capabilities()
    for key, v in doc.items():
        known = _STATUS_FIELDS.get(key.lower())
        if known is None or v is None:  # unknown members and nulls are ignored, as in Go
            continue
        attr, want = known
        if not _typed(v, want):
            return None, f'"{key}" is a JSON {_json_type(v)}, want {_TYPE_NAMES[want]}'
        if attr == "capabilities":
            cvals = {}
            for ck, cv in v.items():
                cattr = _CAP_FIELDS.get(ck.lower())
                if cattr is None or cv is None:
                    continue
                if not isinstance(cv, bool):
                    return None, (f'"{key}.{ck}" is a JSON {_json_type(cv)}, want a boolean')
                cvals[cattr] = cv
            caps = Capabilities(**{**caps.__dict__, **cvals})
            continue
        values[attr] = v
    return DriverStatus(capabilities=caps, **{"status": "", **values}), None


def check_status(driver: str, command: str, output: bytes | str,
                 exit_code: int | None = 0) -> DriverStatus:
    """Pure: upstream handleCmdResponse. Returns the answer of a successful call, raises
    FlexVolumeError for an invalid answer, a Failure or Not supported."""
    status, why = decode_status(command, output)
    if status is None:
        exited = f"exited with status {exit_code} and " if exit_code else ""
        raise FlexVolumeError(driver, command, "invalid_output",
                              f"{command} command {exited}printed an invalid answer: {why}; "
                              f"output: {_shown(output)}")
    if status.status == STATUS_NOT_SUPPORTED:
        raise FlexVolumeError(driver, command, "not_supported",
                              f"{command} command: {STATUS_NOT_SUPPORTED}")
    if status.status != STATUS_SUCCESS:
        raise FlexVolumeError(driver, command, "failure",
                              f"{command} command failed, status: {status.status}, "
                              f"reason: {status.message}")
    return status


@dataclass(frozen=True)
class ExecResult:
    """What running a driver produced (the effect's whole output)."""
    returncode: int | None = None
    output: bytes = b""
    timed_out: bool = False
    start_error: str | None = None
    truncated: bool = False


def interpret(driver: str, command: str, result: ExecResult, timeout: float | None
              ) -> DriverStatus:
    """Pure: upstream DriverCall.Run after the exec. Raises FlexVolumeError."""
    if result.start_error is not None:
        raise FlexVolumeError(driver, command, "exec_error",
                              f"{command} command could not be executed: {result.start_error}")
    if result.timed_out:
        raise FlexVolumeError(driver, command, "timeout",
                              f"{command} command timed out after {timeout:g}s")
    if result.truncated:
        raise FlexVolumeError(driver, command, "invalid_output",
                              f"{command} command printed more than {MAX_OUTPUT} bytes; "
                              f"output starts: {_shown(result.output)}")
    if result.returncode != 0:
        check_status(driver, command, result.output, result.returncode)
        raise FlexVolumeError(driver, command, "driver_bug",
                              f"{command} command exited with status {result.returncode} "
                              f"but answered {STATUS_SUCCESS} (driver bug)")
    return check_status(driver, command, result.output)


# -- options (pure) -------------------------------------------------------------------------
def go_json(options: Mapping[str, str]) -> str:
    """A map[string]string as Go's json.Marshal writes it: keys sorted, no spaces, <>&
    and U+2028/U+2029 escaped, other non-ASCII as UTF-8."""
    text = json.dumps(dict(sorted(options.items())), ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def flex_source(spec: VolumeSpec) -> Mapping[str, Any] | None:
    return spec.source(SOURCE)


def flex_driver_of(spec: VolumeSpec) -> str | None:
    src = flex_source(spec)
    return (src or {}).get("driver") or None


def driver_options(driver: str, command: str, spec: VolumeSpec,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """upstream NewOptionsForDriver. ``readwrite`` comes from the inline source's
    ``readOnly``, or for a PV from the pod's claim (``spec.read_only``), not from
    ``pv.spec.flexVolume.readOnly`` (upstream getReadOnly)."""
    src = flex_source(spec)
    if src is None:
        raise FlexVolumeError(driver, command, "options", "not a flex volume")
    read_only = spec.read_only if spec.pv is not None else bool(src.get("readOnly"))
    options = {OPTION_FS_TYPE: src.get("fsType") or "",
               OPTION_READ_WRITE: "ro" if read_only else "rw",
               OPTION_PV_OR_VOLUME_NAME: spec.name}
    options.update(extra or {})
    for k, v in (src.get("options") or {}).items():
        options[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return options


def secret_ref(spec: VolumeSpec, pod_namespace: str) -> tuple[str, str] | None:
    """upstream getSecretNameAndNamespace: (namespace, name) of the flex source's
    secretRef, or None. Inline volumes use the pod's namespace; a PV's secretRef may name
    its own namespace and falls back to the pod's."""
    src = flex_source(spec) or {}
    ref = src.get("secretRef")
    if not ref or not ref.get("name"):
        return None
    ns = pod_namespace
    if spec.pv is not None and ref.get("namespace"):
        ns = ref["namespace"]
    return (ns, ref["name"]) if ns else None


def secret_options(driver: str, secret: Mapping[str, Any]) -> dict[str, str]:
    """upstream addSecretsToOptions + GetSecretForPV, given the Secret object the caller
    read: ``kubernetes.io/secret/<key>`` = base64 of each data value. The Secret's type
    must be the driver's name."""
    if (secret.get("type") or "") != driver:
        raise FlexVolumeError(driver, MOUNT, "options", f"cannot get secret of type {driver}")
    out = {}
    for key, value in (secret.get("data") or {}).items():
        raw = base64.b64decode(value or "")
        out[f"{OPTION_KEY_SECRET}/{key}"] = base64.b64encode(raw).decode()
    return out


def mount_options(driver: str, spec: VolumeSpec, pod: Mapping[str, Any], *,
                  secret: Mapping[str, Any] | None = None,
                  fs_group: int | None = None) -> dict[str, str]:
    """The options upstream's kubelet passes to ``mount`` (flexVolumeMounter.SetUpAt): pod
    and service account names, the secret's keys, the fsGroup, then NewOptionsForDriver.
    volplane's controller never calls mount; this is for node-side tools and tests."""
    md = pod.get("metadata") or {}
    extra = {OPTION_POD_NAME: md.get("name") or "",
             OPTION_POD_NAMESPACE: md.get("namespace") or "",
             OPTION_POD_UID: md.get("uid") or "",
             OPTION_SERVICE_ACCOUNT_NAME: (pod.get("spec") or {}).get("serviceAccountName") or ""}
    if secret is not None:
        extra.update(secret_options(driver, secret))
    if fs_group is not None:
        extra[OPTION_FS_GROUP] = str(int(fs_group))
    return driver_options(driver, MOUNT, spec, extra)


def unescape_qualified_name(dir_name: str) -> str:
    """k8s.io/utils/strings.UnescapeQualifiedName: ``vendor~driver`` -> ``vendor/driver``."""
    return dir_name.replace("~", "/")


def executable_name(driver: str) -> str:
    return driver.split("/")[-1]


# -- the effect: running a driver -----------------------------------------------------------
async def _drain(stream: asyncio.StreamReader, limit: int, on_overflow) -> tuple[bytes, bool]:
    """Read to EOF, keeping the first ``limit`` bytes; calls ``on_overflow`` once when more
    arrive (the rest is read and dropped so the pipe, and the process, can finish)."""
    chunks: list[bytes] = []
    size, truncated = 0, False
    while chunk := await stream.read(65536):
        if truncated:
            continue
        if size + len(chunk) > limit:
            chunks.append(chunk[:limit - size])
            truncated = True
            on_overflow()
            continue
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), truncated


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def _reap(proc: asyncio.subprocess.Process, reader: asyncio.Future, grace: float) -> None:
    """After the group got SIGKILL: wait for the exit and the pipe's EOF; if a process
    outside the group still holds the pipe, close it (the transport) and stop reading."""
    try:
        await asyncio.wait_for(asyncio.gather(proc.wait(), asyncio.shield(reader)), grace)
    except TimeoutError:
        transport = getattr(proc, "_transport", None)  # asyncio has no public close
        if transport is not None:
            transport.close()
        reader.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), grace)


async def execute(path: str, args: Sequence[str], timeout: float | None,
                  kill_grace: float = DEFAULT_KILL_GRACE) -> ExecResult:
    """Run ``path args...`` in its own process group with stdout+stderr captured together
    (stdin /dev/null), like upstream's CombinedOutput: done when the driver exited and
    its output pipe closed.

    Past ``timeout`` the group gets SIGTERM, and SIGKILL ``kill_grace`` seconds later
    (upstream exec Stop()). Output beyond MAX_OUTPUT kills the group at once."""
    try:
        proc = await asyncio.create_subprocess_exec(
            path, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return ExecResult(start_error=f"{path}: {e.strerror or e}")
    reader = asyncio.ensure_future(
        _drain(proc.stdout, MAX_OUTPUT, lambda: _signal_group(proc, signal.SIGKILL)))
    try:
        async with asyncio.timeout(timeout):
            output, truncated = await asyncio.shield(reader)
            rc = await proc.wait()
        return ExecResult(returncode=rc, output=output, truncated=truncated)
    except TimeoutError:
        _signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(proc.wait(), asyncio.shield(reader)),
                                   kill_grace)
        except TimeoutError:
            _signal_group(proc, signal.SIGKILL)
            await _reap(proc, reader, kill_grace)
        return ExecResult(returncode=proc.returncode, timed_out=True)
    except BaseException:  # cancelled: leave nothing running
        _signal_group(proc, signal.SIGKILL)
        await asyncio.shield(_reap(proc, reader, kill_grace))
        raise


class FlexDriver:
    """One driver executable and what volplane learned about it: the commands it does
    not support (upstream's per-plugin unsupportedCommands)."""

    def __init__(self, plugin_dir: str, dir_name: str, *,
                 call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
                 kill_grace: float = DEFAULT_KILL_GRACE):
        self.dir_name = dir_name
        self.name = unescape_qualified_name(dir_name)
        self.path = os.path.join(plugin_dir, dir_name, executable_name(self.name))
        self.call_timeout = call_timeout
        self.kill_grace = kill_grace
        self.unsupported: set[str] = set()

    async def call(self, command: str, *args: str, timeout: float | None = None
                   ) -> DriverStatus:
        """Run one command; returns the Success answer or raises FlexVolumeError. A command
        that answered Not supported before is not run again."""
        if command in self.unsupported:
            raise FlexVolumeError(self.name, command, "not_supported",
                                  f"{command} command: {STATUS_NOT_SUPPORTED}")
        timeout = self.call_timeout if timeout is None else timeout
        t0 = time.monotonic()
        result = await execute(self.path, [command, *args], timeout or None, self.kill_grace)
        elapsed = time.monotonic() - t0
        try:
            status = interpret(self.name, command, result, timeout)
        except FlexVolumeError as e:
            metrics.record_call(self.name, command, e.kind, elapsed)
            if e.not_supported:
                self.unsupported.add(command)
                log.debug("driver command not supported", driver=self.name, command=command)
            else:
                log.warning("driver call failed", driver=self.name, command=command,
                            path=self.path, args=list(args), error=e.detail,
                            exit_code=result.returncode)
            raise
        metrics.record_call(self.name, command, "success", elapsed)
        return status


# -- the plugin -----------------------------------------------------------------------------
FLEX_VOLUME_PLUGIN_NAME = "kubernetes.io/flexvolume"
ATTACH_BY_EXEC = "exec"


class FlexVolumePlugin:
    """One probed FlexVolume driver as a volume plugin (upstream flexVolumePlugin, and
    flexVolumeAttachablePlugin when ``init`` said attach: true).

    The attach/detach controller uses only ``attachable`` drivers and calls, besides the
    pure methods, ``get_volume_name``, ``attach``, ``volumes_are_attached`` and
    ``detach``. Calling those on a driver without attach support raises, so an attach:
    false driver is never executed for them."""

    attach_mechanism = ATTACH_BY_EXEC

    def __init__(self, driver: FlexDriver, capabilities: Capabilities):
        self.driver = driver
        self.capabilities = capabilities

    @classmethod
    async def probe(cls, plugin_dir: str, dir_name: str, **driver_kw) -> FlexVolumePlugin:
        """upstream pluginFactory.NewFlexVolumePlugin: run ``init`` and keep its
        capabilities. Raises FlexVolumeError (Not supported included) when init fails."""
        driver = FlexDriver(plugin_dir, dir_name, **driver_kw)
        status = await driver.call(INIT)
        return cls(driver, status.capabilities)

    @property
    def name(self) -> str:
        return self.driver.name

    @property
    def attachable(self) -> bool:
        return self.capabilities.attach

    def __repr__(self) -> str:
        return f"<FlexVolumePlugin {self.name} attach={self.attachable}>"

    # pure
    def can_support(self, spec: VolumeSpec) -> bool:
        return flex_driver_of(spec) == self.name

    def can_attach(self, spec: VolumeSpec, *, csi_drivers: Mapping[str, Mapping] | None = None
                   ) -> bool:
        return self.attachable and self.can_support(spec)

    def multi_attach_allowed(self, spec: VolumeSpec) -> bool:
        return multi_attach_allowed(spec)

    def default_volume_name(self, spec: VolumeSpec) -> str:
        """upstream pluginDefaults.GetVolumeName: the PV or pod volume name."""
        return spec.name

    def metric_plugin_name(self, spec: VolumeSpec | None = None) -> str:
        return self.name

    # driver calls
    def _require_attach(self, command: str) -> None:
        if not self.attachable:
            raise FlexVolumeError(self.name, command, "options",
                                  "driver does not support attach (init: attach false)")

    async def get_volume_name(self, spec: VolumeSpec) -> str:
        """upstream flexVolumePlugin.GetVolumeName: call getvolumename; Not supported or
        Success both give the PV or pod volume name; a failure raises."""
        try:
            await self.driver.call(GET_VOLUME_NAME,
                                   go_json(driver_options(self.name, GET_VOLUME_NAME, spec)))
        except FlexVolumeError as e:
            if not e.not_supported:
                raise
        name = self.default_volume_name(spec)
        if not name:
            raise FlexVolumeError(self.name, GET_VOLUME_NAME, "options", "volume has no name")
        return name

    async def attach(self, spec: VolumeSpec, node: str) -> str:
        """``attach <json> <node>``; returns the device path for
        node.status.volumesAttached[].devicePath ("" when the driver gives none or does
        not support attach: upstream attacherDefaults)."""
        self._require_attach(ATTACH)
        opts = go_json(driver_options(self.name, ATTACH, spec))
        try:
            status = await self.driver.call(ATTACH, opts, node)
        except FlexVolumeError as e:
            if e.not_supported:
                log.warning("using default Attach", driver=self.name, volume=spec.name,
                            node=node)
                return ""
            raise
        return status.device

    async def volumes_are_attached(self, specs: Sequence[VolumeSpec], node: str
                                   ) -> list[bool] | None:
        """upstream VolumesAreAttached: ``isattached <json> <node>`` per spec, in order.
        None when the driver does not support isattached (the caller keeps its state);
        the first failing call raises."""
        self._require_attach(IS_ATTACHED)
        out = []
        for spec in specs:
            opts = go_json(driver_options(self.name, IS_ATTACHED, spec))
            try:
                status = await self.driver.call(IS_ATTACHED, opts, node)
            except FlexVolumeError as e:
                if e.not_supported:
                    return None
                raise
            out.append(bool(status.attached))
        return out

    async def detach(self, volume_name: str, node: str) -> None:
        """``detach <volume name> <node>``; ``volume_name`` is what get_volume_name gave
        (the part of the unique name after ``<driver>/``). Not supported counts as done."""
        self._require_attach(DETACH)
        try:
            await self.driver.call(DETACH, volume_name, node)
        except FlexVolumeError as e:
            if not e.not_supported:
                raise
            log.warning("using default Detach", driver=self.name, volume=volume_name, node=node)

