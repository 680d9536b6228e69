"""``dispatcher submit``: validate a submission and write it whole, or write nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from dispatcher.store import Store
from schemas.mapping import iter_mapping, open_mapping
from schemas.submission import load_submission, plan

log = logging.getLogger(__name__)


async def submit(store: Store, path: str | Path, mapping: str | Path | None = None) -> int:
    """Returns the new workflow's id; raises ``SubmissionError`` (and writes no row)
    for a submission or mapping that is not valid."""
    sub, mapping_path = load_submission(path, mapping)
    open_mapping(mapping_path).close()  # refuse a missing file, a FIFO, /dev/zero before any write
    plans = plan(sub)
    labels = {p.label for p in plans}

    def rows(task_ids: dict[str, int]) -> Iterator[tuple[int, int, str]]:
        for label, number, payload in iter_mapping(mapping_path, labels):
            yield task_ids[label], number, payload

    spec = sub.model_dump(mode="json", exclude_none=True)
    workflow_id = await store.insert_workflow(sub.name or Path(path).stem, spec, str(mapping_path), plans, rows)
    log.info("workflow submitted", extra={"workflow": workflow_id, "workflow_name": sub.name})
    return workflow_id
