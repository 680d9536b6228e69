"""Wire format: versioned, orjson-encoded, validated before anything runs."""

from __future__ import annotations

import orjson
import pytest

from schemas.messages import (
    SCHEMA_VERSION,
    EventRange,
    EventSpec,
    JobAnnouncement,
    MessageError,
    PayloadSpec,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)


def test_range_round_trip() -> None:
    rng = EventRange(workflow_id=1, job_id=2, events=[EventSpec(number=5, payload="<p>", attempt=2)])
    body = encode(rng)
    assert orjson.loads(body)["v"] == SCHEMA_VERSION
    assert decode(body, EventRange) == rng


def test_announcement_and_status_round_trip() -> None:
    ann = JobAnnouncement(
        workflow_id=1,
        task_id=2,
        job_id=3,
        label="isr",
        queue="es.job.3",
        payload=PayloadSpec(command="echo {payload}", timeout=5),
    )
    assert decode(encode(ann), JobAnnouncement) == ann
    batch = StatusBatch(
        worker="w", updates=[StatusUpdate(job_id=3, number=1, attempt=1, status="finished", worker="w", exit_code=0)]
    )
    assert decode(encode(batch), StatusBatch) == batch


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00not json", "undecodable"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 99, "kind": "range"}', "unsupported schema version 99"),
        (
            b'{"kind": "range", "workflow_id": 1, "job_id": 1, "events": [{"number": 1, "payload": "x"}]}',
            "unsupported schema version None",
        ),
        (b'{"v": 1, "kind": "range", "workflow_id": 1, "job_id": 1, "events": []}', "events"),
        (
            b'{"v": 1, "kind": "range", "workflow_id": 1, "job_id": 1, "events": [{"number": "x", "payload": "p"}]}',
            "events.0.number",
        ),
        (b'{"v": 1, "kind": "status", "worker": "w", "updates": [], "evil": 1}', "evil"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    model = StatusBatch if b'"status"' in body else EventRange
    with pytest.raises(MessageError, match=reason):
        decode(body, model)


def test_a_status_cannot_pass_for_a_range() -> None:
    body = encode(StatusBatch(worker="w"))
    with pytest.raises(MessageError, match="kind"):
        decode(body, EventRange)
