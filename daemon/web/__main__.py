"""`python -m daemon.web --host H --port P`: the server process itself, given its validated
config in $SCANRESTORE_WEB_CONFIG (see daemon.web.server); started by `scanrestore serve` and
`scanrestore watch`, not by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parent = os.environ.pop("SCANRESTORE_WEB_PARENT", None)
    if parent is not None:
        from daemon.worker_entry import die_with_parent

        die_with_parent(int(parent))
    parser = argparse.ArgumentParser(prog="python -m daemon.web")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    text = os.environ.pop("SCANRESTORE_WEB_CONFIG", None)
    if text is None:
        print("error: $SCANRESTORE_WEB_CONFIG is not set: run scanrestore serve", file=sys.stderr)
        return 2
    from daemon.config import Config
    from daemon.web.server import serve

    serve(Config.model_validate(json.loads(text)), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
