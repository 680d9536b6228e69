"""The benchmark report: a Markdown page and a PNG plot from report.json.

python -m benchmarks.report benchmarks/results/report.json   # draw them again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SETUPS = {
    "throughput": "In-process no-op payloads (`payloadFunction`), jobs of 1,000 events, 2 workers "
    "(`dispatcher worker {worker_args}`), one control plane, full bookkeeping: events/s from the "
    "start of `dispatcher submit` until the workflow is `finished` in Postgres. Raw broker: aio-pika alone, "
    "publish with confirms, then consume + ack, the same number of messages, in the same run.",
    "celery": "The same no-op payloads as Celery tasks on the same RabbitMQ: 2 worker processes (solo pool), "
    "acks late, results ignored; from the first publish until the queue is empty.",
    "eventservice": "Payloads sleeping 50 ms, a job set-up of 2 s and a log upload of 0.5 s per job "
    "(`jobSetupCommand`, `jobTeardownCommand`), 2 workers (`--slots 1 --prefetch 2`): jobs of at most 36 "
    "events (1,000 payloads: 28 jobs of 35 or 36) against one payload per job. Wall time from the committed "
    "workflow (the `dispatcher submit` process adds about 0.5 s) until the last job's log is in place (the "
    "last uploads end after the workflow is finished); overhead = (workers x wall - payload time - set-up "
    "time) / events, set-ups and uploads counted in the job logs; payload time 50 ms each (a payload's own "
    "sleep then counts against us when it wakes late), or (measured) as the workers recorded it: from the "
    "call of the payload to the end of its await, nothing of the worker's around it.",
    "latency": "2 idle workers, then a workflow of no-op events: the first event's `started_at` minus the "
    "moment `dispatcher submit` printed the workflow id (right after its commit), and minus the moment the "
    "process started (Python's start-up and the submission itself included); and for each finished attempt, "
    "when Postgres recorded it minus when it ended.",
    "scale": "`dispatcher submit` of a tenth and of all the events (jobs of 1,000, ranges of 100): wall time "
    "and peak RSS; `dispatcher start` publishing its first window of jobs; then 2 workers (`{worker_args}`, "
    "no-op payloads) run every event while the control plane releases window after window: "
    "its RSS as the run goes on and its peak.",
}


def _setup(scenario: str, results: dict[str, Any]) -> str:
    """A scenario's setup, with the worker options the run used."""
    return SETUPS[scenario].format(worker_args=results.get("worker_args", "--slots 4 --prefetch 16"))


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Benchmarks {report['date']} on {report['machine']} ({report['mode']}, medians of {report['runs']} run(s), "
        f"{report.get('seconds', '?')} s in all)",
        "",
        *_table(["target", "measured", "met"], [[n, v["measured"], v["met"]] for n, v in report["targets"].items()]),
    ]
    tp = report.get("throughput")
    if tp:
        ranges = sorted(int(k.split("_")[1]) for k in tp if k.startswith("range_"))
        roles = sorted({k.removeprefix("cpu_us_per_event_") for r in ranges for k in tp[f"range_{r}"] if "cpu_us" in k})
        rows = [
            [
                r,
                tp[f"range_{r}"]["events_per_s"],
                tp[f"range_{r}"]["seconds"],
                tp[f"range_{r}"].get("fraction_of_raw_consume"),
                *(tp[f"range_{r}"].get(f"cpu_us_per_event_{role}") for role in roles),
            ]
            for r in ranges
        ]
        lines += ["", f"**1. Throughput**, {tp['events']:,} events. {_setup('throughput', tp)}", ""]
        lines += _table(
            ["range size", "events/s", "seconds", "of raw consume", *(f"CPU µs/event: {r}" for r in roles)], rows
        )
        raw = tp.get("raw_broker", {})
        lines += [
            "",
            f"Raw broker: publish {raw.get('publish_per_s')}/s, consume + ack {raw.get('consume_ack_per_s')}/s.",
        ]
    ce = report.get("celery")
    if ce:
        lines += ["", f"**2. Against Celery**, {ce.get('tasks', 0):,} tasks. {SETUPS['celery']}", ""]
        lines.append(
            f"Celery: {ce.get('tasks_per_s')} tasks/s; ours at range size 1: "
            f"{(tp or {}).get('range_1', {}).get('events_per_s')} events/s; "
            f"ratio {ce.get('ratio_ours_range1_to_celery')}."
            if "skipped" not in ce
            else ce["skipped"]
        )
    es = report.get("eventservice")
    if es:
        w, wo = es["with_eventservice"], es["one_payload_per_job"]
        lines += ["", f"**3. EventService against one job per payload.** {SETUPS['eventservice']}", ""]
        lines += _table(
            ["", "payloads", "wall s", "jobs set up", "wall per payload s", "overhead ms/event", "(measured payload)"],
            [
                [
                    "jobs of at most 36 events",
                    w["payloads"],
                    w["wall_s"],
                    w["jobs_set_up"],
                    w["wall_per_event_s"],
                    w["dispatch_overhead_ms_per_event"],
                    w["dispatch_overhead_ms_per_event_measured_payload"],
                ],
                [
                    "one payload per job",
                    wo["payloads"],
                    wo["wall_s"],
                    wo["jobs_set_up"],
                    wo["wall_per_event_s"],
                    wo["dispatch_overhead_ms_per_event"],
                    wo["dispatch_overhead_ms_per_event_measured_payload"],
                ],
            ],
        )
        lines += ["", f"Wall time per payload: {es['speedup_wall_per_event']}x shorter with EventService."]
    la = report.get("latency")
    if la:
        lines += ["", f"**4. Latency**, {la['events']} events. {SETUPS['latency']}", ""]
        lines += _table(
            ["submit -> first running ms", "CLI start -> first running ms", "bookkeeping p50 ms", "bookkeeping p99 ms"],
            [
                [
                    la["submit_to_first_running_ms"],
                    la.get("cli_start_to_first_running_ms"),
                    la["bookkeeping_p50_ms"],
                    la["bookkeeping_p99_ms"],
                ]
            ],
        )
    sc = report.get("scale")
    if sc:
        lines += ["", f"**5. Scale**, {sc['events']:,} events. {_setup('scale', sc)}", ""]
        lines += _table(
            ["", "events", "seconds", "peak RSS MiB"],
            [
                [
                    "`dispatcher submit`",
                    f"{sc['events'] // 10:,}",
                    sc.get("submit_tenth_seconds"),
                    sc.get("submit_tenth_peak_rss_mib"),
                ],
                ["`dispatcher submit`", f"{sc['events']:,}", sc["submit_seconds"], sc["submit_peak_rss_mib"]],
                [
                    f"control plane: first window ({sc['control_plane_jobs_released']} jobs) published",
                    f"{sc['control_plane_events_published']:,}",
                    sc["control_plane_release_seconds"],
                    sc["control_plane_peak_rss_mib"],
                ],
                [
                    "control plane: all of it run by 2 workers",
                    f"{sc['events']:,}",
                    sc.get("run_seconds"),
                    sc.get("control_plane_peak_rss_mib_whole_run"),
                ],
            ],
        )
        by = sc.get("control_plane_rss_mib_by_percent_done") or {}
        lines += [
            "",
            "Control plane RSS (MiB) as the run went on, by % of jobs done: "
            + ", ".join(f"{k}%: {v}" for k, v in by.items())
            + f"; workers' peak {sc.get('worker_peak_rss_mib')} MiB; {sc.get('run_events_per_s')} events/s.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Throughput against its references, and where the CPU goes; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tp = report.get("throughput")
    if not tp:
        return False
    ranges = sorted(int(k.split("_")[1]) for k in tp if k.startswith("range_"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"ours, range {r}" for r in ranges]
    values = [tp[f"range_{r}"]["events_per_s"] for r in ranges]
    colors = ["#3b6ea8"] * len(ranges)
    if report.get("celery", {}).get("tasks_per_s"):
        labels.append("Celery")
        values.append(report["celery"]["tasks_per_s"])
        colors.append("#b5563c")
    raw = tp.get("raw_broker", {})
    if raw:
        labels += ["raw publish", "raw consume"]
        values += [raw["publish_per_s"], raw["consume_ack_per_s"]]
        colors += ["#999999", "#bbbbbb"]
    left.barh(labels[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        left.text(v, y, f" {v:,}", va="center", fontsize=8)
    left.set_xlabel("events (messages, tasks) per second")
    left.set_title("No-op payloads, full bookkeeping")
    roles = sorted({k.removeprefix("cpu_us_per_event_") for r in ranges for k in tp[f"range_{r}"] if "cpu_us" in k})
    bottom = [0.0] * len(ranges)
    for role in roles:
        heights = [tp[f"range_{r}"].get(f"cpu_us_per_event_{role}", 0.0) for r in ranges]
        right.bar([str(r) for r in ranges], heights, bottom=bottom, label=role)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    right.set_xlabel("events per range")
    right.set_ylabel("CPU µs per event")
    right.set_title("Where the CPU goes (2 cores in all)")
    right.legend(fontsize=8)
    fig.suptitle(f"{report['date']} · {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "report.json"
    report = json.loads(path.read_text())
    from benchmarks import recovery  # it imports benchmarks.run, which imports this module

    path.with_suffix(".md").write_text(markdown(report) + recovery.markdown(report))
    plot(report, path.with_suffix(".png"))
    print(path.with_suffix(".md"))


if __name__ == "__main__":
    main()
