#!/usr/bin/env python3
"""Upstream's storage e2e suites against pool.volplane.io on kind (`make e2e-upstream`).

    hack/e2e-upstream/e2e.py build           # e2e.test (+ the ginkgo CLI) for the pinned Kubernetes
    hack/e2e-upstream/e2e.py images          # the test images e2e.test asks for, loaded into kind
    hack/e2e-upstream/e2e.py run [--focus RE] [--skip RE] [--procs N]
                                             # all of the above, the suites, docs/upstream-e2e.md
    hack/e2e-upstream/e2e.py report JUNIT... # only rewrite docs/upstream-e2e.md from JUnit files

What runs: `e2e.test -ginkgo.focus='External.Storage.*pool.volplane.io'
-storage.testdriver=hack/e2e-upstream/driver.yaml` (test/e2e/storage/external: every
suite of testsuites.CSISuites, each with the patterns the driver's capabilities allow),
on the kind cluster of hack/kind/kind.py, where kube-controller-manager runs without
its PV binder and attach/detach controllers: volplane binds, provisions and attaches.

No registry is reachable, so every image the suites start is built here, under the
exact name e2e.test expects (read from `e2e.test --list-images`, i.e.
test/utils/image/manifest.go), and `kind load`ed:

- busybox: Debian's busybox-static, FROM scratch (hack/kind/kind.py's busybox image);
- agnhost: built from k8s.io/kubernetes/test/images/agnhost at the pinned version, on a
  Debian root with the tools its Dockerfile installs on Alpine (nsenter and mount for
  the storage suites' host-exec pods, a shell, dig, curl, nc, ip);
- nginx and glibc-dns-testing (the volumes and multivolume suites run shell commands
  in them): Debian roots with nginx / dnsutils;
- hello-populator (the volume populator of "should provision storage with any volume
  data source"): hack/e2e-upstream/hello-populator, our own Go implementation of it
  (its module is not served by the Go module proxy), under the manifest's image name.

The [Disruptive] suites stop and start a node's kubelet over SSH, so they run after
the others, one at a time (with --procs > 1); the nodes run sshd
(kind.enable_ssh) and the suites get our key (KUBE_SSH_KEY_PATH, user root).

Everything is cached: e2e.test and ginkgo by version under ~/.cache/volplane, the
images by a digest of their inputs (a docker label), the load per node image id.
Standard library only, plus hack/kind/kind.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "kind"))
import kind  # noqa: E402  (hack/kind/kind.py)

DRIVER_YAML = HERE / "driver.yaml"
POOL_YAML = HERE / "pool.yaml"
DOC = REPO_ROOT / "docs" / "upstream-e2e.md"
FOCUS = r"External.Storage.*pool\.volplane\.io"
# Debian packages of the agnhost / nginx / glibc-dns-testing roots (one root for all three).
TOOLS_PACKAGES = ("bash util-linux mount iproute2 procps dnsutils netcat-openbsd curl "
                  "ca-certificates nginx-light").split()
RECIPE = "e2e-images-1"


def log(msg: str) -> None:
    print(f"e2e-upstream: {msg}", file=sys.stderr, flush=True)


def out_dir() -> Path:
    return REPO_ROOT / ".local" / "e2e-upstream"


# ----------------------------------------------------------------------------- binaries


def e2e_test_binary() -> Path:
    """e2e.test, `go test -c k8s.io/kubernetes/test/e2e` (hack/e2e-upstream/build-e2e-test.sh)."""
    start = time.monotonic()
    proc = kind._run([str(HERE / "build-e2e-test.sh")], capture=True,
                     env={"GOPROXY": kind.GOPROXY})
    path = Path(proc.stdout.strip().splitlines()[-1])
    if time.monotonic() - start > 5:
        log(f"e2e.test ready in {time.monotonic() - start:.0f} s")
    return path


def ginkgo_binary() -> Path:
    """The ginkgo CLI (runs e2e.test in parallel processes), the version e2e.test links."""
    version = kind._go_mod_version("k8s", "github.com/onsi/ginkgo/v2")
    return kind._go_install(f"ginkgo-{version}",
                            [f"github.com/onsi/ginkgo/v2/ginkgo@{version}"]) / "ginkgo"


def list_images(e2e_test: Path) -> list[str]:
    proc = kind._run([str(e2e_test), "--list-images"], capture=True, quiet=True)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- images


def _wanted(names: list[str], repo: str) -> list[str]:
    """Every name:tag e2e.test may ask for of an image repository (some are listed
    twice, e.g. agnhost's current and previous version: both get the same image)."""
    tags = sorted(n for n in names if n.rsplit(":", 1)[0] == repo)
    if not tags:
        raise kind.KindError(f"e2e.test --list-images names no {repo}")
    return tags


def _tag_all(source: str, tags: list[str]) -> None:
    for t in tags:
        if t != source:
            kind.docker("tag", source, t)


def _build_if_changed(tag: str, key: str, context: Path, dockerfile: str) -> bool:
    if kind._image_label(tag, "io.volplane.key") == key:
        return False
    kind._docker_build(context, tag, dockerfile + f"LABEL io.volplane.key={key}\n")
    log(f"built {tag}")
    return True


def agnhost_binary(v: dict[str, str]) -> Path:
    out = kind._bin_dir(f"agnhost-{v['KUBERNETES_VERSION']}") / "agnhost"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    version = (kind._k8s_module_dir() / "test" / "images" / "agnhost" / "VERSION"
               ).read_text().strip()
    start = time.monotonic()
    kind._run(["go", "build", "-trimpath", "-ldflags", f"-s -w -X main.Version={version}",
               "-o", str(out) + ".tmp", "k8s.io/kubernetes/test/images/agnhost"],
              env=kind._go_env(), cwd=REPO_ROOT / "hack" / "k8s")
    Path(str(out) + ".tmp").rename(out)
    log(f"built agnhost in {time.monotonic() - start:.0f} s")
    return out


POPULATOR_MANIFEST = ("test/e2e/testing-manifests/storage-csi/any-volume-datasource/"
                      "hello-populator-deploy.yaml")


def hello_populator_image() -> str:
    """hack/e2e-upstream/hello-populator (our own implementation of the populator the
    suite deploys; its upstream module is not served), FROM scratch, under the name the
    suite's manifest gives it."""
    manifest = (kind._k8s_module_dir() / POPULATOR_MANIFEST).read_text()
    tag = next(line.split("image:", 1)[1].strip() for line in manifest.splitlines()
               if line.strip().startswith("image:"))
    src = HERE / "hello-populator"
    key = kind._digest(*(p.read_text() for p in sorted(src.iterdir()) if p.is_file()), RECIPE)
    if kind._image_label(tag, "io.volplane.key") == key:
        return tag
    with tempfile.TemporaryDirectory(prefix="img-") as tmp:
        kind._run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o",
                   str(Path(tmp) / "hello-populator"), "."], env=kind._go_env(), cwd=src)
        _build_if_changed(tag, key, Path(tmp), (
            "FROM scratch\n"
            "COPY hello-populator /hello-populator\n"
            'ENTRYPOINT ["/hello-populator"]\n'))
    return tag


