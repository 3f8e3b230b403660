"""The commands over the daemon's state: status, history, retry, reprocess, quarantine."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from daemon.cli.base import EXIT_FAILED, EXIT_OK, open_state, relative_to_watched
from daemon.config import Config
from daemon.store import Store, run_json
from pipeline.chain import ChainConfigError

__all__ = ["register"]

_NOTABLE_EVENTS = ("refused", "unreadable", "waiting")


def register(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="queue counts, current job, recent failures")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
    history = commands.add_parser("history", help="every version made of a source")
    history.add_argument("path", type=Path, metavar="PATH")
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=_history)
    retry = commands.add_parser("retry", help="queue failed or quarantined files again")
    retry.add_argument("path", type=Path, nargs="?", metavar="PATH")
    retry.add_argument("--all-failed", action="store_true")
    retry.add_argument("--json", action="store_true")
    retry.set_defaults(handler=_retry)
    reprocess = commands.add_parser("reprocess", help="make a new version of a source now")
    reprocess.add_argument("path", type=Path, metavar="PATH")
    reprocess.add_argument(
        "--preset",
        help="make the version with this preset (the running daemon builds its chain), "
        "not the config's",
    )
    reprocess.add_argument("--json", action="store_true")
    reprocess.set_defaults(handler=_reprocess)
    quarantine = commands.add_parser("quarantine", help="files set aside after repeated failure")
    quarantine_actions = quarantine.add_subparsers(dest="action", required=True)
    quarantine_list = quarantine_actions.add_parser("list")
    quarantine_list.add_argument("--json", action="store_true")
    quarantine_list.set_defaults(handler=_quarantine_list)


def _status(args: argparse.Namespace, config: Config) -> int:
    from daemon.cluster.registry import WorkerRegistry
    from daemon.schedule import ActiveHours

    store, queue = open_state(config)
    with contextlib.closing(store):
        hours = ActiveHours.parse(config.schedule.active_hours)
        fixity = store.fixity_status()
        report = {
            "counts": queue.counts(),
            "current": [
                {"path": job.path, "job": job.id, "since": str(job.heartbeat_at)}
                for job in queue.current()
            ],
            "recent_failures": [
                {
                    "path": job.path,
                    "state": job.state,
                    "error": job.last_error,
                    "attempts": job.attempts,
                }
                for job in queue.recent_failures(10)
            ],
            "recent_events": [
                {"at": e.occurred_at.isoformat(), "kind": e.kind, "path": e.path, **e.detail}
                for e in store.events(kinds=_NOTABLE_EVENTS, limit=20)
            ],
            "workers": [record.as_json() for record in WorkerRegistry(store).workers()],
            "next_window": None if hours.always else hours.next_open().isoformat(),
            "window_open": hours.is_open(),
            "fixity": None
            if fixity is None
            else {
                "finished_at": fixity.finished_at.isoformat(),
                "checked": fixity.checked,
                "problems": [{"kind": e.kind, "path": e.path} for e in fixity.problems],
            },
        }
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    counts = ", ".join(f"{state} {count}" for state, count in report["counts"].items())
    print(f"queue: {counts}")
    for job in report["current"]:
        print(f"processing: {job['path']}")
    for worker in report["workers"]:
        print(_worker_line(worker))
    print(
        "window: always open"
        if report["next_window"] is None
        else f"window: {'open' if report['window_open'] else 'closed'}, "
        f"next opens {report['next_window']}"
    )
    for job in report["recent_failures"]:
        print(f"{job['state']}: {job['path']}: {job['error']}")
    for event in report["recent_events"]:
        print(f"{event['kind']}: {event['path']}: {event.get('reason') or event.get('error', '')}")
    if report["fixity"]:
        fix = report["fixity"]
        print(
            f"fixity: {fix['checked']} files checked at {fix['finished_at']}, "
            f"{len(fix['problems'])} problems"
        )
        for problem in fix["problems"]:
            print(f"  {problem['kind']}: {problem['path']}")
    return EXIT_OK


def _worker_line(worker: dict) -> str:
    """A cluster worker in `status`: who, where, what, when last heard, how much done."""
    text = (
        f"worker {worker['name']} ({worker['ident']}, {worker['device']}): {worker['state']}"
        f"{', on ' + worker['job'] if worker['job'] else ''}; heartbeat "
        f"{worker['last_heartbeat_at']}; {worker['jobs_done']} done"
    )
    return text + (f"; error: {worker['error']}" if worker["error"] else "")


def _history(args: argparse.Namespace, config: Config) -> int:
    store, _queue = open_state(config)
    relative = relative_to_watched(config, args.path)
    with contextlib.closing(store):
        runs = store.history(relative)
        reviews = {run.id: _run_reviews(store, run.id) for run in runs}
    records = [{**run_json(run), "reviews": reviews[run.id]} for run in runs]
    if args.json:
        print(json.dumps(records))
    else:
        if not records:
            print(f"{relative}: no runs recorded")
        for record in records:
            outputs = ", ".join(o["path"] for o in record["outputs"]) or "-"
            stages = " -> ".join(
                s["stage"] + (f" ({s['model']})" if s["model"] else "") for s in record["stages"]
            )
            recipe = record["recipe_sha256"][:12]
            print(
                f"{record['finished_at']} {record['status']} {record['path']} recipe {recipe}: "
                f"{stages or '-'}: {outputs}"
            )
            for review in record["reviews"]:
                note = f": {review['note']}" if review["note"] else ""
                print(
                    f"  {review['decision']} by {review['reviewer']} at {review['decided_at']} "
                    f"({review['output']}){note}"
                )
    return EXIT_OK if records else EXIT_FAILED


def _run_reviews(store: Store, run_id: int) -> list[dict[str, object]]:
    """Every decision on the images a run published, oldest first."""
    return [
        review.as_json()
        for output_id, output in store.run_outputs(run_id)
        if output.kind == "image"
        for review in store.reviews(output_id)
    ]


def _retry(args: argparse.Namespace, config: Config) -> int:
    from daemon.actions import retry

    if (args.path is None) == (not args.all_failed):
        raise ChainConfigError(["retry: give a PATH or --all-failed"])
    store, queue = open_state(config)
    with contextlib.closing(store):
        path = None if args.path is None else relative_to_watched(config, args.path)
        jobs = retry(queue, path, all_failed=args.all_failed)
    if args.json:
        print(json.dumps([{"path": job.path, "job": job.id} for job in jobs]))
    else:
        print(f"{len(jobs)} queued again" + "".join(f"\n  {job.path}" for job in jobs))
    return EXIT_OK if jobs else EXIT_FAILED


def _reprocess(args: argparse.Namespace, config: Config) -> int:
    from daemon.actions import reprocess

    relative = relative_to_watched(config, args.path)
    store, queue = open_state(config)
    with contextlib.closing(store):
        queued = reprocess(config, store, queue, relative, args.preset)
    result = {"path": relative, "job": queued.job_id, "created": queued.created}
    print(json.dumps(result) if args.json else f"{relative}: queued as job {queued.job_id}")
    return EXIT_OK


def _quarantine_list(args: argparse.Namespace, config: Config) -> int:
    store, queue = open_state(config)
    with contextlib.closing(store):
        jobs = queue.quarantined()
    records = [
        {
            "path": j.path,
            "reason": j.quarantine_reason,
            "attempts": j.attempts,
            "worker_deaths": j.worker_deaths,
        }
        for j in jobs
    ]
    if args.json:
        print(json.dumps(records))
    else:
        for record in records:
            print(f"{record['path']}: {record['reason']}")
        if not records:
            print("nothing quarantined")
    return EXIT_OK
