"""Which filesystem a path lives on, read from /proc/self/mountinfo, so the watcher can tell a
network share (where inotify misses other machines' changes) from a local disk."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NETWORK_FILESYSTEMS",
    "Mount",
    "filesystem_type",
    "find_mount",
    "is_network_filesystem",
    "mount_point",
    "parse_mountinfo",
    "read_mountinfo",
]

MOUNTINFO = Path("/proc/self/mountinfo")

# Filesystems whose files can change behind the local kernel's back, so inotify sees only local
# writes. Host-shared folders of virtual machines (virtiofs, vboxsf, 9p, drvfs) behave the same.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "davfs",
        "sshfs",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "drvfs",
        "prl_fs",
    }
)
# FUSE reports "fuse.<program>"; these programs reach a remote store.
_NETWORK_FUSE = frozenset(
    {
        "sshfs",
        "rclone",
        "s3fs",
        "gcsfuse",
        "goofys",
        "glusterfs",
        "ceph-fuse",
        "cephfs",
        "juicefs",
        "davfs",
        "davfs2",
        "smbnetfs",
        "curlftpfs",
        "gvfsd-fuse",
        "vmhgfs-fuse",
        "onedriver",
    }
)

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where it is mounted, what kind of filesystem, from where."""

    mount_point: str
    fstype: str
    source: str


def parse_mountinfo(text: str | bytes) -> list[Mount]:
    """Parse the text of /proc/<pid>/mountinfo (see proc(5)); malformed lines are skipped.

    Fields are space separated and the kernel escapes space, tab, newline and backslash in
    paths as octal (\\040 ...); names that are not UTF-8 come back with surrogate escapes, as
    os.fsdecode gives them.
    """
    raw = os.fsencode(text) if isinstance(text, str) else text
    mounts = []
    for line in raw.splitlines():
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)
            mount_point = fields[4]
            fstype, source = fields[separator + 1], fields[separator + 2]
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(_unescape(mount_point), _unescape(fstype), _unescape(source)))
    return mounts


def read_mountinfo() -> list[Mount]:
    """This process's mount table; empty where there is no /proc (not Linux)."""
    try:
        return parse_mountinfo(MOUNTINFO.read_bytes())
    except OSError:
        return []


def find_mount(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> Mount | None:
    """The mount holding `path` (resolved through symlinks): the longest mount point that is a
    whole-component prefix of it; of two mounts on the same point the later one, which hides
    the earlier. None when the mount table is unknown."""
    table = read_mountinfo() if mounts is None else mounts
    resolved = os.path.realpath(os.fspath(path))
    best: Mount | None = None
    for mount in table:
        if _contains(mount.mount_point, resolved) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def mount_point(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> str:
    """The mount point of the filesystem holding `path` ("/" when the table is unknown)."""
    mount = find_mount(path, mounts)
    return mount.mount_point if mount else "/"


def filesystem_type(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> str:
    """The filesystem type of `path` as the kernel names it ("ext4", "nfs4", "fuse.sshfs"), or
    "" when it cannot be told."""
    mount = find_mount(path, mounts)
    return mount.fstype if mount else ""


def is_network_filesystem(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> bool:
    """True when `path` is on a network or host-shared filesystem (see NETWORK_FILESYSTEMS)."""
    fstype = filesystem_type(path, mounts)
    if fstype in NETWORK_FILESYSTEMS:
        return True
    kind, _, program = fstype.partition(".")
    return kind == "fuse" and program in _NETWORK_FUSE


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))