def build_images(e2e_test: Path) -> list[str]:
    """The images the External Storage suites start, under the names e2e.test expects."""
    v = kind.versions()
    names = list_images(e2e_test)
    busybox = _wanted(names, "registry.k8s.io/e2e-test-images/busybox")
    agnhost = _wanted(names, "registry.k8s.io/e2e-test-images/agnhost")
    nginx = _wanted(names, "registry.k8s.io/e2e-test-images/nginx")
    glibc = _wanted(names, "registry.k8s.io/e2e-test-images/glibc-dns-testing")

    # busybox: the kind tooling's Debian busybox-static image, under upstream's names
    _tag_all(kind.busybox_image(v), busybox)

    tools = kind.rootfs_image("e2e-tools", TOOLS_PACKAGES, v)
    agn = agnhost_binary(v)
    module = kind._k8s_module_dir() / "test" / "images" / "agnhost"
    with tempfile.TemporaryDirectory(prefix="img-") as tmp:
        ctx = Path(tmp)
        shutil.copy2(agn, ctx / "agnhost")
        for f in ("localhost.crt", "localhost.key"):
            shutil.copy2(module / "porter" / f, ctx / f)
            (ctx / f).chmod(0o644)
        key = kind._digest(tools, kind._file_digest(agn), RECIPE)
        # upstream's Dockerfile, on Debian: the same user/group, files and entrypoint
        _build_if_changed(agnhost[-1], key, ctx, (
            f"FROM {tools}\n"
            "COPY agnhost /agnhost\n"
            "COPY localhost.crt localhost.key /\n"
            "RUN chmod 755 /agnhost && ln -s agnhost /agnhost-2 && mkdir -p /uploads \\\n"
            " && groupadd -g 50000 group-defined-in-image \\\n"
            " && useradd -u 1000 -M -G group-defined-in-image user-defined-in-image\n"
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            "EXPOSE 80 8080 8081 9376 5000\n"
            'ENTRYPOINT ["/agnhost"]\n'
            'CMD ["pause"]\n'))
    _tag_all(agnhost[-1], agnhost)
    with tempfile.TemporaryDirectory(prefix="img-") as tmp:
        key = kind._digest(tools, RECIPE)
        _build_if_changed(nginx[-1], key, Path(tmp), (
            f"FROM {tools}\n"
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            "EXPOSE 80\n"
            'CMD ["nginx", "-g", "daemon off;"]\n'))
        _build_if_changed(glibc[-1], key, Path(tmp), (
            f"FROM {tools}\n"
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            'CMD ["/bin/sh"]\n'))
    _tag_all(nginx[-1], nginx)
    _tag_all(glibc[-1], glibc)
    return [*busybox, *agnhost, *nginx, *glibc, hello_populator_image()]


