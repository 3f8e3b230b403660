"""Filesystem type from mountinfo: parsing the kernel's escapes, the longest mount point winning,
network shares told from local disks, and this machine's own mount table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.fsinfo import (
    MOUNTINFO,
    Mount,
    filesystem_type,
    find_mount,
    is_network_filesystem,
    mount_point,
    parse_mountinfo,
    read_mountinfo,
)

SAMPLE = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 0:45 / /mnt/nas rw,relatime shared:12 master:3 - nfs4 nas:/volume1/scans rw,vers=4.2
41 27 0:46 / /mnt/nas-archive rw,relatime - ext4 /dev/sdb1 rw
42 40 0:47 / /mnt/nas/local rw - tmpfs tmpfs rw
43 27 0:48 / /mnt/Scans\040from\011Mum\134s rw - cifs //pc/Scans\040share rw
44 27 0:49 / /home/user/remote rw,nosuid - fuse.sshfs user@host:/photos rw
45 27 0:50 / /mnt/usb rw - fuseblk /dev/sdc1 rw
46 27 0:51 / /mnt/usb rw - cifs //pc/over rw
this line is not mountinfo
47 27 0:52 / /mnt/\303\251t\351 rw - 9p drvfs rw
"""

MOUNTS = parse_mountinfo(SAMPLE)


def test_parse_reads_point_type_and_source_and_skips_junk():
    assert MOUNTS[2] == Mount("/mnt/nas", "nfs4", "nas:/volume1/scans")
    assert len(MOUNTS) == 10


def test_parse_undoes_the_kernel_octal_escapes():
    assert MOUNTS[5] == Mount("/mnt/Scans from\tMum\\s", "cifs", "//pc/Scans share")
    # \303\251 is UTF-8 "é"; a lone \351 is Latin-1, kept as a surrogate escape like os.fsdecode
    assert os.fsencode(MOUNTS[9].mount_point) == b"/mnt/\xc3\xa9t\xe9"


def test_the_longest_mount_point_on_whole_components_wins():
    assert mount_point("/mnt/nas/2019/scan.tif", MOUNTS) == "/mnt/nas"
    assert mount_point("/mnt/nas/local/scan.tif", MOUNTS) == "/mnt/nas/local"
    assert mount_point("/mnt/nas-archive/scan.tif", MOUNTS) == "/mnt/nas-archive"
    assert mount_point("/mnt/nas", MOUNTS) == "/mnt/nas"
    assert mount_point("/srv/photos", MOUNTS) == "/"
    assert mount_point("/mnt/Scans from\tMum\\s/a.tif", MOUNTS) == "/mnt/Scans from\tMum\\s"


def test_a_later_mount_on_the_same_point_hides_the_earlier():
    assert filesystem_type("/mnt/usb/scan.tif", MOUNTS) == "cifs"


@pytest.mark.parametrize(
    ("path", "network"),
    [
        ("/mnt/nas/scan.tif", True),  # nfs4
        ("/mnt/Scans from\tMum\\s", True),  # cifs
        ("/home/user/remote/a.tif", True),  # fuse.sshfs
        (os.fsdecode(b"/mnt/\xc3\xa9t\xe9/a.tif"), True),  # 9p (WSL, VM shares)
        ("/mnt/nas/local/a.tif", False),  # tmpfs mounted inside the share
        ("/mnt/nas-archive/a.tif", False),  # ext4 beside it
        ("/srv/a.tif", False),
        ("/proc/self", False),
    ],
)
def test_network_filesystems_are_told_from_local_ones(path, network):
    assert is_network_filesystem(path, MOUNTS) is network


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("smb3", True),
        ("fuse.rclone", True),
        ("fuse.s3fs", True),
        ("ceph", True),
        ("glusterfs", True),
        ("virtiofs", True),
        ("fuse.gocryptfs", False),
        ("fuseblk", False),
        ("btrfs", False),
        ("zfs", False),
    ],
)
def test_each_kind_of_filesystem_is_classified(fstype, network):
    mounts = [Mount("/", "ext4", "/dev/vda"), Mount("/data", fstype, "x")]
    assert is_network_filesystem("/data/scan.tif", mounts) is network


def test_an_empty_mount_table_tells_nothing():
    assert filesystem_type("/anything", []) == ""
    assert mount_point("/anything", []) == "/"
    assert find_mount("/anything", []) is None and not is_network_filesystem("/anything", [])


def test_bytes_and_str_mountinfo_parse_alike():
    assert parse_mountinfo(SAMPLE.encode()) == MOUNTS


# ---------------------------------------------------------------- this machine

needs_proc = pytest.mark.skipif(not MOUNTINFO.exists(), reason="no /proc/self/mountinfo here")


@needs_proc
def test_this_machine_proc_and_root_are_found():
    assert read_mountinfo(), "the mount table should not be empty"
    assert filesystem_type("/proc/self/status") == "proc"
    assert mount_point("/proc/self") == "/proc"
    assert filesystem_type("/") != ""


@needs_proc
def test_a_temporary_folder_lies_on_a_mount_point_that_is_really_one(tmp_path):
    point = Path(mount_point(tmp_path))
    resolved = Path(os.path.realpath(tmp_path))
    assert point in (resolved, *resolved.parents)
    assert os.path.ismount(point)
    assert filesystem_type(tmp_path) == find_mount(tmp_path).fstype != ""


@needs_proc
def test_a_symlink_is_resolved_before_looking_up_its_mount(tmp_path):
    link = tmp_path / "into-proc"
    link.symlink_to("/proc/self")
    assert filesystem_type(link) == "proc"
    assert filesystem_type(tmp_path) == filesystem_type(os.path.realpath(tmp_path))
