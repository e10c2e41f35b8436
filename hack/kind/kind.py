#!/usr/bin/env python3
"""kind clusters for volplane, assembled offline from Debian packages and Go modules.

    hack/kind/kind.py up        # engine, images, cluster, volplane installed; prints the kubeconfig
    hack/kind/kind.py down      # delete the cluster and stop the engine this script started
    hack/kind/kind.py status    # engine, cluster, nodes, the operator Deployment
    hack/kind/kind.py build     # only the images (node image, component images, operator image)
    hack/kind/kind.py engine    # only start the Docker engine
    hack/kind/kind.py image     # only the operator image (volplane:dev)

No step pulls from a container registry: every image is built here, `FROM scratch`
or from a root filesystem made with debootstrap, and every program in them is built
from its Go module through the Go module proxy. What was built is cached by version
under ~/.cache/volplane/kind (VOLPLANE_CACHE), so a second run rebuilds nothing.
../shared/KIND-OFFLINE.md has the measured facts this follows; the four blockers and
what gets past them:

1. the machine's capability bounding set may lack CAP_SYS_RESOURCE, which
   `docker run --privileged` asks for: dockerd then runs containers through
   hack/kind/runc-wrapper (drops that one capability), only where it is missing;
2. runc inside the node cannot write oom_score_adj for the same reason: the node's
   containerd runs with `restrict_oom_score_adj = true`;
3. the host is cgroup v1: the kubelet runs with `failCgroupV1: false`
   (hack/kind-config.yaml);
4. kindnetd is not served by the Go module proxy: each node gets a static ptp +
   host-local CNI config for its own podCIDR and routes to every other node's
   podCIDR (what kindnetd does), set up by this script after the nodes join.

Standard library only, plus pytest-kind (the project's test dependency) to drive the
`kind` binary built here. Importable: up() -> kubeconfig path, down(), status().
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CLUSTER_NAME = os.environ.get("VOLPLANE_KIND_CLUSTER", "volplane")
# What a change of the image recipes below must bump (the versions are keyed separately).
RECIPE = "node-4"
GOPROXY = os.environ.get("VOLPLANE_GOPROXY", "https://proxy.golang.org")

# Debian packages of the node's root filesystem: what kind's base image installs,
# less NFS/iSCSI/fuse/curl, plus xfsprogs (the CSI node plugin formats xfs too). jq is
# what kind's createContainer hook (mount-product-files.sh) parses the OCI state with.
# openssh-server: installed, not enabled; upstream's e2e suites restart the kubelet over
# SSH (their [Disruptive] tests), so hack/e2e-upstream starts it with its own key
# (enable_ssh below).
NODE_PACKAGES = (
    "systemd systemd-sysv dbus conntrack iptables nftables iproute2 ethtool util-linux "
    "mount kmod libseccomp2 pigz e2fsprogs xfsprogs bash ca-certificates procps jq "
    "openssh-server"
).split()
# The operator image: Debian's python3 and what the CSI node plugin calls
# (losetup/blkid in util-linux and mount, mkfs.ext4/resize2fs, mkfs.xfs/xfs_growfs).
OPERATOR_PACKAGES = "python3 util-linux mount e2fsprogs xfsprogs ca-certificates".split()
# Test images the e2e suites run (busybox from Debian's static build).
BUSYBOX_PACKAGES = ["busybox-static"]

OPERATOR_IMAGE = os.environ.get("VOLPLANE_IMAGE", "volplane:dev")
BUSYBOX_IMAGE = "volplane/busybox:1.35"
# Where every kind node sees the shared pool directory (a host directory, like a SAN
# all nodes reach) and how many loop device nodes exist before nodes start (a
# privileged container sees the host's /dev as it was when it started).
NODE_POOL_DIR = "/var/lib/volplane"
LOOP_DEVICES = 64


def log(msg: str) -> None:
    print(f"kind: {msg}", file=sys.stderr, flush=True)


class KindError(RuntimeError):
    pass


class EngineUnavailable(KindError):
    """No Docker engine answers and none can be started here (no dockerd)."""


# ----------------------------------------------------------------------------- layout


def cache_root() -> Path:
    base = os.environ.get("VOLPLANE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "volplane")
    return Path(base) / "kind"


def local_dir() -> Path:
    return REPO_ROOT / ".local" / "kind"


def kubeconfig_path() -> Path:
    return local_dir() / "kubeconfig"


def _have_kubeconfig() -> bool:
    """This checkout has the cluster's kubeconfig (pytest-kind touches an empty one)."""
    p = kubeconfig_path()
    return p.exists() and p.stat().st_size > 0


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    out["KUBERNETES_VERSION"] = _go_mod_version("k8s", "k8s.io/kubernetes")
    out["ETCD_VERSION"] = _go_mod_version("etcd", "go.etcd.io/etcd/server/v3")
    return out


