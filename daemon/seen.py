"""Whether a file was already seen: what identifies one version of a file (size, mtime, inode),
the one rule that compares two versions, and the versions the database already vouches for."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # at run time this module needs neither: the watcher imports it alone
    from daemon.queue import JobQueue
    from daemon.store import Observation, Store

__all__ = ["Version", "already_seen", "hash_if_seen", "recorded_version", "seen_versions"]


class Version(NamedTuple):
    """What identifies one version of a file: a new size, mtime or inode is a new version. The
    inode tells a file replaced by a rename (a copy that kept size and mtime) from the one
    that was hashed; the mtime, to the nanosecond, a file rewritten in place."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, info: os.stat_result) -> Version:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino)


def already_seen(recorded: Version | None, current: Version) -> bool:
    """The one rule for "already seen", for the watcher (is this a version it handed over?) and
    the daemon's ingest (are these the bytes it hashed?): the version recorded for the path
    is the version on disk now. Nothing recorded is never seen."""
    return recorded is not None and recorded == current


def recorded_version(observation: Observation | None) -> Version | None:
    """The version an observation was hashed from; None when the file was gone or when the
    row predates the recording of mtime and inode (such a file is hashed once more)."""
    if observation is None or observation.source_sha256 is None:
        return None
    size, mtime_ns, inode = observation.size, observation.mtime_ns, observation.inode
    if size is None or mtime_ns is None or inode is None:
        return None
    return Version(size, mtime_ns, inode)


def hash_if_seen(observation: Observation | None, current: Version) -> str | None:
    """The hash recorded for a path when its file is still the version that was hashed (the
    ingest then need not read it again), else None."""
    if already_seen(recorded_version(observation), current):
        assert observation is not None  # a recorded version comes from an observation
        return observation.source_sha256
    return None


def seen_versions(store: Store, queue: JobQueue, recipe_sha256: str) -> dict[str, Version]:
    """The watcher's start-up knowledge: each path whose latest observation recorded its
    version and whose bytes need nothing more under this recipe (a job for them is queued,
    running, failed and waiting, done or quarantined). A path missing here (a new recipe, a
    crash between hashing and queueing, a row from before 0004) is handed over again and
    the ingest decides, by `already_seen`, whether it must be hashed."""
    coverage = queue.coverage(recipe_sha256)
    seeded = {}
    for observation in store.latest_observations():
        version = recorded_version(observation)
        sha = observation.source_sha256
        if version is not None and sha is not None and coverage.covers(observation.path, sha):
            seeded[observation.path] = version
    return seeded
