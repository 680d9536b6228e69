"""The benchmark in --quick mode, so that it cannot rot: every scenario runs end to end
against the real services and the report comes out whole. Its figures are not checked
against the targets here (the machines are shared and noisy); only that they exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.config import Settings
from tests.conftest import ROOT
from tests.test_e2e import cli_env

pytestmark = pytest.mark.slow


def run_benchmark(
    settings: Settings, module: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> args`` against the test's services, which must exit 0
    (without the test's queue prefix: a benchmark takes a namespace of its own)."""
    env = cli_env(settings) | {"PYTHONPATH": str(ROOT)}
    env.pop("DISPATCHER_QUEUE_PREFIX", None)
    run = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_quick_benchmark_runs_every_scenario_and_writes_its_report(settings: Settings, tmp_path: Path) -> None:
    run_benchmark(settings, "run", "--quick", "--out", str(tmp_path), timeout=600)
    report = json.loads((tmp_path / "report-quick.json").read_text())
    assert report["mode"] == "quick"
    tp = report["throughput"]
    for size in (1, 10, 100):
        figures = tp[f"range_{size}"]
        assert figures["events_per_s"] > 0 and figures["cpu_us_per_event_worker"] > 0
        assert 0 < figures["fraction_of_raw_consume"]
    assert tp["raw_broker"]["publish_per_s"] > 0 and tp["raw_broker"]["consume_ack_per_s"] > 0
    assert report["celery"]["tasks_per_s"] > 0 and report["celery"]["ratio_ours_range1_to_celery"] > 0
    es = report["eventservice"]
    assert es["with_eventservice"]["jobs_set_up"] < es["with_eventservice"]["payloads"]
    # without EventService every payload costs a set-up (one more now and then: a job
    # announced again while its only range was being taken is set up for nothing)
    assert es["one_payload_per_job"]["jobs_set_up"] >= es["one_payload_per_job"]["payloads"]
    assert report["latency"]["bookkeeping_p99_ms"] >= report["latency"]["bookkeeping_p50_ms"] > 0
    scale = report["scale"]
    assert scale["control_plane_events_published"] > 0 and scale["submit_peak_rss_mib"] > 0
    assert scale["run_events_per_s"] > 0 and scale["control_plane_rss_mib_by_percent_done"]
    # every target has a measured value, and the report shows each one
    assert all(t["measured"] is not None and t["met"] in ("yes", "no") for t in report["targets"].values())
    page = (tmp_path / "report-quick.md").read_text()
    assert all(name in page for name in report["targets"])
    assert (tmp_path / "report-quick.png").read_bytes().startswith(b"\x89PNG")


def test_the_monitor_benchmark_times_every_page_and_the_counts_before_counters(
    settings: Settings, tmp_path: Path
) -> None:
    small = ["--events", "3000", "--per-job", "1000", "--runs", "1", "--out", str(tmp_path)]
    run_benchmark(settings, "monitor", *small, "--admin-dsn", settings.database_url)
    report = json.loads((tmp_path / "monitor.json").read_text())
    timed = {r["request"]: r["median_ms"] for r in report["results"]}
    for page in ("workflows list (HTML)", "workflow page (HTML, counts, pictures, jobs)", "API workflows list"):
        assert timed[page] > 0
    assert any(name.startswith("before counters") for name in timed)


def test_the_counters_benchmark_runs_every_setup(settings: Settings) -> None:
    run = run_benchmark(settings, "counters", "--events", "500", "--rounds", "1", "--admin-dsn", settings.database_url)
    for setup in ("no counters", "event counts only", "durations only", "both (the product)"):
        assert setup in run.stdout and "µs per report" in run.stdout
