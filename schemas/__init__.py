"""Wire and input formats of the dispatcher: pydantic v2 models, orjson-encoded.

Every message on the wire carries ``v`` (its schema version) and ``kind``; a message
that does not validate is never executed.
"""

from __future__ import annotations

from schemas.messages import (
    SCHEMA_VERSION,
    CancelJobs,
    DeadLetter,
    EventRange,
    EventSpec,
    Heartbeat,
    JobAnnouncement,
    JobLog,
    MessageError,
    PayloadSpec,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)
from schemas.submission import LabelPlan, Submission, SubmissionError, load_submission

__all__ = [
    "SCHEMA_VERSION",
    "CancelJobs",
    "DeadLetter",
    "EventRange",
    "EventSpec",
    "Heartbeat",
    "JobAnnouncement",
    "JobLog",
    "LabelPlan",
    "MessageError",
    "PayloadSpec",
    "StatusBatch",
    "StatusUpdate",
    "Submission",
    "SubmissionError",
    "decode",
    "encode",
    "load_submission",
]
