"""The mapping file: ``{label: {event number (string of an int): payload string}}``.

It is streamed (ijson), never loaded whole: a workflow may have millions of events.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import ijson

from schemas.submission import SubmissionError, open_regular_file
from schemas.text import INT64_MAX, unstorable

log = logging.getLogger(__name__)

_INT = re.compile(r"[0-9]+")  # used with fullmatch: "$" would let "1\n" through
_MAX_NUMBER = INT64_MAX  # events.number is bigint
_MAX_DIGITS = len(str(_MAX_NUMBER))  # checked before int(), which refuses over 4300 digits
_MAX_LOGGED_LABELS = 20  # unknown labels warned about, one by one

# JSON escapes, in the order a JSON parser reads them: a surrogate pair, a lone surrogate,
# any other escape (so that "\\ud800" is an escaped backslash, then text)
_ESCAPE = re.compile(
    rb"\\(?:(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})|(u[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.DOTALL
)
_LONGEST_ESCAPE = 12  # a surrogate pair
# What a lone surrogate escape is rewritten to (same length: offsets stay): yajl turns a
# lone high surrogate into "?" and a lone low one into bytes it cannot decode, so the
# parser itself can never tell us; a noncharacter in its place can be found and refused.
_MARK_ESCAPE = rb"\uffff"
_MARK = "\uffff"


class _CheckedReader:
    """The mapping file's bytes for ijson, checked on the way: valid UTF-8, and every
    lone surrogate escape (``\\ud800``) replaced by ``_MARK_ESCAPE`` and counted."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0  # bytes read from the file so far
        self._held = b""  # the tail of the last read: it may hold the start of an escape
        self.lone_surrogates = 0
        self.not_utf8_at: int | None = None

    def read(self, size: int = -1) -> bytes:
        while True:
            chunk = self._raw.read(size)
            pending = len(self._utf8.getstate()[0])  # the start of a character cut by the last read
            try:
                self._utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                self.not_utf8_at = self._offset - pending + exc.start
                raise
            self._offset += len(chunk)
            buf = self._held + chunk
            cut = len(buf) if not chunk else len(buf) - _LONGEST_ESCAPE + 1  # escapes from cut on may be incomplete
            out = bytearray(buf)
            end = 0
            for found in _ESCAPE.finditer(buf):
                if found.start() >= cut:
                    break
                end = found.end()
                if found.group(2) is not None:
                    self.lone_surrogates += 1
                    out[found.start() : end] = _MARK_ESCAPE
            keep = max(cut, end, 0)
            self._held = bytes(out[keep:])
            if keep or not chunk:
                return bytes(out[:keep]) if chunk else bytes(out)


def open_mapping(path: Path) -> BinaryIO:
    """The mapping file, open; SubmissionError unless it is a regular file."""
    return os.fdopen(open_regular_file(path, "mapping file"), "rb")


def iter_mapping(path: Path, labels: set[str]) -> Iterator[tuple[str, int, str]]:
    """Yield ``(label, event number, payload)`` for the given labels, validating as it goes.

    Only ijson's basic events: ``parse`` builds a prefix string per event that grows with
    depth, and a payload nested 100,000 deep cost gigabytes before it could be refused.
    Nothing deeper than a label's object is accepted, so the first level too deep ends it.
    """
    handle = open_mapping(path)
    reader = _CheckedReader(handle)

    def bad(problem: str) -> SubmissionError:
        return SubmissionError(f"mapping file {path}: {problem}")

    def refuse_unstorable(text: str, what: str) -> None:
        found = unstorable(text)
        if found is None and reader.lone_surrogates and _MARK in text:
            found = "a lone surrogate (a \\ud800-\\udfff escape without its pair)"
        if found is not None:
            raise bad(f"{what} contains {found}")

    skipped: set[str] = set()
    depth = 0  # 1 inside the top object, 2 inside a label's object
    label = ""
    number = -1
    with handle:
        try:
            for event, value in ijson.basic_parse(reader, use_float=True):
                if event in ("end_map", "end_array"):
                    depth -= 1
                    continue
                if depth == 0 and event != "start_map":
                    raise bad("the top level must be an object of labels")
                if depth == 1 and event not in ("start_map", "map_key"):
                    raise bad(f"label {label!r} must map event numbers to payloads")
                if event in ("start_map", "start_array"):
                    if depth == 2:
                        raise bad(f"label {label!r} event {number}: the payload must be a string")
                    depth += 1
                elif event == "map_key" and depth == 1:
                    label = value
                    refuse_unstorable(label, f"label {label!r}")
                    if label not in labels and label not in skipped and len(skipped) < _MAX_LOGGED_LABELS:
                        skipped.add(label)
                        log.warning("mapping label %r is not a label of the workflow: ignored", label)
                elif event == "map_key":
                    if len(value) > _MAX_DIGITS or not _INT.fullmatch(value):
                        shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
                        if len(value) > _MAX_DIGITS and _INT.fullmatch(value):
                            raise bad(f"label {label!r}: event number {shown} is larger than {_MAX_NUMBER}")
                        raise bad(f"label {label!r}: event number {shown!r} is not a non-negative integer")
                    number = int(value)
                    if number > _MAX_NUMBER:
                        raise bad(f"label {label!r}: event number {value} is larger than {_MAX_NUMBER}")
                elif event != "string":
                    raise bad(f"label {label!r} event {number}: the payload must be a string, got {value!r}")
                else:
                    refuse_unstorable(value, f"label {label!r} event {number}: the payload")
                    if label in labels:
                        yield label, number, value
        except ijson.JSONError as exc:
            raise SubmissionError(f"malformed JSON in mapping file {path}: {exc}") from None
        except UnicodeDecodeError as exc:
            if reader.not_utf8_at is not None:
                raise bad(f"not UTF-8 text (byte {reader.not_utf8_at}: {exc.reason})") from None
            raise bad(f"label {label!r}: invalid text after event {number} ({exc.reason})") from None
