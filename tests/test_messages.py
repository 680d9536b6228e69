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
from schemas.text import MAX_TEXT, storable


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
        (b'{"v": 2, "kind": "range", "workflow_id": 1, "job_id": 1, "events": []}', "events"),
        (
            b'{"v": 2, "kind": "range", "workflow_id": 1, "job_id": 1, "events": [{"number": "x", "payload": "p"}]}',
            "events.0.number",
        ),
        (b'{"v": 2, "kind": "status", "worker": "w", "updates": [], "evil": 1}', "evil"),
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempt", 2**31),
        ("number", 2**63),
        ("job_id", 0),
        ("attempt", True),  # a boolean is not an integer
        ("exit_code", 2**31),
    ],
)
def test_integers_beyond_their_columns_are_refused_on_the_wire(field: str, value: object) -> None:
    update = {"job_id": 1, "number": 1, "attempt": 1, "status": "finished", "worker": "w", field: value}
    body = orjson.dumps({"v": SCHEMA_VERSION, "kind": "status", "worker": "w", "updates": [update]})
    with pytest.raises(MessageError, match=field):
        decode(body, StatusBatch)


def test_a_heartbeat_pid_beyond_an_integer_column_is_refused() -> None:
    beat = {"host": "h", "pid": 2**40, "slots": 1, "state": "live", "started_at": "2026-01-01T00:00:00Z"}
    body = orjson.dumps({"v": SCHEMA_VERSION, "kind": "status", "worker": "w", "heartbeat": beat})
    with pytest.raises(MessageError, match=r"heartbeat\.pid"):
        decode(body, StatusBatch)


def test_text_from_outside_is_made_storable() -> None:
    # NUL (refused by Postgres in text) and lone surrogates (not encodable) are mended
    body = orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "kind": "status",
            "worker": "w\u0000x",
            "updates": [
                {"job_id": 1, "number": 1, "attempt": 1, "status": "failed", "worker": "w\u0000", "error": "a\u0000b"}
            ],
        }
    ).replace(b"\\u0000", b"\\u0000")
    batch = decode(body, StatusBatch)
    assert batch.worker == "w\ufffdx" and batch.updates[0].error == "a\ufffdb"
    assert storable("bad \udcff byte") == "bad \ufffd byte"
    assert len(storable("x" * 10_000)) == MAX_TEXT


def test_an_announcement_names_no_queue() -> None:
    # a job's queue is derived from its id: a message that names one is not taken
    body = orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "kind": "job",
            "workflow_id": 1,
            "task_id": 1,
            "job_id": 1,
            "label": "x",
            "queue": "es.dlq",
            "payload": {"command": "echo {payload}"},
        }
    )
    with pytest.raises(MessageError, match="queue"):
        decode(body, JobAnnouncement)
