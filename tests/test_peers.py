"""The peers benchmark (benchmarks/peers/) in --quick mode, against the real RabbitMQ and
Postgres: every peer runs end to end, each row has a throughput, and every task published
was counted exactly once. arq is skipped only where no redis-server is installed. Its
figures are not compared here (the machines are shared and noisy)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.peers.bench import REDIS_HINT, SETUPS, redis_binary
from dispatcher.config import Settings
from tests.test_benchmarks import run_benchmark

pytestmark = pytest.mark.slow

PACKAGES = ("dramatiq", "taskiq_aio_pika", "faststream", "celery", "arq", "redis", "typer")


def test_quick_peers_benchmark_counts_every_task_of_every_peer(settings: Settings, tmp_path: Path) -> None:
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the peers are not installed ({', '.join(missing)}): pip install -e '.[peers]'")
    run_benchmark(settings, "peers", "--quick", "--tasks", "500", "--out", str(tmp_path))
    report = json.loads((tmp_path / "peers-quick.json").read_text())
    assert report["mode"] == "quick" and report["rounds"] == 1
    rows = report["rows"]
    assert list(rows) == [s.key for s in SETUPS]
    for key, row in rows.items():
        if key == "arq" and redis_binary() is None:
            assert row["skipped"] == REDIS_HINT
            continue
        assert "skipped" not in row, f"{key}: {row.get('skipped')}"
        assert row["tasks_per_s"] > 0, key
        assert row["counted_rounds"] == [row["published"]] == [report["tasks"]], key
        assert row["cpu_us_per_task"]["workers"] > 0, key
        if key != "ours":
            assert row["ratio_ours"] > 0, key
    for key in ("dramatiq-t8", "taskiq", "faststream", "celery-p4"):
        # 2 worker processes, each of which ran some of the tasks
        assert len(rows[key]["counted_by_process_rounds"][0]) == 2, rows[key]
    page = (tmp_path / "peers-quick.md").read_text()
    assert all(row["label"] in page for row in rows.values())
    assert (tmp_path / "peers-quick.png").read_bytes().startswith(b"\x89PNG")
