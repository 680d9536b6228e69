"""The peers report: a Markdown page and a PNG plot from peers.json.

python -m benchmarks.peers.report benchmarks/results/peers.json   # draw them again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GROUPS = ("workers", "producer", "rabbitmq", "postgres", "redis")
GROUP_NAMES = {
    "workers": "workers",
    "producer": "control plane / producer",
    "rabbitmq": "RabbitMQ",
    "postgres": "Postgres",
    "redis": "Redis",
}


def _fmt(v: float | int | None) -> str:
    if v is None:
        return ""
    return f"{v:,}" if isinstance(v, int) else f"{v:,.1f}"


def table(report: dict[str, Any]) -> list[str]:
    """The main table (the README's too)."""
    header = ["setup", "broker", "confirms", "tasks/s", "ours/peer", "CPU µs/task"]
    header += [GROUP_NAMES[g] for g in GROUPS]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for row in report["rows"].values():
        if "skipped" in row:
            lines.append(f"| {row['label']} | {row['broker']} | {row['confirms']} | skipped: {row['skipped']} |")
            continue
        cpu = row["cpu_us_per_task"]
        ratio = row.get("ratio_ours")
        cells = [
            row["label"],
            row["broker"],
            row["confirms"],
            _fmt(row["tasks_per_s"]),
            f"{ratio:.2f}" if ratio is not None else "",
            _fmt(row["cpu_us_per_task_total"]),
            *(_fmt(cpu[g]) for g in GROUPS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"Peers {report['date']} on {report['machine']} ({report['mode']}: {report['tasks']:,} no-op tasks per setup, "
        f"medians of {report['rounds']} interleaved round(s), {report['seconds']} s in all)",
        "",
        "Every setup: the same RabbitMQ, 2 worker processes, persistent messages, acks after the task, no "
        "results. tasks/s from the producer's first publish (connected, workers consuming) to the last task's "
        "completion, counted in each worker process and flushed every 20 ms (no round trip per task); ours: "
        "from the start of `dispatcher submit` until the workflow is `finished` in Postgres. CPU µs per task "
        "over the same interval, by process group (read from /proc; the producer is the peer's client in a process of "
        "its own, ours the control plane). ours/peer: median of the ratios taken within each round.",
        "",
        *table(report),
        "",
        "Per round (order rotated each round):",
        "",
        "| setup | tasks/s by round | ours/peer by round | counted / published | notes |",
        "|---|---|---|---|---|",
    ]
    for row in rows.values():
        if "skipped" in row:
            continue
        counted = ", ".join(f"{c:,}" for c in row["counted_rounds"])
        note = row["note"]
        if row.get("publish_per_s"):
            note = (note + "; " if note else "") + f"publish {row['publish_per_s']:,}/s"
        lines.append(
            f"| {row['label']} | {', '.join(f'{v:,}' for v in row['tasks_per_s_rounds'])} | "
            f"{', '.join(f'{v:.2f}' for v in row.get('ratio_ours_rounds', []))} | {counted} / {row['published']:,} | "
            f"{note} |"
        )
    lines += ["", "Orders: " + "; ".join(f"round {i + 1}: {', '.join(o)}" for i, o in enumerate(report["orders"]))]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"].values() if "skipped" not in r]
    if not rows:
        return False
    labels = [r["label"] for r in rows][::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 2.5), sharey=True)
    y = list(range(len(rows)))
    medians = [r["tasks_per_s"] for r in rows][::-1]
    colors = [
        "tab:green" if r["label"].startswith("ours") else "tab:gray" if r["label"].startswith("raw") else "tab:blue"
        for r in rows
    ][::-1]
    ax1.barh(y, medians, color=colors)
    for i, r in enumerate(rows[::-1]):
        ax1.plot(r["tasks_per_s_rounds"], [i] * len(r["tasks_per_s_rounds"]), "k.", ms=4)
        text = f"{r['tasks_per_s']:,}" + (f"  (ours {r['ratio_ours']:.2f}x)" if r.get("ratio_ours") else "")
        ax1.text(max(r["tasks_per_s_rounds"]), i, "  " + text, va="center", fontsize=8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlabel("tasks/s (median; dots: rounds)")
    ax1.set_xlim(0, max(max(r["tasks_per_s_rounds"]) for r in rows) * 1.45)
    left = [0.0] * len(rows)
    for g in GROUPS:
        values = [r["cpu_us_per_task"][g] for r in rows][::-1]
        ax2.barh(y, values, left=left, label=GROUP_NAMES[g])
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax2.set_xlabel("CPU µs per task, by process group (median)")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(GROUPS), frameon=False)
    fig.suptitle(
        f"{report['tasks']:,} no-op tasks, 2 worker processes, same RabbitMQ; {report['rounds']} interleaved round(s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    source.with_suffix(".md").write_text(markdown(data))
    plot(data, source.with_suffix(".png"))