def load_images(tags: list[str]) -> None:
    cluster = kind._kind_cluster()
    for tag in tags:
        if kind.load_image(cluster, tag):
            log(f"loaded {tag}")


# ----------------------------------------------------------------------------- the run


def ssh_key() -> Path:
    """The key the suites log in to nodes with (KUBE_SSH_KEY_PATH), made once."""
    key = out_dir() / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kind._run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "volplane-e2e-upstream",
                   "-f", str(key)], quiet=True)
    return key


def prepare_cluster() -> Path:
    """kind cluster with volplane (kind.up), the suites' pool, sshd on the nodes."""
    kubeconfig = kind.up()
    kind.kubectl("apply", "--server-side", "-f", str(POOL_YAML))
    kind.enable_ssh(Path(str(ssh_key()) + ".pub").read_text())
    return kubeconfig


def run_suites(e2e_test: Path, kubeconfig: Path, focus: str, skip: str | None,
               procs: int, timeout: str) -> list[Path]:
    """The suites in two passes when procs > 1: every spec but the [Disruptive] ones on
    `procs` ginkgo processes, then the [Disruptive] ones alone, one at a time. Upstream's
    framework marks them Disruptive without ginkgo's Serial decorator (only [Serial] gets
    that), so ginkgo would run them beside other specs: a kubelet stopped under another
    spec's pod, two specs restarting kubelets at once. Upstream's CI runs them in a
    serial job of their own for the same reason."""
    if procs <= 1:
        return [_run_pass(e2e_test, kubeconfig, focus, skip, 1, timeout, None, "")]
    return [_run_pass(e2e_test, kubeconfig, focus, skip, procs, timeout, "!Disruptive", ""),
            _run_pass(e2e_test, kubeconfig, focus, skip, 1, timeout, "Disruptive",
                      "-disruptive")]


def _run_pass(e2e_test: Path, kubeconfig: Path, focus: str, skip: str | None, procs: int,
              timeout: str, label_filter: str | None, suffix: str) -> Path:
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    junit = out / f"junit{suffix}.xml"
    junit.unlink(missing_ok=True)
    suite_args = [
        f"-kubeconfig={kubeconfig}",
        "-provider=local",
        f"-storage.testdriver={DRIVER_YAML}",
        f"-report-dir={out}",
        f"-repo-root={kind._k8s_module_dir()}",
        "-disable-log-dump",
        "-non-blocking-taints=node-role.kubernetes.io/control-plane",
    ]
    # the ginkgo CLI writes reports under -output-dir (a relative name), e2e.test in cwd
    ginkgo_args = [f"-focus={focus}", f"-timeout={timeout}", "-no-color",
                   f"-junit-report={junit.name}", "-v" if procs == 1 else "-succinct"]
    if skip:
        ginkgo_args.append(f"-skip={skip}")
    if label_filter:
        ginkgo_args.append(f"-label-filter={label_filter}")
    if procs > 1:
        argv = [str(ginkgo_binary()), f"-procs={procs}", *ginkgo_args,
                f"-output-dir={out}", str(e2e_test), "--", *suite_args]
    else:
        argv = [str(e2e_test), *["-ginkgo." + a.lstrip("-") for a in ginkgo_args], *suite_args]
    log("$ " + " ".join(argv))
    start = time.monotonic()
    with open(out / f"e2e{suffix}.log", "w") as fh:
        # [Disruptive] tests stop and start a node's kubelet over SSH (as root, our key)
        env = {**os.environ, "KUBE_SSH_KEY_PATH": str(ssh_key()), "KUBE_SSH_USER": "root"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=out, env=env)
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            if re.match(r"^(•|\[(FAILED|PASSED|SKIPPED|PANICKED)\]|Ran |FAIL|PASS|"
                        r"\s*\[FAIL\])", line):
                sys.stderr.write(line)
        rc = proc.wait()
    log(f"suites ({label_filter or 'all'}) finished in {time.monotonic() - start:.0f} s "
        f"(exit {rc}); log {out / f'e2e{suffix}.log'}")
    if not junit.exists():
        raise kind.KindError(f"no JUnit report at {junit}; see {out / f'e2e{suffix}.log'}")
    return junit