def _go_mod_version(subdir: str, module: str) -> str:
    for line in (REPO_ROOT / "hack" / subdir / "go.mod").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2] == module:
            return parts[-1]
        if len(parts) >= 3 and parts[0] == "require" and parts[1] == module:
            return parts[2]
    raise KindError(f"hack/{subdir}/go.mod does not require {module}")


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _run(argv: list[str], *, env: dict | None = None, cwd: Path | None = None,
         input: bytes | str | None = None, capture: bool = False, check: bool = True,
         quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        log("$ " + " ".join(str(a) for a in argv))
    text = not isinstance(input, bytes)
    proc = subprocess.run([str(a) for a in argv], env={**os.environ, **(env or {})}, cwd=cwd,
                          input=input, text=text,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if capture else ""
        raise KindError(f"{argv[0]} {' '.join(str(a) for a in argv[1:3])}... failed "
                        f"(exit {proc.returncode}) {detail}")
    return proc


@contextlib.contextmanager
def _locked(name: str):
    """One build or cluster change at a time (make kind and pytest --kind may race)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------- engine


def _docker_env() -> dict[str, str]:
    return {}


def docker(*args: str, capture: bool = True, check: bool = True, input=None,
           quiet: bool = True) -> subprocess.CompletedProcess:
    return _run(["docker", *args], capture=capture, check=check, input=input, quiet=quiet)


def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return docker("info", "--format", "{{.ServerVersion}}", check=False).returncode == 0


def lacks_cap_sys_resource() -> bool:
    """CAP_SYS_RESOURCE (capability 24) missing from this process's bounding set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not (int(line.split()[1], 16) >> 24) & 1
    return False


def _engine_dir() -> Path:
    return cache_root() / "docker"


def engine_up() -> None:
    """Starts dockerd (Debian's docker.io) in the background unless an engine answers."""
    if engine_answers():
        return
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise EngineUnavailable("no Docker engine answers and dockerd is not installed "
                                "(`make setup` installs Debian's docker.io where it runs as "
                                "root with apt)")
    d = _engine_dir()
    d.mkdir(parents=True, exist_ok=True)
    argv = [dockerd, "--data-root", str(d / "data"), "--exec-root", "/run/volplane-docker",
            "--pidfile", "/run/volplane-docker.pid", "--host", "unix:///var/run/docker.sock"]
    if lacks_cap_sys_resource():
        wrapper = build_runc_wrapper()
        argv += ["--add-runtime", f"volplane-runc={wrapper}",
                 "--default-runtime", "volplane-runc"]
        log("CAP_SYS_RESOURCE is not in the bounding set: containers run through "
            "hack/kind/runc-wrapper")
    log("starting dockerd (logs: " + str(d / "dockerd.log") + ")")
    with open(d / "dockerd.log", "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.monotonic() + 60
    while not engine_answers():
        if time.monotonic() > deadline:
            raise KindError(f"dockerd did not answer within 60 s; see {d / 'dockerd.log'}")
        time.sleep(0.5)
    (d / "started-by-volplane").write_text(str(time.time()))


def engine_down() -> None:
    marker = _engine_dir() / "started-by-volplane"
    pidfile = Path("/run/volplane-docker.pid")
    if not marker.exists() or not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        return
    log(f"stopping dockerd (pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- Go builds


def _go_env(cgo: bool = False) -> dict[str, str]:
    return {"GOPROXY": GOPROXY, "GOFLAGS": "-buildvcs=false", "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "1" if cgo else "0"}


def _bin_dir(name: str) -> Path:
    return cache_root() / "bin" / name


def _go_install(name: str, packages: list[str], *, cgo: bool = False, tags: str = "",
                ldflags: str = "-s -w") -> Path:
    """`go install pkg@version` (module mode, the module's own go.mod) into a cache dir."""
    out = _bin_dir(name)
    if (out / ".done").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    argv = ["go", "install", "-trimpath", "-ldflags", ldflags]
    if tags:
        argv += ["-tags", tags]
    _run([*argv, *packages], env={**_go_env(cgo), "GOBIN": str(tmp)})
    (tmp / ".done").write_text(f"{time.monotonic() - start:.0f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"built {name} in {time.monotonic() - start:.0f} s")
    return out


def build_runc_wrapper() -> Path:
    src = HERE / "runc-wrapper"
    key = _digest((src / "main.go").read_text(), shutil.which("runc"))
    out = _bin_dir(f"runc-wrapper-{key}") / "runc-wrapper"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    real = shutil.which("runc") or "/usr/sbin/runc"
    _run(["go", "build", "-trimpath", "-ldflags", f"-s -w -X main.realRuntime={real}",
          "-o", str(out), "."], env=_go_env(), cwd=src)
    return out


def _k8s_module_dir() -> Path:
    proc = _run(["go", "list", "-m", "-json", "k8s.io/kubernetes"], env=_go_env(),
                cwd=REPO_ROOT / "hack" / "k8s", capture=True, quiet=True)
    return Path(json.loads(proc.stdout)["Dir"])


def _k8s_ldflags(version: str) -> str:
    minor = version.split(".")[1]
    flags = ["-s", "-w"]
    for p in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        flags += [f"-X {p}.gitVersion={version}", f"-X {p}.gitMajor=1",
                  f"-X {p}.gitMinor={minor}", f"-X {p}.gitTreeState=clean",
                  f"-X {p}.buildDate=1970-01-01T00:00:00Z"]
    return " ".join(flags)


def build_kubernetes_node_bits(v: dict[str, str]) -> Path:
    """kubelet, kubeadm, kubectl, kube-proxy from k8s.io/kubernetes (hack/k8s's module,
    whose replace lines make the staging modules resolvable)."""
    out = _bin_dir(f"k8s-node-{v['KUBERNETES_VERSION']}")
    names = ("kubelet", "kubeadm", "kubectl", "kube-proxy")
    if all((out / n).exists() for n in names):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        if (out / n).exists():
            continue
        start = time.monotonic()
        _run(["go", "build", "-trimpath", "-ldflags", _k8s_ldflags(v["KUBERNETES_VERSION"]),
              "-o", str(out / f"{n}.tmp"), f"k8s.io/kubernetes/cmd/{n}"],
             env=_go_env(), cwd=REPO_ROOT / "hack" / "k8s")
        (out / f"{n}.tmp").rename(out / n)
        log(f"built {n} in {time.monotonic() - start:.0f} s")
    return out


def build_pause(v: dict[str, str]) -> Path:
    out = _bin_dir(f"pause-{v['PAUSE_VERSION']}") / "pause"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = _k8s_module_dir() / "build" / "pause" / "linux" / "pause.c"
    _run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{v['PAUSE_VERSION']}",
          "-o", str(out) + ".tmp", str(src)])
    _run(["strip", str(out) + ".tmp"])
    Path(str(out) + ".tmp").rename(out)
    return out


def controlplane_bin() -> Path:
    """kube-apiserver, kube-controller-manager, kube-scheduler and etcd: the local
    control plane's binaries (hack/build-controlplane.sh, same pins)."""
    proc = _run([str(REPO_ROOT / "hack" / "build-controlplane.sh")], capture=True,
                env={"GOPROXY": GOPROXY})
    return Path(proc.stdout.strip().splitlines()[-1])


def build_bits(v: dict[str, str]) -> dict[str, Path]:
    bits = {
        "containerd": _go_install(
            f"containerd-{v['CONTAINERD_VERSION']}",
            [f"github.com/containerd/containerd/v2/cmd/{c}@{v['CONTAINERD_VERSION']}"
             for c in ("containerd", "ctr", "containerd-shim-runc-v2")],
            tags="no_aufs no_zfs no_btrfs no_devmapper",
            ldflags=f"-s -w -X github.com/containerd/containerd/v2/version.Version="
                    f"{v['CONTAINERD_VERSION']}"),
        "runc": _go_install(
            f"runc-{v['RUNC_VERSION']}", [f"github.com/opencontainers/runc@{v['RUNC_VERSION']}"],
            cgo=True, tags="seccomp",
            ldflags=f"-s -w -X main.version={v['RUNC_VERSION'].lstrip('v')}"),
        "crictl": _go_install(
            f"crictl-{v['CRICTL_VERSION']}",
            [f"sigs.k8s.io/cri-tools/cmd/crictl@{v['CRICTL_VERSION']}"],
            ldflags=f"-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version={v['CRICTL_VERSION']}"),
        "cni": _go_install(
            f"cni-plugins-{v['CNI_PLUGINS_VERSION']}",
            [f"github.com/containernetworking/plugins/plugins/{p}@{v['CNI_PLUGINS_VERSION']}"
             for p in ("ipam/host-local", "main/loopback", "main/ptp", "meta/portmap")]),
        "coredns": _go_install(f"coredns-{v['COREDNS_VERSION']}",
                               [f"github.com/coredns/coredns@{v['COREDNS_VERSION']}"]),
        "kind": _go_install(f"kind-{v['KIND_VERSION']}",
                            [f"sigs.k8s.io/kind@{v['KIND_VERSION']}"]),
        "k8s": build_kubernetes_node_bits(v),
        "controlplane": controlplane_bin(),
    }
    bits["pause"] = build_pause(v).parent
    return bits


def kind_binary() -> Path:
    v = versions()
    kind_dir = _go_install(f"kind-{v['KIND_VERSION']}", [f"sigs.k8s.io/kind@{v['KIND_VERSION']}"])
    return kind_dir / "kind"


def kubectl_binary() -> Path:
    return build_kubernetes_node_bits(versions()) / "kubectl"


def kind_module_dir(v: dict[str, str]) -> Path:
    proc = _run(["go", "mod", "download", "-json", f"sigs.k8s.io/kind@{v['KIND_VERSION']}"],
                env=_go_env(), capture=True, quiet=True, cwd=cache_root())
    return Path(json.loads(proc.stdout)["Dir"])


# ----------------------------------------------------------------------------- root filesystems


def rootfs_image(name: str, packages: list[str], v: dict[str, str]) -> str:
    """A Docker image of a `debootstrap --variant=minbase` root with `packages`
    (docker import of the tarball; the tarball is cached too)."""
    key = _digest(sorted(packages), v["DEBIAN_SUITE"], v["DEBIAN_MIRROR"])
    tag = f"volplane/rootfs-{name}:{v['DEBIAN_SUITE']}-{key}"
    if _image_exists(tag):
        return tag
    tar = cache_root() / "rootfs" / f"{name}-{v['DEBIAN_SUITE']}-{key}.tar"
    if not tar.exists():
        if not shutil.which("debootstrap"):
            raise KindError("debootstrap is not installed: run `make setup`")
        tar.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"rootfs-{name}-", dir=tar.parent) as tmp:
            root = Path(tmp) / "root"
            start = time.monotonic()
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
                  v["DEBIAN_SUITE"], str(root), v["DEBIAN_MIRROR"]], capture=True)
            # what kind's clean-install does after installing
            for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log",
                         "usr/share/doc", "usr/share/man", "usr/share/locale"):
                p = root / junk
                if p.is_dir():
                    for child in p.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
            _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tar) + ".tmp", "."])
            Path(str(tar) + ".tmp").rename(tar)
            log(f"debootstrap {name}: {time.monotonic() - start:.0f} s")
    with open(tar, "rb") as fh:
        proc = subprocess.run(["docker", "import", "-", tag], stdin=fh, capture_output=True)
    if proc.returncode != 0:
        raise KindError(f"docker import {tag}: {proc.stderr.decode()[-500:]}")
    return tag


