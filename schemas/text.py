"""Text and integers fit for Postgres and for logs, applied where they enter the system.

Postgres refuses a NUL in ``text`` and UTF-8 cannot encode a lone surrogate (Python
makes them from undecodable bytes with ``surrogateescape``, and an exception's text may
hold one). Either one, taken as-is from a payload's output or from a message, used to
stop a consumer for good: the message was redelivered and failed again every time.
So text that comes from outside is made storable at the edge where it enters, and
integers on the wire are bounded to the column types that will hold them.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# an error or a log line longer than this is cut (the tail of an output is what matters)
MAX_TEXT = 4000
# names (workers, hosts, labels): short by nature
MAX_NAME = 256

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str, limit: int | None = MAX_TEXT) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD and, past ``limit``
    characters, cut (keeping the end, where an error's reason is)."""
    if _UNSTORABLE.search(text) is not None:
        text = _UNSTORABLE.sub(REPLACEMENT, text)
    if limit is not None and len(text) > limit:
        text = "…" + text[-(limit - 1) :]
    return text


def storable_bytes(data: bytes, limit: int | None = MAX_TEXT) -> str:
    """Bytes of a payload's output as storable text (undecodable bytes replaced)."""
    return storable(data.decode("utf-8", errors="replace"), limit)


def unstorable(text: str) -> str | None:
    """What makes ``text`` unstorable, or None: for refusing input rather than mending it."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "a lone surrogate (not valid Unicode)"


def _mend_name(text: str) -> str:
    return storable(text, MAX_NAME)


def _mend_text(text: str) -> str:
    return storable(text, MAX_TEXT)


# Integer columns: integer (int4) and bigint (int8). A value beyond them made the whole
# bookkeeping transaction fail, and with it every other update of the batch.
Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX, strict=True)]
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX, strict=True)]
PosInt32 = Annotated[int, Field(ge=1, le=INT32_MAX, strict=True)]
NonNegInt32 = Annotated[int, Field(ge=0, le=INT32_MAX, strict=True)]
NonNegInt64 = Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]
# Text from outside: mended, never refused (an error text is a payload's output: the
# event's outcome must still be recorded)
Name = Annotated[str, AfterValidator(_mend_name)]
Text = Annotated[str, AfterValidator(_mend_text)]
