"""`python -m daemon` is the `scanrestore` command."""

from daemon.cli import program

program()
