"""`python -m daemon` is the `scanrestore` command."""

import sys

from daemon.cli import main

sys.exit(main())
