#!/usr/bin/env python3
"""Generate the node plugin's gRPC stubs from upstream's own .proto files.

The protos are never copied into this repository. They are taken at build time from
their published Go modules (the versions pinned below), and compiled with grpcio-tools
(pinned in pyproject.toml) into operator/volplane/node/gen/ (gitignored):

- the CSI spec's csi.proto        github.com/container-storage-interface/spec
- the kubelet's plugin registration API (pluginregistration/v1/api.proto), which
  `volplane node` serves itself so that the kubelet finds the driver   k8s.io/kubelet

Where the module comes from: `go mod download -json` when a Go toolchain is present
(it checks the checksum database), else the zip straight from $GOPROXY (default
https://proxy.golang.org), checked against the h1: sum pinned here.

Usage: hack/gen-csi.py [--force]   (a no-op when the stubs are current)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "volplane/node/gen"           # import path of the generated modules
OUT = os.path.join(ROOT, "operator")    # protoc's output root
STAMP = os.path.join(OUT, PACKAGE, ".stamp")

# (module, version, h1 sum of the module zip, file in the module, name to compile it as)
SOURCES = [
    ("github.com/container-storage-interface/spec", "v1.12.0",
     "h1:zrFOEqpR5AghNaaDG4qyedwPBqU2fU0dWjLQMP/azK0=", "csi.proto", "csi.proto"),
    ("k8s.io/kubelet", "v0.36.5",
     "h1:28D9bkk4p4x5qzX4smu5DMRDoMWd/ELtkKkYaVXeMqE=",
     "pkg/apis/pluginregistration/v1/api.proto", "pluginregistration.proto"),
]


def _escape(module: str) -> str:
    """The Go module proxy's case encoding: an upper-case letter becomes '!' + lower."""
    return "".join("!" + c.lower() if c.isupper() else c for c in module)


def _h1(zf: zipfile.ZipFile) -> str:
    """Go's dirhash.Hash1 over a module zip: sha256 of "<sha256 hex>  <name>\\n" lines."""
    lines = []
    for name in sorted(n for n in zf.namelist() if not n.endswith("/")):
        lines.append(f"{hashlib.sha256(zf.read(name)).hexdigest()}  {name}\n")
    return "h1:" + base64.b64encode(hashlib.sha256("".join(lines).encode()).digest()).decode()


def _via_go(module: str, version: str) -> str | None:
    go = shutil.which("go")
    if not go:
        return None
    env = dict(os.environ)
    env.setdefault("GOPROXY", "https://proxy.golang.org")
    env["GOFLAGS"] = "-mod=mod"
    with tempfile.TemporaryDirectory() as tmp:  # outside any module: no go.mod is touched
        r = subprocess.run([go, "mod", "download", "-json", f"{module}@{version}"], cwd=tmp,
                           env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"go mod download {module}@{version} failed: {r.stderr or r.stdout}",
              file=sys.stderr)
        return None
    return json.loads(r.stdout)["Dir"]


def _via_proxy(module: str, version: str, h1: str, path: str) -> bytes:
    proxy = (os.environ.get("GOPROXY") or "https://proxy.golang.org").split(",")[0]
    if proxy in ("direct", "off"):
        proxy = "https://proxy.golang.org"
    url = f"{proxy.rstrip('/')}/{_escape(module)}/@v/{version}.zip"
    with urllib.request.urlopen(url, timeout=120) as resp:
        data = resp.read()
    zf = zipfile.ZipFile(io.BytesIO(data))
    got = _h1(zf)
    if got != h1:
        raise SystemExit(f"{module}@{version}: checksum mismatch ({got} != pinned {h1})")
    return zf.read(f"{module}@{version}/{path}")


def fetch(module: str, version: str, h1: str, path: str) -> bytes:
    d = _via_go(module, version)
    if d is not None:
        with open(os.path.join(d, path), "rb") as f:
            return f.read()
    return _via_proxy(module, version, h1, path)


def wanted_stamp() -> str:
    import grpc_tools
    tools = getattr(grpc_tools, "__version__", None)
    if tools is None:
        from importlib.metadata import version
        tools = version("grpcio-tools")
    return json.dumps({"sources": SOURCES, "grpcio-tools": tools}, sort_keys=True)


def main(argv: list[str]) -> int:
    try:
        from grpc_tools import protoc
    except ImportError:
        print("grpcio-tools is not installed (pip install -e '.[codegen]')", file=sys.stderr)
        return 1
    stamp = wanted_stamp()
    if "--force" not in argv and os.path.exists(STAMP):
        with open(STAMP) as f:
            if f.read() == stamp:
                return 0
    out_pkg = os.path.join(OUT, PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for module, version, h1, path, name in SOURCES:
            data = fetch(module, version, h1, path)
            dst = os.path.join(tmp, PACKAGE, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(data)
            names.append(f"{PACKAGE}/{name}")
        well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        shutil.rmtree(out_pkg, ignore_errors=True)
        os.makedirs(out_pkg)
        rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"-I{well_known}",
                          f"--python_out={OUT}", f"--grpc_python_out={OUT}", *names])
        if rc != 0:
            print("protoc failed", file=sys.stderr)
            return rc
    with open(os.path.join(out_pkg, "__init__.py"), "w") as f:
        f.write('"""Generated by hack/gen-csi.py from upstream protos; do not edit."""\n')
    with open(STAMP, "w") as f:
        f.write(stamp)
    print(f"generated {', '.join(n for *_, n in SOURCES)} stubs in {out_pkg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
