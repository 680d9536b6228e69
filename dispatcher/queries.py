"""Loads the named SQL queries of ``sql/queries.sql`` ("-- name: NAME" blocks)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).parent / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@cache
def queries() -> dict[str, str]:
    return parse((SQL_DIR / "queries.sql").read_text())


def q(name: str) -> str:
    return queries()[name]
