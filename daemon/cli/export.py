"""`scanrestore export premis`: the provenance store as PREMIS 3 XML, one document per source."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

from daemon.cli.base import EXIT_FAILED, EXIT_OK, open_state, relative_to_watched
from daemon.config import Config, model_store

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="provenance in archives' standards")
    kinds = export.add_subparsers(dest="standard", required=True)
    premis = kinds.add_parser(
        "premis", help="PREMIS 3 XML per source: objects, events, agents, derivations"
    )
    premis.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="source files")
    premis.add_argument("--all", action="store_true", help="every source the daemon recorded")
    premis.add_argument(
        "--out",
        type=Path,
        help="folder for <name>.<sha256 prefix>.premis.xml files (default: standard output, "
        "for one source)",
    )
    premis.add_argument(
        "--mets",
        action="store_true",
        help="wrap each PREMIS document in METS (fileSec with checksums, a structMap of the "
        "source and its versions): <name>.<sha256 prefix>.mets.xml",
    )
    premis.set_defaults(handler=_export_premis)


def _export_premis(args: argparse.Namespace, config: Config) -> int:
    from daemon.mets import mets_xml
    from daemon.premis import premis_xml
    from daemon.processing import code_version

    if bool(args.paths) == bool(args.all):
        print("error: name source PATHs or --all, not both", file=sys.stderr)
        return EXIT_FAILED
    store, _ = open_state(config)
    try:
        sources, failed = _sources(args, config, store)
        if args.out is None and len(sources) != 1:
            print("error: --out DIR is needed for more than one source", file=sys.stderr)
            return EXIT_FAILED
        licences = {
            model_id: spec.licence for model_id, spec in model_store(config).specs().items()
        }
        software = f"scanrestore {code_version()}"
        for sha, name in sources:
            if args.mets:
                document = mets_xml(store, sha, licences=licences, software=software)
            else:
                document = premis_xml(store, sha, licences=licences)
            if args.out is None:
                sys.stdout.buffer.write(document)
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            kind = "mets" if args.mets else "premis"
            target = args.out / f"{PurePosixPath(name).name}.{sha[:12]}.{kind}.xml"
            temp = target.with_name(f".{target.name}.tmp")
            temp.write_bytes(document)
            temp.replace(target)
            print(f"ok     {name} -> {target}")
    finally:
        store.close()
    return EXIT_FAILED if failed else EXIT_OK


def _sources(args: argparse.Namespace, config: Config, store) -> tuple[list[tuple[str, str]], int]:
    """(sha256, a name it was seen under) for each source asked for; unknown paths are
    reported on stderr and counted."""
    if args.all:
        return [(sha, (store.paths_of(sha) or [sha])[0]) for sha, _, _ in store.sources()], 0
    found, failed = [], 0
    for path in args.paths:
        relative = relative_to_watched(config, path)
        observation = store.latest_observation(relative)
        if observation is None or observation.source_sha256 is None:
            print(f"error: {path}: not recorded by the daemon (or gone)", file=sys.stderr)
            failed += 1
            continue
        found.append((observation.source_sha256, relative))
    return found, failed
