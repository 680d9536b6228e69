"""The mapping file: ``{label: {event number (string of an int): payload string}}``.

It is streamed (ijson), never loaded whole: a workflow may have millions of events.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import ijson

from schemas.submission import SubmissionError

log = logging.getLogger(__name__)

_INT = re.compile(r"^[0-9]+$")
_MAX_NUMBER = 2**63 - 1  # Postgres bigint


def iter_mapping(path: Path, labels: set[str]) -> Iterator[tuple[str, int, str]]:
    """Yield ``(label, event number, payload)`` for the given labels, validating as it goes."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise SubmissionError(f"mapping file not found: {path}") from None
    except OSError as exc:
        raise SubmissionError(f"cannot read mapping file {path}: {exc.strerror}") from None

    def bad(problem: str) -> SubmissionError:
        return SubmissionError(f"mapping file {path}: {problem}")

    skipped: set[str] = set()
    depth = 0  # 1 inside the top object, 2 inside a label's object
    label = ""
    number = -1
    with handle:
        try:
            for _prefix, event, value in ijson.parse(handle, use_float=True):
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
                    if label not in labels and label not in skipped:
                        skipped.add(label)
                        log.warning("mapping label %r is not a label of the workflow: ignored", label)
                elif event == "map_key":
                    if not _INT.match(value):
                        raise bad(f"label {label!r}: event number {value!r} is not a non-negative integer")
                    number = int(value)
                    if number > _MAX_NUMBER:
                        raise bad(f"label {label!r}: event number {value} is larger than {_MAX_NUMBER}")
                elif event != "string":
                    raise bad(f"label {label!r} event {number}: the payload must be a string, got {value!r}")
                elif "\x00" in value:
                    raise bad(f"label {label!r} event {number}: the payload contains a NUL character")
                elif label in labels:
                    yield label, number, value
        except ijson.JSONError as exc:
            raise SubmissionError(f"malformed JSON in mapping file {path}: {exc}") from None