# ----------------------------------------------------------------------------- the report


def parse_junit(path: Path) -> list[dict]:
    """One row per spec: name, state (passed/failed/skipped), time, and the message."""
    rows = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        if not re.search(FOCUS, name):
            continue  # the suite's BeforeSuite/AfterSuite nodes
        state = "passed"
        message = ""
        for child in tc:
            if child.tag == "skipped":
                state = "skipped"
                message = child.get("message") or (child.text or "")
            elif child.tag in ("failure", "error"):
                state = "failed"
                message = child.get("message") or (child.text or "")
        rows.append({"name": name, "state": state, "time": float(tc.get("time") or 0),
                     "message": message.strip()})
    return rows


def merge_passes(rows: list[dict]) -> list[dict]:
    """One row per spec over the passes: each pass skips the specs the other runs (by
    label), so a spec counts as skipped only when no pass ran it. A JUnit file can also
    list a skipped spec twice (the label filter's bare "skipped", then the framework's
    skip with its reason): the reason is kept."""
    def rank(row: dict) -> int:
        return 2 if row["state"] != "skipped" else 1 if _skip_reason(row["message"]) else 0

    merged: dict[str, dict] = {}
    for row in rows:
        kept = merged.get(row["name"])
        if kept is None or rank(row) > rank(kept):
            merged[row["name"]] = row
    return list(merged.values())


def _short(name: str) -> str:
    """The spec's text without the node type ("[It] "), the driver prefix and the label
    list ginkgo appends ("[Disruptive, LinuxOnly]": the tags are in the text already)."""
    name = re.sub(r"^\[It\]\s*", "", name)
    name = re.sub(r"^(\[sig-storage\]\s*)?External Storage \[Driver: pool\.volplane\.io\]\s*",
                  "", name)
    name = re.sub(r"\s*\[[^\[\]]*,[^\[\]]*\]$", "", name)
    return name.replace("|", "\\|")


def _skip_reason(message: str) -> str:
    msg = re.sub(r"^skipped\s*-?\s*", "", message.strip(), flags=re.I)
    msg = msg.splitlines()[0] if msg else ""
    return msg.replace("|", "\\|")[:240]


