"""Log output for the daemon and its workers: one line per record, control characters escaped,
since libraries quote file names raw and a name may hold a newline or a terminal escape."""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["FORMAT", "OneLineFormatter", "escape_controls", "log_to_stderr"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 and C1 controls, DEL, and the surrogates os.fsdecode makes of bytes that are not UTF-8.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character escaped as Python would write it; printable text,
    quotes and backslashes untouched (so text escaped once is not escaped again)."""
    return _CONTROLS.sub(_escape, text)


class OneLineFormatter(logging.Formatter):
    """The message of each record with its control characters escaped. A traceback still
    follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def log_to_stderr(level: int) -> None:
    """Configure the root logger (unless something already has) to write one-line records."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
