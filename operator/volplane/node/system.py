"""The node plugin's only door to the system: losetup, blkid, mkfs, mount, resize tools.

Every method is one command (or one syscall) and raises ``CommandError`` with the
command line and its stderr when it fails; the decisions live in ``volumes.py`` and
the sequencing in ``ops.py``. Tools are looked up on $PATH (Debian packages
util-linux, mount, e2fsprogs, xfsprogs, btrfs-progs).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

from .. import logs
from .mounts import LoopDevice, MountEntry, parse_blkid, parse_losetup, parse_mountinfo

log = logs.get("node-system")

TIMEOUT = 300.0  # mkfs of a large volume, resize2fs of a busy one

MKFS = {
    "ext2": ["mkfs.ext2", "-F", "-m0"],
    "ext3": ["mkfs.ext3", "-F", "-m0"],
    "ext4": ["mkfs.ext4", "-F", "-m0"],
    "xfs": ["mkfs.xfs", "-f"],
    "btrfs": ["mkfs.btrfs", "-f"],
}
LOSETUP_LIST = ("-J", "-l", "-O", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO,OFFSET,SIZELIMIT")
TOOLS = ("losetup", "blkid", "mount", "umount", "mkfs.ext4", "resize2fs")


class CommandError(Exception):
    def __init__(self, argv: list[str], code: int, stderr: str):
        self.argv = argv
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(argv)}: exit {code}: {self.stderr}")


class System:
    def __init__(self, mountinfo_path: str = "/proc/self/mountinfo"):
        self.mountinfo_path = mountinfo_path

    # -- commands ---------------------------------------------------------------------------
    def run(self, *argv: str, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT,
                               stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise CommandError(list(argv), 127, f"{argv[0]} not installed") from e
        except subprocess.TimeoutExpired as e:
            raise CommandError(list(argv), -1, f"timed out after {TIMEOUT:.0f}s") from e
        log.debug("ran", argv=list(argv), code=r.returncode)
        if r.returncode not in ok_codes:
            raise CommandError(list(argv), r.returncode, r.stderr or r.stdout)
        return r

    @staticmethod
    def missing_tools(tools=TOOLS) -> list[str]:
        return [t for t in tools if shutil.which(t) is None]

    # -- mounts -----------------------------------------------------------------------------
    def mountinfo(self) -> list[MountEntry]:
        with open(self.mountinfo_path) as f:
            return parse_mountinfo(f.read())

    def mount(self, source: str, target: str, fs_type: str | None = None,
              options: list[str] | tuple[str, ...] = ()) -> None:
        argv = ["mount"]
        if fs_type:
            argv += ["-t", fs_type]
        if options:
            argv += ["-o", ",".join(options)]
        self.run(*argv, source, target)

    def bind(self, source: str, target: str, read_only: bool = False,
             flags: list[str] | tuple[str, ...] = ()) -> None:
        self.run("mount", "--bind", source, target)
        if read_only or flags:
            # A bind mount takes its own options only on a remount.
            opts = ["remount", "bind", *(["ro"] if read_only else []), *flags]
            self.run("mount", "-o", ",".join(opts), target)

    def umount(self, target: str) -> None:
        self.run("umount", target)

    # -- loop devices -----------------------------------------------------------------------
    def loops_of(self, path: str) -> list[LoopDevice]:
        """Loop devices backed by the file at `path` (matched by device and inode)."""
        r = self.run("losetup", *LOSETUP_LIST, "-j", path)
        return parse_losetup(r.stdout)

    def all_loops(self) -> list[LoopDevice]:
        return parse_losetup(self.run("losetup", *LOSETUP_LIST).stdout)

    def loop_info(self, device: str) -> LoopDevice | None:
        try:
            r = self.run("losetup", *LOSETUP_LIST, device)
        except CommandError:
            return None
        found = parse_losetup(r.stdout)
        return found[0] if found else None

    def attach(self, path: str, read_only: bool = False) -> str:
        argv = ["losetup", "--find", "--show", "--nooverlap"]
        if read_only:
            argv.append("--read-only")
        return self.run(*argv, path).stdout.strip()

    def attach_new(self, path: str, read_only: bool = False) -> str:
        """A new loop device even if one exists (for a read-only view of a rw file)."""
        argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
        return self.run(*argv, path).stdout.strip()

    def detach(self, device: str) -> None:
        try:
            self.run("losetup", "--detach", device)
        except CommandError as e:
            if "No such device" in e.stderr or "No such device or address" in e.stderr:
                return  # already detached
            raise

    def refresh(self, device: str) -> None:
        """Make the loop device see its backing file's new size (losetup -c)."""
        self.run("losetup", "--set-capacity", device)

    @staticmethod
    def rdev(device: str) -> tuple[int, int]:
        st = os.stat(device)
        if not stat.S_ISBLK(st.st_mode):
            raise CommandError(["stat", device], 1, "not a block device")
        return (os.major(st.st_rdev), os.minor(st.st_rdev))

    @staticmethod
    def device_size(device: str) -> int:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    # -- filesystems ------------------------------------------------------------------------
    def blkid(self, device: str) -> dict[str, str]:
        """Probe the device (low-level, no cache). Exit 2 = nothing found = {}."""
        r = self.run("blkid", "-p", "-o", "export", device, ok_codes=(0, 2))
        return parse_blkid(r.stdout) if r.returncode == 0 else {}

    def mkfs(self, device: str, fs_type: str) -> None:
        argv = MKFS.get(fs_type)
        if argv is None:
            raise CommandError(["mkfs", fs_type], 1, f"unsupported filesystem {fs_type!r}")
        self.run(*argv, device)

    def ext_fs_size(self, device: str) -> int:
        """Bytes an ext2/3/4 filesystem spans (block count x block size), from dumpe2fs."""
        out = self.run("dumpe2fs", "-h", device).stdout
        fields = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return int(fields["Block count"]) * int(fields["Block size"])

    def grow_ext_offline(self, device: str) -> None:
        """Check (e2fsck -f -p: exit 0/1 = clean/fixed) then grow an unmounted ext fs."""
        self.run("e2fsck", "-f", "-p", device, ok_codes=(0, 1))
        self.run("resize2fs", device)

    def resize_fs(self, device: str, mount_point: str, fs_type: str) -> None:
        """Grow the filesystem to its device's size, online (it is mounted)."""
        if fs_type in ("ext2", "ext3", "ext4"):
            self.run("resize2fs", device)
        elif fs_type == "xfs":
            self.run("xfs_growfs", mount_point)
        elif fs_type == "btrfs":
            self.run("btrfs", "filesystem", "resize", "max", mount_point)
        else:
            raise CommandError(["resize", fs_type], 1, f"cannot grow a {fs_type} filesystem")

    # -- files ------------------------------------------------------------------------------
    @staticmethod
    def grow_file(path: str, size: int) -> int:
        """Grow `path` to `size` bytes (sparse); never shrinks. Returns the new size."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            have = os.fstat(fd).st_size
            if have < size:
                os.ftruncate(fd, size)
                os.fsync(fd)
                return size
            return have
        finally:
            os.close(fd)

    @staticmethod
    def remove_path(path: str) -> None:
        """Remove a publish target (an empty directory or a file); gone is fine."""
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