def _image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def _image_id(tag: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _docker_build(context: Path, tag: str, dockerfile: str, build_args: dict | None = None) -> None:
    (context / "Dockerfile").write_text(dockerfile)
    argv = ["build", "--network=none", "-t", tag]
    for k, val in (build_args or {}).items():
        argv += ["--build-arg", f"{k}={val}"]
    proc = _run(["docker", *argv, str(context)], env={"DOCKER_BUILDKIT": "0"},
                capture=True, check=False, quiet=True)
    if proc.returncode != 0:
        raise KindError(f"docker build {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- component images


def component_images(v: dict[str, str], bits: dict[str, Path], node_base: str) -> list[str]:
    """The images kubeadm asks for, under the names it asks for, plus the sandbox tag
    kind's containerd config names. FROM scratch around static binaries; kube-proxy
    on the node's root (it needs nft/iptables)."""
    kv = v["KUBERNETES_VERSION"]
    etcd_tag = etcd_image_tag(v)
    cp = bits["controlplane"]
    specs = [
        (f"registry.k8s.io/kube-apiserver:{kv}", cp / "kube-apiserver", "scratch"),
        (f"registry.k8s.io/kube-controller-manager:{kv}", cp / "kube-controller-manager",
         "scratch"),
        (f"registry.k8s.io/kube-scheduler:{kv}", cp / "kube-scheduler", "scratch"),
        (f"registry.k8s.io/etcd:{etcd_tag}", cp / "etcd", "scratch"),
        (f"registry.k8s.io/kube-proxy:{kv}", bits["k8s"] / "kube-proxy", node_base),
        (f"registry.k8s.io/coredns/coredns:{v['COREDNS_VERSION']}", bits["coredns"] / "coredns",
         "scratch"),
        (f"registry.k8s.io/pause:{v['PAUSE_VERSION']}", bits["pause"] / "pause", "scratch"),
    ]
    tags = []
    for tag, binary, base in specs:
        tags.append(tag)
        key = _digest(_file_digest(binary), base, RECIPE)
        label_ok = _image_label(tag, "io.volplane.key") == key
        if label_ok:
            continue
        name = binary.name
        entry = f"/usr/local/bin/{name}" if name != "coredns" else "/coredns"
        if name == "pause":
            entry = "/pause"
        with tempfile.TemporaryDirectory(prefix="img-") as tmp:
            shutil.copy2(binary, Path(tmp) / name)
            _docker_build(Path(tmp), tag, (
                f"FROM {base}\n"
                f"COPY {name} {entry}\n"
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                f"LABEL io.volplane.key={key}\n"
                + (f'ENTRYPOINT ["{entry}"]\n' if name in ("coredns", "pause") else "")))
    sandbox = f"registry.k8s.io/pause:{v['PAUSE_SANDBOX_TAG']}"
    docker("tag", f"registry.k8s.io/pause:{v['PAUSE_VERSION']}", sandbox)
    tags.append(sandbox)
    return tags


def etcd_image_tag(v: dict[str, str]) -> str:
    return v["ETCD_VERSION"].lstrip("v") + "-0"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _image_label(tag: str, label: str) -> str | None:
    proc = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', tag,
                  check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def busybox_image(v: dict[str, str]) -> str:
    """A busybox image (Debian's busybox-static, every applet linked) for test pods."""
    key = _digest(v["DEBIAN_SUITE"], RECIPE)
    if _image_label(BUSYBOX_IMAGE, "io.volplane.key") == key:
        return BUSYBOX_IMAGE
    root = rootfs_image("busybox", BUSYBOX_PACKAGES, v)
    with tempfile.TemporaryDirectory(prefix="img-") as tmp:
        cid = docker("create", root, "/bin/true").stdout.strip()
        try:
            docker("cp", f"{cid}:/bin/busybox", str(Path(tmp) / "busybox"))
        finally:
            docker("rm", "-f", cid, check=False)
        _docker_build(Path(tmp), BUSYBOX_IMAGE, (
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            "ENV PATH=/bin\n"
            f"LABEL io.volplane.key={key}\n"
            'CMD ["sh"]\n'))
    return BUSYBOX_IMAGE


# ----------------------------------------------------------------------------- node image


def node_image_tag(v: dict[str, str]) -> str:
    key = _digest(v, NODE_PACKAGES, RECIPE)
    return f"volplane/kind-node:{v['KUBERNETES_VERSION']}-{key}"


CONTAINERD_PATCHES = {
    # blocker 2: runc in the node cannot raise its own oom_score_adj
    "restrict_oom_score_adj = false": "restrict_oom_score_adj = true",
}

# kind's default-storage manifest, replaced: volplane is the cluster's provisioner, and
# a default class whose provisioner nobody runs would leave unclassed claims Pending.
DEFAULT_STORAGE = """\
# volplane's kind node image ships no default StorageClass (kind applies this file
# instead of its local-path provisioner): claims name a class, e.g. a pool class.
apiVersion: v1
kind: ConfigMap
metadata:
  name: volplane-kind-storage
  namespace: kube-system
data:
  note: "no default StorageClass; see volplane's README"
"""


def node_image(v: dict[str, str] | None = None) -> str:
    v = v or versions()
    tag = node_image_tag(v)
    if _image_exists(tag):
        return tag
    start = time.monotonic()
    bits = build_bits(v)
    base_root = rootfs_image("node", NODE_PACKAGES, v)
    base = _node_base(v, bits, base_root)
    images = component_images(v, bits, base_root)
    _node_with_kubernetes(v, bits, base, images, tag)
    log(f"node image {tag} built in {time.monotonic() - start:.0f} s")
    return tag


def _node_base(v: dict[str, str], bits: dict[str, Path], root: str) -> str:
    """kind's base image (images/base/Dockerfile) on our Debian root."""
    key = _digest(v, NODE_PACKAGES, RECIPE, "base")
    tag = f"volplane/kind-base:{key}"
    if _image_exists(tag):
        return tag
    kind_files = kind_module_dir(v) / "images" / "base" / "files"
    with tempfile.TemporaryDirectory(prefix="kind-base-") as tmp:
        ctx = Path(tmp)
        files = ctx / "files"
        shutil.copytree(kind_files, files)
        for p in files.rglob("*"):
            p.chmod(0o755 if p.is_dir() or p.parent.name == "bin" else 0o644)
        cfg = files / "etc" / "containerd" / "config.toml"
        text = cfg.read_text()
        for old, new in CONTAINERD_PATCHES.items():
            if old not in text:
                raise KindError(f"kind's containerd config has no {old!r} to patch")
            text = text.replace(old, new)
        cfg.write_text(text)
        binaries = ctx / "bin"
        binaries.mkdir()
        for name in ("containerd", "ctr", "containerd-shim-runc-v2"):
            shutil.copy2(bits["containerd"] / name, binaries / name)
        shutil.copy2(bits["crictl"] / "crictl", binaries / "crictl")
        shutil.copy2(bits["runc"] / "runc", ctx / "runc")
        cni = ctx / "cni"
        cni.mkdir()
        for name in ("host-local", "loopback", "ptp", "portmap"):
            shutil.copy2(bits["cni"] / name, cni / name)
        # kind's base: `ctr oci spec` + the createContainer hook, without rlimits.
        spec = json.loads(_run([bits["containerd"] / "ctr", "oci", "spec"], capture=True,
                               quiet=True).stdout)
        hooks = spec.setdefault("hooks", {}).setdefault("createContainer", [])
        hooks.append({"path": "/kind/bin/mount-product-files.sh"})
        spec.get("process", {}).pop("rlimits", None)
        (ctx / "cri-base.json").write_text(json.dumps(spec, indent=2))
        _docker_build(ctx, tag, f"""\
FROM {root}
COPY files/ /
COPY bin/ /usr/local/bin/
COPY runc /usr/local/sbin/runc
COPY cni/ /opt/cni/bin/
COPY cri-base.json /etc/containerd/cri-base.json
RUN chmod 755 /kind /kind/bin /usr/local/bin/* /usr/local/sbin/runc /opt/cni/bin/* \\
    && find /lib/systemd/system/sysinit.target.wants/ \\
        -name "systemd-tmpfiles-setup.service" -delete \\
    && rm -f /lib/systemd/system/multi-user.target.wants/* \\
    && rm -f /etc/systemd/system/*.wants/* \\
    && rm -f /lib/systemd/system/local-fs.target.wants/* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*initctl* \\
    && rm -f /lib/systemd/system/basic.target.wants/* \\
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
    && ln -sf /usr/lib/systemd/systemd /sbin/init \\
    && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
    && systemctl mask systemd-binfmt.service \\
    && rm -f /etc/ssh/ssh_host_* \\
    && mkdir -p /etc/kubernetes/manifests /kind/manifests {NODE_POOL_DIR} \\
    && containerd --version && runc --version && crictl --version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
""")
    return tag


def _node_with_kubernetes(v: dict[str, str], bits: dict[str, Path], base: str,
                          images: list[str], tag: str) -> None:
    """What `kind build node-image` does, with no pull: Kubernetes' node binaries in
    /usr/bin, /kind/version, the images imported into the node's containerd."""
    name = f"volplane-node-build-{os.getpid()}"
    docker("run", "-d", "--entrypoint=sleep", f"--name={name}", "--network=none",
           "--security-opt", "seccomp=unconfined", base, "infinity")
    try:
        for b in ("kubelet", "kubeadm", "kubectl"):
            docker("cp", str(bits["k8s"] / b), f"{name}:/usr/bin/{b}")
        _exec_write(name, "/kind/version", v["KUBERNETES_VERSION"])
        _exec_write(name, "/kind/manifests/default-storage.yaml", DEFAULT_STORAGE)
        docker("exec", name, "chmod", "755", "/usr/bin/kubelet", "/usr/bin/kubeadm",
               "/usr/bin/kubectl")
        # the images kubeadm will ask for must all be there
        wanted = docker("exec", name, "kubeadm", "config", "images", "list",
                        "--kubernetes-version", v["KUBERNETES_VERSION"]).stdout.split()
        have = set(images)
        missing = [w for w in wanted if w not in have and not w.startswith("registry.k8s.io/etcd:")
                   and not w.startswith("registry.k8s.io/pause:")]
        if missing:
            raise KindError(f"kubeadm asks for images this build does not make: {missing}")
        docker("exec", "-d", name, "bash", "-c", "containerd > /tmp/containerd.log 2>&1")
        deadline = time.monotonic() + 30
        while docker("exec", name, "ctr", "info", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise KindError("containerd in the build container did not start")
            time.sleep(0.5)
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "exec", "-i", name, "ctr", "--namespace=k8s.io", "images",
                              "import", "--label=io.cri-containerd.pinned=pinned",
                              "--all-platforms", "--no-unpack", "--digests", "-"],
                             stdin=save.stdout, capture_output=True, text=True)
        save.stdout.close()
        if save.wait() != 0 or imp.returncode != 0:
            raise KindError(f"importing images into the node failed: {imp.stderr[-1000:]}")
        listed = docker("exec", name, "ctr", "--namespace=k8s.io", "images", "list", "-q").stdout
        for image in images:
            if image not in listed.split():
                raise KindError(f"{image} missing from the node's containerd after import")
        docker("exec", name, "pkill", "containerd", check=False)
        time.sleep(1)
        docker("commit", "--change", 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]',
               name, tag)
    finally:
        docker("rm", "-f", "-v", name, check=False)


