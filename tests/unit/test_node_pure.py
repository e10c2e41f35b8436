"""Unit tests of the node side's pure parts: parsers (volplane.node.mounts), request
decisions (volplane.node.volumes) and the backing files' plan (volplane.node.backing)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from volplane.node import backing as B
from volplane.node import volumes as V
from volplane.node.mounts import (
    find_mount,
    mounts_of_source,
    parse_blkid,
    parse_losetup,
    parse_mountinfo,
    unescape,
)

GI = 1 << 30

MOUNTINFO = "".join(line + "\n" for line in (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    "40 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=1000k",
    "300 22 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/pool.volplane.io/abc/globalmount"
    " rw,relatime shared:90 - ext4 /dev/loop3 rw",
    "301 22 7:3 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount"
    " rw,relatime shared:90 - ext4 /dev/loop3 rw",
    "302 22 7:3 / /var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-1/mount"
    " ro,relatime shared:90 - ext4 /dev/loop3 rw",
    "303 22 0:5 /loop4 /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-2/u3"
    " rw,nosuid - devtmpfs udev rw",
    "304 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw",
    "305 304 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw",
    "garbage line",
))


def test_parse_mountinfo():
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 8  # the garbage line is skipped
    g = find_mount(entries, "/var/lib/kubelet/plugins/kubernetes.io/csi/pool.volplane.io/abc/"
                            "globalmount/")
    assert g is not None and g.device == (7, 3) and g.fs_type == "ext4"
    assert g.source == "/dev/loop3" and not g.read_only and g.root == "/"
    assert len(mounts_of_source(entries, (7, 3))) == 3
    ro = find_mount(entries, "/var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-1/mount")
    assert ro.read_only and "rw" in ro.super_options
    blk = find_mount(entries, "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/"
                              "publish/pvc-2/u3")
    assert blk.root == "/loop4" and blk.fs_type == "devtmpfs"
    # stacked mounts: the last one listed is on top
    assert find_mount(entries, "/mnt/with space").mount_id == 305
    assert find_mount(entries, "/nowhere") is None
    assert unescape(r"a\011b\134c") == "a\tb\\c"


def test_parse_losetup():
    text = """{"loopdevices": [
      {"name": "/dev/loop0", "back-file": "/var/lib/volplane/pools/p/pvc-1.img",
       "back-ino": 12, "back-maj:min": "   254:0 ", "ro": false, "offset": 0,
       "sizelimit": 0},
      {"name": "/dev/loop1", "back-file": "/var/lib/volplane/pools/p/pvc-2.img (deleted)",
       "back-ino": 13, "back-maj:min": "254:0", "ro": true}]}"""
    a, b = parse_losetup(text)
    assert a.name == "/dev/loop0" and a.back_file.endswith("pvc-1.img") and not a.read_only
    assert a.back_dev == (254, 0) and a.back_ino == 12 and not a.deleted
    assert b.deleted and b.back_file.endswith("pvc-2.img") and b.read_only
    assert parse_losetup("") == []
    assert parse_losetup('{"loopdevices": []}') == []


def test_parse_blkid():
    assert parse_blkid("DEVNAME=/dev/loop0\nUUID=abc\nTYPE=ext4\nUSAGE=filesystem\n") == {
        "DEVNAME": "/dev/loop0", "UUID": "abc", "TYPE": "ext4", "USAGE": "filesystem"}
    assert parse_blkid("") == {}


# --- decisions ----------------------------------------------------------------------------


def test_format_decision():
    assert V.format_decision({}, "ext4", False) == V.FORMAT
    assert V.format_decision({"TYPE": "ext4"}, "ext4", False) == V.MOUNT
    assert V.format_decision({"TYPE": "xfs"}, "xfs", True) == V.MOUNT
    for probe, ro in (({"TYPE": "xfs"}, False), ({"PTTYPE": "gpt"}, False),
                      ({"USAGE": "raid", "TYPE_HINT": "x"}, False), ({}, True)):
        with pytest.raises(V.CsiError) as e:
            V.format_decision(probe, "ext4", ro)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_staged_and_published_checks():
    entries = parse_mountinfo(MOUNTINFO)
    stg = "/var/lib/kubelet/plugins/kubernetes.io/csi/pool.volplane.io/abc/globalmount"
    se = find_mount(entries, stg)
    assert V.staged_check(None, (7, 3), stg, "ext4") is False
    assert V.staged_check(se, (7, 3), stg, "ext4") is True
    for dev, fs in (((7, 9), "ext4"), ((7, 3), "xfs")):
        with pytest.raises(V.CsiError) as e:
            V.staged_check(se, dev, stg, fs)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS

    rw = find_mount(entries, "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount")
    ro = find_mount(entries, "/var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-1/mount")
    assert V.published_check(None, se, "/t", False) is False
    assert V.published_check(rw, se, "/t", False) is True
    assert V.published_check(ro, se, "/t", True) is True
    other = find_mount(entries, "/mnt/with space")
    for entry, flag in ((rw, True), (ro, False), (other, False)):
        with pytest.raises(V.CsiError) as e:
            V.published_check(entry, se, "/t", flag)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS

    assert V.block_published_check(None, False, {(7, 4)}, "/t") is False
    assert V.block_published_check((7, 4), True, {(7, 4)}, "/t") is True
    with pytest.raises(V.CsiError):
        V.block_published_check(None, True, {(7, 4)}, "/t")


def test_expand_target():
    assert V.expand_target(2 * GI, 0, GI) == 2 * GI
    assert V.expand_target(GI, 0, 2 * GI) == 2 * GI  # never shrinks
    assert V.expand_target(0, 0, GI) == GI
    for req, lim, cur in ((3 * GI, 2 * GI, GI), (GI, GI // 2, GI), (-1, 0, GI)):
        with pytest.raises(V.CsiError):
            V.expand_target(req, lim, cur)


class _Cap:
    """A stand-in for csi.v1 VolumeCapability with the fields parse_capability reads."""

    def __init__(self, kind, mode, fs_type="", flags=()):
        self.kind = kind
        self.access_mode = type("AM", (), {"mode": mode})()
        self.mount = type("M", (), {"fs_type": fs_type, "mount_flags": list(flags),
                                    "volume_mount_group": ""})()

    def WhichOneof(self, _):
        return self.kind

    def HasField(self, name):
        return name == "access_mode" and self.access_mode.mode is not None


def test_parse_capability():
    c = V.parse_capability(_Cap("mount", V.SINGLE_NODE_WRITER, "", ("noatime,nodiratime",)))
    assert (c.block, c.fs_type, c.mount_flags) == (False, "ext4", ("noatime", "nodiratime"))
    c = V.parse_capability(_Cap("mount", V.SINGLE_NODE_READER_ONLY, ""),
                           {V.FSTYPE_KEY: "xfs"})
    assert c.fs_type == "xfs" and c.read_only_mode and V.stage_mount_options(c) == ["ro"]
    assert V.parse_capability(_Cap("block", V.MULTI_NODE_MULTI_WRITER)).block
    bad = [(None, grpc.StatusCode.INVALID_ARGUMENT),
           (_Cap(None, V.SINGLE_NODE_WRITER), grpc.StatusCode.INVALID_ARGUMENT),
           (_Cap("mount", V.UNKNOWN), grpc.StatusCode.INVALID_ARGUMENT),
           (_Cap("mount", 42), grpc.StatusCode.INVALID_ARGUMENT),
           (_Cap("mount", V.SINGLE_NODE_WRITER, "ntfs"), grpc.StatusCode.INVALID_ARGUMENT),
           (_Cap("mount", V.MULTI_NODE_MULTI_WRITER), grpc.StatusCode.FAILED_PRECONDITION)]
    for cap, code in bad:
        with pytest.raises(V.CsiError) as e:
            V.parse_capability(cap)
        assert e.value.code == code, cap


# --- backing -------------------------------------------------------------------------------


def pool(name, path=None, names=("n0",), backing=True, **status_backing):
    spec = {"capacity": "10Gi", "nodes": {"names": list(names)}}
    if backing:
        spec["backing"] = {"type": "File", **({"path": path} if path else {})}
    obj = {"metadata": {"name": name}, "spec": spec}
    if status_backing:
        obj["status"] = {"backing": status_backing}
    return obj


def alloc(name, pool_name, size):
    return {"metadata": {"name": name}, "spec": {"pool": pool_name, "sizeBytes": size}}


def pv(name, handle):
    return {"metadata": {"name": name},
            "spec": {"csi": {"driver": "pool.volplane.io", "volumeHandle": handle}}}


def test_pool_backing_and_files():
    assert B.pool_backing(pool("p", backing=False)) is None
    assert B.pool_backing(pool("p")) == B.Backing("File", "/var/lib/volplane/pools/p")
    assert B.pool_backing(pool("p", "/var/lib/volplane/x/")).path == "/var/lib/volplane/x"
    for spec, field in (({"type": "LVM"}, "spec.backing.type"),
                        ({"type": "File", "path": "rel/dir"}, "spec.backing.path"),
                        ({"type": "File", "path": "/a/../etc"}, "spec.backing.path")):
        with pytest.raises(B.BackingError) as e:
            B.pool_backing({"metadata": {"name": "p"}, "spec": {"backing": spec}})
        assert e.value.field == field
    assert B.split_handle("p/pvc-1") == ("p", "pvc-1")
    for h in ("p", "/x", "p/", "p/../x", "p/a/b", "p/.hidden", "p/x.img"):
        with pytest.raises(B.BackingError):
            B.split_handle(h)
    assert B.publish_context(pool("p"), "p/pvc-1") == {
        "backingType": "File", "backingFile": "/var/lib/volplane/pools/p/pvc-1.img"}
    assert B.publish_context(pool("p", backing=False), "p/pvc-1") == {}
    assert B.publish_context(pool("p"), "garbage") == {}
    assert B.volume_of_file("pvc-1.img") == "pvc-1"
    assert B.volume_of_file("pvc-1.img.tmp") is None and B.volume_of_file("notes.txt") is None
    assert B.within("/var/lib/volplane/pools/p", "/var/lib/volplane")
    assert not B.within("/var/lib/volplane-other/p", "/var/lib/volplane")


def test_reported_capacity():
    assert B.reported_capacity(pool("p")) is None  # no report yet: spec.capacity counts
    assert B.reported_capacity(pool("p", capacityBytes=5 * GI)) == 5 * GI
    assert B.reported_capacity(pool("p", backing=False, capacityBytes=5 * GI)) is None
    assert B.reported_capacity(pool("p", capacityBytes="5Gi")) is None
    assert B.reported_capacity(pool("p", capacityBytes=True)) is None


def _reaches_n0(p):
    return "n0" in p["spec"]["nodes"]["names"]


def test_plan_creates_grows_and_deletes_only_orphans():
    pools = {"p": pool("p"), "q": pool("q", names=("n9",)), "r": pool("r", backing=False)}
    allocs = {"pvc-new": alloc("pvc-new", "p", GI), "pvc-grown": alloc("pvc-grown", "p", 2 * GI),
              "pvc-same": alloc("pvc-same", "p", GI), "pvc-q": alloc("pvc-q", "q", GI),
              "pvc-r": alloc("pvc-r", "r", GI)}
    f = B.FileState
    files = {"p": {"pvc-grown.img": f(GI, 0), "pvc-same.img": f(GI, 4096),
                   "pvc-gone.img": f(GI, 0), "pvc-retained.img": f(GI, 0),
                   "pvc-attached.img": f(GI, 0, attached=True), "README": f(1, 1)}}
    pvs = [pv("other-name", "p/pvc-retained")]  # a re-created PV of a retained volume
    p = B.plan(pools, allocs, pvs, files, _reaches_n0)
    assert set(p.dirs) == {"p"}  # q does not reach this node, r has no backing
    assert [(a.volume, a.size) for a in p.of("create")] == [("pvc-new", GI)]
    assert [(a.volume, a.size) for a in p.of("grow")] == [("pvc-grown", 2 * GI)]
    assert [a.path for a in p.of("delete")] == ["/var/lib/volplane/pools/p/pvc-gone.img"]
    assert p.problems == []


def test_plan_names_a_backing_outside_the_root():
    p = B.plan({"p": pool("p", "/srv/data")}, {"a": alloc("a", "p", GI)}, [], {}, _reaches_n0)
    assert p.actions == [] and p.dirs == {}
    assert p.problems[0][:2] == ("p", "spec.backing.path")


@given(st.dictionaries(st.from_regex(r"pvc-[a-z0-9]{1,8}", fullmatch=True),
                       st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=12))
def test_plan_never_deletes_a_file_with_a_record_or_a_pv(cases):
    """Whatever the mix, a delete is planned only for files with neither record nor PV."""
    allocs, pvs, files = {}, [], {}
    for name, (has_alloc, has_pv, has_file) in cases.items():
        if has_alloc:
            allocs[name] = alloc(name, "p", GI)
        if has_pv:
            pvs.append(pv(name, f"p/{name}"))
        if has_file:
            files[f"{name}.img"] = B.FileState(GI, 0)
    p = B.plan({"p": pool("p")}, allocs, pvs, {"p": files}, _reaches_n0)
    deleted = {a.volume for a in p.of("delete")}
    assert deleted == {n for n, (a, v, f) in cases.items() if f and not a and not v}
    assert {a.volume for a in p.of("create")} == {n for n, (a, v, f) in cases.items()
                                                   if a and not f}


def test_capacity_report_and_differs():
    assert B.capacity_report(10 * GI, 2 * GI) == 12 * GI
    have = {"type": "File", "path": "/x", "capacityBytes": 100 * GI, "freeBytes": 90 * GI,
            "usedBytes": 10 * GI, "message": None}
    assert not B.report_differs(have, dict(have, freeBytes=90 * GI - (1 << 20)))
    assert B.report_differs(have, dict(have, freeBytes=80 * GI))
    assert B.report_differs(have, dict(have, message="spec.backing.path: ..."))
    assert B.report_differs(None, have)