def write_report(rows: list[dict], *, timings: dict[str, str], command: str) -> None:
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("passed", "failed", "skipped")}
    total_time = sum(r["time"] for r in rows)
    lines = [
        "# Upstream's storage e2e suites against pool.volplane.io",
        "",
        "Kubernetes' own External Storage suites (`test/e2e/storage/external`, v"
        f"{kind.versions()['KUBERNETES_VERSION'].lstrip('v')}) against volplane on kind, "
        "where volplane is the only PV binder, provisioner and attach/detach controller "
        "(kube-controller-manager runs without its two volume controllers). Driver definition: "
        "[hack/e2e-upstream/driver.yaml](../hack/e2e-upstream/driver.yaml); "
        "written by `make e2e-upstream` (hack/e2e-upstream/e2e.py).",
        "",
        f"**{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped** "
        f"({len(rows)} specs; {total_time / 60:.0f} min of test time) on "
        f"{datetime.date.today().isoformat()}.",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if timings:
        lines += ["| step | time |", "| --- | --- |"]
        lines += [f"| {k} | {val} |" for k, val in timings.items()]
        lines.append("")
    failed = [r for r in rows if r["state"] == "failed"]
    if failed:
        lines += ["## Failed", "", "| test | message |", "| --- | --- |"]
        for r in failed:
            lines.append(f"| {_short(r['name'])} | {_skip_reason(r['message'])} |")
        lines.append("")
    lines += ["## Passed", "", "| test | seconds |", "| --- | ---: |"]
    for r in sorted((r for r in rows if r["state"] == "passed"), key=lambda r: r["name"]):
        lines.append(f"| {_short(r['name'])} | {r['time']:.0f} |")
    lines.append("")
    skipped = [r for r in rows if r["state"] == "skipped"]
    by_reason: dict[str, list[str]] = {}
    for r in skipped:
        reason = _skip_reason(r["message"]) or "(no reason given)"
        by_reason.setdefault(reason, []).append(r["name"])
    lines += ["## Skipped, by the framework's reason", "",
              "Each reason is the framework's own message (the driver definition's comments "
              "say why a capability is not claimed).", "",
              "| reason | tests |", "| --- | ---: |"]
    for reason, names in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {reason} | {len(names)} |")
    lines += ["", "<details><summary>Every skipped test with its reason</summary>", "",
              "| test | reason |", "| --- | --- |"]
    for r in sorted(skipped, key=lambda r: r["name"]):
        lines.append(f"| {_short(r['name'])} | {_skip_reason(r['message'])} |")
    lines += ["", "</details>", ""]
    DOC.write_text("\n".join(lines))
    log(f"wrote {DOC}: {counts}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sub.add_parser("images")
    r = sub.add_parser("run")
    r.add_argument("--focus", default=FOCUS)
    r.add_argument("--skip", default=None)
    r.add_argument("--procs", type=int, default=int(os.environ.get("E2E_PROCS", "2")))
    r.add_argument("--timeout", default="6h")
    r.add_argument("--no-report", action="store_true",
                   help="do not rewrite docs/upstream-e2e.md (a partial run)")
    rep = sub.add_parser("report")
    rep.add_argument("junit", type=Path, nargs="+")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            print(e2e_test_binary())
            print(ginkgo_binary())
        elif args.cmd == "images":
            kind.engine_up()
            tags = build_images(e2e_test_binary())
            if kind.cluster_exists():
                load_images(tags)
            print("\n".join(tags))
        elif args.cmd == "run":
            timings: dict[str, str] = {}
            t0 = time.monotonic()
            e2e_test = e2e_test_binary()
            if args.procs > 1:
                ginkgo_binary()
            timings["e2e.test + ginkgo (cached after the first build)"] = \
                f"{time.monotonic() - t0:.0f} s"
            t0 = time.monotonic()
            kind.engine_up()
            tags = build_images(e2e_test)
            timings["test images built (cached after the first build)"] = \
                f"{time.monotonic() - t0:.0f} s"
            t0 = time.monotonic()
            kubeconfig = prepare_cluster()
            load_images(tags)
            timings["kind cluster with volplane, images loaded"] = f"{time.monotonic() - t0:.0f} s"
            t0 = time.monotonic()
            junits = run_suites(e2e_test, kubeconfig, args.focus, args.skip, args.procs,
                                args.timeout)
            timings[f"the suites ({args.procs} ginkgo processes, then [Disruptive] alone)"] = \
                f"{(time.monotonic() - t0) / 60:.0f} min"
            rows = merge_passes([row for junit in junits for row in parse_junit(junit)])
            if not args.no_report:
                cmd = (f"e2e.test -ginkgo.focus='{args.focus}'"
                       + (f" -ginkgo.skip='{args.skip}'" if args.skip else "")
                       + " -storage.testdriver=hack/e2e-upstream/driver.yaml -provider=local"
                       + f"   # {args.procs} ginkgo processes; then [Disruptive] alone")
                write_report(rows, timings=timings, command=cmd)
            failed = [r for r in rows if r["state"] == "failed"]
            for r in failed:
                log(f"FAILED: {_short(r['name'])}")
            return 1 if failed else 0
        elif args.cmd == "report":
            rows = merge_passes([row for junit in args.junit for row in parse_junit(junit)])
            write_report(rows, timings={},
                         command=f"(from {' '.join(str(j) for j in args.junit)})")
    except kind.KindError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