def _exec_write(container: str, path: str, content: str) -> None:
    docker("exec", "-i", container, "bash", "-c", f"mkdir -p $(dirname {path}) && cat > {path}",
           input=content)


# ----------------------------------------------------------------------------- operator image


def operator_image() -> str:
    """volplane:dev: Debian's python3 on a debootstrap root, the project's wheels (the
    venv's pinned versions) installed outside the build, no network inside it.
    Rebuilt only when its inputs change (the package's files, the pins, the root)."""
    v = versions()
    root = rootfs_image("operator", OPERATOR_PACKAGES, v)
    py = sys.executable
    _run([py, str(REPO_ROOT / "hack" / "gen-csi.py")], quiet=True)  # CSI stubs (no-op if current)
    frozen = _run([py, "-m", "pip", "freeze", "--exclude-editable"], capture=True,
                  quiet=True).stdout
    runtime = _runtime_requirements(frozen)
    key = _digest(root, runtime, _tree_digest(REPO_ROOT / "operator"),
                  (REPO_ROOT / "pyproject.toml").read_text(),
                  (REPO_ROOT / "Dockerfile").read_text())
    if _image_label(OPERATOR_IMAGE, "io.volplane.key") == key:
        return OPERATOR_IMAGE
    build = REPO_ROOT / "build" / "image"
    shutil.rmtree(build, ignore_errors=True)
    wheels = build / "wheels"
    prefix = build / "root" / "opt" / "volplane"
    wheels.mkdir(parents=True)
    (build / "constraints.txt").write_text(runtime)
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO_ROOT)])
    _run([py, "-m", "pip", "wheel", "-q", "-w", str(wheels), "-c", str(build / "constraints.txt"),
          *[line for line in runtime.splitlines() if line]])
    # --ignore-installed: never touch the venv (pip would uninstall its volplane first)
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
          "--ignore-installed",
          "--prefix", str(prefix), *map(str, sorted(wheels.glob("*.whl")))])
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = f"/opt/volplane/lib/python{pyver}/site-packages"
    deb_py = _run(["docker", "run", "--rm", "--network=none", root, "python3", "-c",
                   "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
                  capture=True, quiet=True).stdout.strip()
    if deb_py != pyver:
        raise KindError(f"Debian's python3 is {deb_py}, the wheels are for {pyver}")
    _docker_build_repo(OPERATOR_IMAGE, root, site, key)
    return OPERATOR_IMAGE


def _tree_digest(top: Path) -> str:
    """Content digest of a source tree (bytecode and caches left out)."""
    h = hashlib.sha256()
    for p in sorted(top.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc") \
                and ".egg-info" not in str(p):
            h.update(str(p.relative_to(top)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _runtime_requirements(frozen: str) -> str:
    """The venv's exact versions of volplane's runtime dependencies (and theirs): the
    test extras and their dependencies are left out."""
    from importlib import metadata

    wanted: set[str] = set()
    todo = ["volplane"]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in wanted:
            continue
        wanted.add(key)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            dep = r.split(";")[0].strip()
            for sep in "<>=!~[ (":
                dep = dep.split(sep)[0]
            todo.append(dep.strip())
    lines = []
    for line in frozen.splitlines():
        pkg = line.split("==")[0].strip().lower().replace("_", "-")
        if pkg in wanted and pkg != "volplane":
            lines.append(line)
    return "\n".join(lines) + "\n"


def _docker_build_repo(tag: str, base: str, site: str, key: str) -> None:
    """`docker build` with the repository as context; .dockerignore admits only
    build/image/root (what the Dockerfile copies)."""
    proc = _run(["docker", "build", "--network=none", "-t", tag, "--build-arg", f"BASE={base}",
                 "--build-arg", f"SITE={site}", "--label", f"io.volplane.key={key}",
                 str(REPO_ROOT)],
                env={"DOCKER_BUILDKIT": "0"}, capture=True, check=False, quiet=True)
    if proc.returncode != 0:
        raise KindError(f"docker build {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    for line in proc.stdout.splitlines():
        if "Sending build context" in line:
            log(line.strip())


# ----------------------------------------------------------------------------- cluster


def render_config(v: dict[str, str]) -> Path:
    """hack/kind-config.yaml with this machine's paths and the etcd tag filled in."""
    text = (REPO_ROOT / "hack" / "kind-config.yaml").read_text()
    pools = local_dir() / "pools"
    pools.mkdir(parents=True, exist_ok=True)
    flex_disks = flex_disk_dir()
    flex_disks.mkdir(parents=True, exist_ok=True)
    text = (text.replace("@POOL_HOST_DIR@", str(pools))
            .replace("@FLEX_DISK_HOST_DIR@", str(flex_disks))
            .replace("@ETCD_TAG@", etcd_image_tag(v)))
    out = local_dir() / "config.yaml"
    out.write_text(text)
    return out


def flex_disk_dir() -> Path:
    """The host directory every node mounts at /var/lib/volplane-demo-disk/disks: the
    sample FlexVolume driver's backing files (hack/flexvolume/)."""
    return local_dir() / "flexdisks"


def ensure_loop_devices(count: int = LOOP_DEVICES) -> None:
    """Loop device nodes the nodes will see (the kernel creates the device on open)."""
    if os.geteuid() != 0:
        return
    for i in range(count):
        p = Path(f"/dev/loop{i}")
        if not p.exists():
            with contextlib.suppress(OSError):
                os.mknod(p, 0o660 | 0o060000, os.makedev(7, i))


# Every kind node runs systemd, which takes inotify instances of the host's per-user
# pool; with Debian's default (128) a second cluster's nodes fail to boot ("Failed to
# create inotify object: Too many open files", containerd and kubelet never start).
# kind's known-issues page gives these values.
INOTIFY_LIMITS = {"fs/inotify/max_user_instances": 512, "fs/inotify/max_user_watches": 524288}


def ensure_inotify_limits() -> None:
    """Raise (never lower) the host's inotify limits where we may."""
    for key, want in INOTIFY_LIMITS.items():
        p = Path("/proc/sys") / key
        try:
            have = int(p.read_text())
            if have < want:
                p.write_text(str(want))
                log(f"raised {key.replace('/', '.')} from {have} to {want}")
        except (OSError, ValueError) as e:
            log(f"note: cannot raise {key.replace('/', '.')} to {want} ({e}); "
                "nodes may fail to boot if the host runs out of inotify instances")


def _kind_cluster():
    from pytest_kind import KindCluster

    return KindCluster(CLUSTER_NAME, kubeconfig=kubeconfig_path(), image=None,
                       kind_path=kind_binary(), kubectl_path=kubectl_binary())


def cluster_exists() -> bool:
    if not engine_answers():
        return False
    proc = _run([kind_binary(), "get", "clusters"], capture=True, check=False, quiet=True)
    return CLUSTER_NAME in proc.stdout.split()


def kubectl(*args: str, input: str | None = None, check: bool = True,
            capture: bool = True) -> subprocess.CompletedProcess:
    return _run([kubectl_binary(), "--kubeconfig", kubeconfig_path(), *args], input=input,
                check=check, capture=capture, quiet=True)


def node_names() -> list[str]:
    proc = _run([kind_binary(), "get", "nodes", "--name", CLUSTER_NAME], capture=True, quiet=True)
    return sorted(proc.stdout.split())


def setup_network() -> None:
    """Pod networking between nodes, kindnetd's job: every node gets a ptp + host-local
    CNI config for its own podCIDR and a route to every other node's podCIDR through
    that node's address; traffic from pods to anything outside the pod network is
    masqueraded. Idempotent (run on every `up`)."""
    deadline = time.monotonic() + 120
    while True:
        nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
        if len(nodes) == len(node_names()) and all(n["spec"].get("podCIDR") for n in nodes):
            break
        if time.monotonic() > deadline:
            raise KindError("nodes did not all get a podCIDR within 120 s")
        time.sleep(1)
    info = {}
    for n in nodes:
        addr = next(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP")
        info[n["metadata"]["name"]] = (n["spec"]["podCIDR"], addr)
    pod_net = json.loads(kubectl("get", "cm", "-n", "kube-system", "kubeadm-config", "-o",
                                 "json").stdout)["data"]["ClusterConfiguration"]
    pod_subnet = next((line.split(":", 1)[1].strip() for line in pod_net.splitlines()
                       if line.strip().startswith("podSubnet:")), "10.244.0.0/16")
    for name, (cidr, _addr) in info.items():
        conf = {
            "cniVersion": "1.0.0", "name": "volplane-kind",
            "plugins": [
                {"type": "ptp", "ipMasq": False, "mtu": 1500,
                 "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
                          "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": cidr}]]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        script = ["set -e", "mkdir -p /etc/cni/net.d",
                  "cat > /etc/cni/net.d/.10-volplane.tmp <<'EOF'\n"
                  f"{json.dumps(conf, indent=1)}\nEOF",
                  "mv /etc/cni/net.d/.10-volplane.tmp /etc/cni/net.d/10-volplane.conflist"]
        for other, (ocidr, oaddr) in info.items():
            if other != name:
                script.append(f"ip route replace {ocidr} via {oaddr}")
        script.append(
            f"iptables -t nat -C POSTROUTING -s {pod_subnet} ! -d {pod_subnet} -j MASQUERADE "
            f"2>/dev/null || iptables -t nat -A POSTROUTING -s {pod_subnet} ! -d {pod_subnet} "
            "-j MASQUERADE")
        docker("exec", "-i", name, "bash", "-s", input="\n".join(script) + "\n")


def enable_ssh(public_key: str) -> None:
    """Start sshd on every node, root logging in with this key only (what upstream's
    e2e framework needs to stop and start a node's kubelet). Idempotent."""
    script = "\n".join([
        "set -e",
        "mkdir -p -m 700 /root/.ssh",
        f"echo '{public_key.strip()}' > /root/.ssh/authorized_keys",
        "chmod 600 /root/.ssh/authorized_keys",
        "printf 'PermitRootLogin prohibit-password\\nPasswordAuthentication no\\n' "
        "> /etc/ssh/sshd_config.d/volplane.conf",
        "test -s /etc/ssh/ssh_host_ed25519_key || ssh-keygen -A",
        "systemctl start ssh.service",
    ]) + "\n"
    for name in node_names():
        proc = docker("exec", "-i", name, "bash", "-s", input=script, check=False)
        if proc.returncode != 0:
            raise KindError(f"cannot start sshd on {name} (node image without "
                            f"openssh-server?): {proc.stderr.strip()[-500:]}")


def wait_nodes_ready(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
        ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in n["status"].get("conditions", []))]
        if nodes and len(ready) == len(nodes):
            return
        if time.monotonic() > deadline:
            raise KindError(f"{len(ready)}/{len(nodes)} nodes Ready after {timeout:.0f} s")
        time.sleep(1)


def load_image(cluster, tag: str) -> bool:
    """kind load docker-image, skipped when every node already has this image id."""
    want = _image_id(tag)
    marker = local_dir() / "loaded" / tag.replace("/", "_").replace(":", "_")
    if want and marker.exists() and marker.read_text() == want:
        return False
    cluster.load_docker_image(tag)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(want or "")
    return True


def _apply_kustomization(path: Path, operator_image: bool = True) -> None:
    """kubectl apply of a kustomization, its `volplane:dev` image replaced by
    OPERATOR_IMAGE (VOLPLANE_IMAGE: another worktree's own tag). Rendered first, so an
    image that is not on the nodes is never rolled out, not even for a moment."""
    rendered = kubectl("kustomize", str(path)).stdout
    if operator_image and OPERATOR_IMAGE != "volplane:dev":
        if "image: volplane:dev\n" not in rendered:
            raise KindError(f"{path}: no `image: volplane:dev` to replace")
        rendered = rendered.replace("image: volplane:dev\n", f"image: {OPERATOR_IMAGE}\n")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=rendered)


# What kind installs of the operator: manifests/ with the FlexVolume component
# (manifests/flexvolume/: the nodes' plugin dir mounted into the operator), composed
# the way a user composes it, in a kustomization of their own.
OPERATOR_KUSTOMIZATION = """\
# written by hack/kind/kind.py: volplane as kind installs it
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {manifests}
components:
  - {manifests}/flexvolume
"""


def install_operator() -> None:
    """manifests/ + manifests/flexvolume/ (the operator sees the nodes' FlexVolume
    drivers), with this checkout's image."""
    d = local_dir() / "install"
    d.mkdir(parents=True, exist_ok=True)
    manifests = os.path.relpath(REPO_ROOT / "manifests", d)
    (d / "kustomization.yaml").write_text(OPERATOR_KUSTOMIZATION.format(manifests=manifests))
    _apply_kustomization(d)


def install_volplane(restart: bool) -> None:
    install_operator()
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            "crd/storagepools.volplane.io", "crd/storageallocations.volplane.io")
    # the CSI node plugin (manifests/node/): real kubelets mount pool volumes through it
    _apply_kustomization(REPO_ROOT / "manifests" / "node")
    # the sample FlexVolume driver on every node's plugin dir, by its installer DaemonSet
    _apply_kustomization(REPO_ROOT / "hack" / "flexvolume", operator_image=False)
    if restart:
        kubectl("-n", "volplane-system", "rollout", "restart", "deployment/volplane")
        kubectl("-n", "volplane-node", "rollout", "restart", "daemonset/volplane-node")
    kubectl("-n", "volplane-system", "rollout", "status", "deployment/volplane",
            "--timeout=180s", capture=True)
    kubectl("-n", "volplane-node", "rollout", "status", "daemonset/volplane-node",
            "--timeout=180s", capture=True)
    kubectl("-n", "volplane-demo-disk", "rollout", "status",
            "daemonset/volplane-demo-disk-installer", "--timeout=180s", capture=True)


def up(install: bool = True) -> Path:
    """The kind cluster, created or reused, with volplane installed; its kubeconfig."""
    start = time.monotonic()
    with _locked("kind"):
        engine_up()
        v = versions()
        image = node_image(v)
        operator = operator_image() if install else None
        busybox_image(v)
        cluster = _kind_cluster()
        if cluster_exists() and not _have_kubeconfig():
            # A cluster of this name that this checkout did not make (another clone's, or
            # a leftover of a run whose .local/ is gone): its host mounts point into that
            # other tree, and pytest-kind would read our empty kubeconfig. Start afresh.
            print(f"kind: cluster {CLUSTER_NAME} exists but not for this checkout "
                  f"(no {kubeconfig_path()}): deleting it", flush=True)
            _run([kind_binary(), "delete", "cluster", "--name", CLUSTER_NAME])
        if not cluster_exists() or not _have_kubeconfig():
            ensure_loop_devices()
            ensure_inotify_limits()
            config = render_config(v)
            local_dir().mkdir(parents=True, exist_ok=True)
            for marker in (local_dir() / "loaded").glob("*"):
                marker.unlink()
            cluster.image = image
            cluster.create(config_file=config)
        else:
            cluster.api = None
        setup_network()
        wait_nodes_ready()
        loaded = load_image(cluster, BUSYBOX_IMAGE)
        if operator:
            loaded = load_image(cluster, operator)
            install_volplane(restart=loaded)
        log(f"cluster {CLUSTER_NAME} ready in {time.monotonic() - start:.0f} s")
    return kubeconfig_path()


def down() -> None:
    with _locked("kind"):
        if cluster_exists():
            _run([kind_binary(), "delete", "cluster", "--name", CLUSTER_NAME,
                  "--kubeconfig", kubeconfig_path()])
        shutil.rmtree(local_dir(), ignore_errors=True)
        engine_down()


def status() -> bool:
    if not engine_answers():
        print("engine: not running")
        return False
    print("engine: " + docker("info", "--format", "{{.ServerVersion}}").stdout.strip())
    if not cluster_exists():
        print(f"cluster {CLUSTER_NAME}: absent")
        return False
    print(f"cluster {CLUSTER_NAME}: kubeconfig {kubeconfig_path()}")
    print(kubectl("get", "nodes", "-o", "wide", check=False).stdout)
    print(kubectl("-n", "volplane-system", "get", "deploy,pods", check=False).stdout)
    return True


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    cmd = args[0] if args else "up"
    try:
        if cmd == "up":
            print(up())
        elif cmd == "down":
            down()
        elif cmd == "status":
            return 0 if status() else 1
        elif cmd == "engine":
            engine_up()
        elif cmd == "build":
            engine_up()
            print(node_image())
            print(operator_image())
            print(busybox_image(versions()))
        elif cmd == "image":
            engine_up()
            print(operator_image())
        elif cmd == "kubeconfig":
            print(kubeconfig_path())
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except KindError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
