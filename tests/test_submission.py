"""BPS semantics of the submission keys (no services needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas.submission import Submission, SubmissionError, load_submission, plan
from tests.conftest import EXAMPLES


def sizes(sub: Submission) -> dict[str, tuple[bool, int]]:
    return {p.label: (p.event_service, p.max_payloads_per_job) for p in plan(sub)}


def write(tmp_path: Path, data: dict[str, object], name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE: dict[str, object] = {
    "mapping": "m.json",
    "pipetask": {
        "a": {"payloadCommand": "echo {payload}"},
        "isr": {"payloadCommand": "echo {payload}", "dependsOn": "a"},
        "step1": {"payloadCommand": "echo {payload}", "dependsOn": ["isr"]},
    },
}


def test_rubin_example_jobs_hold_36_payloads() -> None:
    sub, mapping = load_submission(EXAMPLES / "rubin-isr.yaml")
    assert mapping == EXAMPLES / "rubin-isr-mapping.json"
    assert sizes(sub) == {"pipeinit": (False, 1), "isr": (True, 36), "final": (False, 1)}
    isr = next(p for p in plan(sub) if p.label == "isr")
    assert isr.max_attempts == 3  # numberOfRetries: 3, BPS's total number of attempts
    assert isr.payload.timeout == 600  # a payload may run as long as it requested


def test_without_request_walltime_falls_back_to_max_payloads(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "rubin-isr.yaml").read_text())
    del data["pipetask"]["isr"]["requestWalltime"]
    data["mapping"] = str(EXAMPLES / "rubin-isr-mapping.json")
    sub, _ = load_submission(write(tmp_path, data))
    assert sizes(sub)["isr"] == (True, 10)


def test_include_bps_panda_config_behaves_as_bps(tmp_path: Path) -> None:
    data = dict(BASE, includeConfigs=[str(EXAMPLES / "bps_panda_eventservice.yaml")])
    sub, _ = load_submission(write(tmp_path, data))
    # isr,step1 enabled; maxWmsJobWalltime without requestWalltime -> maxPayloadsPerPandaJob
    assert sizes(sub) == {"a": (False, 1), "isr": (True, 10), "step1": (True, 10)}
    data["requestWalltime"] = 600
    sub, _ = load_submission(write(tmp_path, data))
    assert sizes(sub) == {"a": (False, 1), "isr": (True, 36), "step1": (True, 36)}


def test_newer_bps_form_enables_every_label(tmp_path: Path) -> None:
    data = dict(BASE, includeConfigs=str(EXAMPLES / "bps_es.yaml"))
    sub, _ = load_submission(write(tmp_path, data))
    assert sizes(sub) == {"a": (True, 10), "isr": (True, 10), "step1": (True, 10)}


@pytest.mark.parametrize(
    ("enable", "expected"),
    [
        ("isr:20,step1", {"a": (False, 1), "isr": (True, 20), "step1": (True, 10)}),
        (["isr:4"], {"a": (False, 1), "isr": (True, 4), "step1": (False, 1)}),
        (True, {"a": (True, 10), "isr": (True, 10), "step1": (True, 10)}),  # ours: ctrl_bps_panda crashes
        ("True", {"a": (False, 1), "isr": (False, 1), "step1": (False, 1)}),  # a label named True, as in BPS
        (False, {"a": (False, 1), "isr": (False, 1), "step1": (False, 1)}),
        ("isr:1", {"a": (False, 1), "isr": (True, 1), "step1": (False, 1)}),  # EventService, a payload a job
    ],
)
def test_enable_event_service_forms(tmp_path: Path, enable: object, expected: dict[str, tuple[bool, int]]) -> None:
    sub, _ = load_submission(write(tmp_path, dict(BASE, enableEventService=enable)))
    assert sizes(sub) == expected


def test_walltime_ratio_below_two_turns_event_service_off(tmp_path: Path) -> None:
    data = dict(BASE, enableEventService="isr", maxWmsJobWalltime=1000, requestWalltime=600)
    sub, _ = load_submission(write(tmp_path, data))
    assert sizes(sub)["isr"] == (False, 1)


def test_max_events_per_job_is_our_extension_before_max_payloads_per_panda_job(tmp_path: Path) -> None:
    sub, _ = load_submission(write(tmp_path, dict(BASE, enableEventService="isr", maxEventsPerJob=7)))
    assert sizes(sub)["isr"] == (True, 7)


def test_per_label_retries_override_the_workflow(tmp_path: Path) -> None:
    data = dict(BASE, numberOfRetries=1)
    data["pipetask"] = dict(BASE["pipetask"])  # type: ignore[call-overload]
    data["pipetask"]["isr"] = {"payloadCommand": "echo {payload}", "dependsOn": "a", "numberOfRetries": 5}  # type: ignore[index]
    sub, _ = load_submission(write(tmp_path, data))
    attempts = {p.label: p.max_attempts for p in plan(sub)}
    assert attempts == {"a": 1, "isr": 5, "step1": 1}  # BPS counts every attempt


def test_order_puts_parents_first(tmp_path: Path) -> None:
    data = {
        "mapping": "m.json",
        "pipetask": {
            "z": {"payloadCommand": "echo {payload}", "dependsOn": "y"},
            "y": {"payloadCommand": "echo {payload}", "dependsOn": "x"},
            "x": {"payloadCommand": "echo {payload}"},
        },
    }
    sub, _ = load_submission(write(tmp_path, data))
    assert [p.label for p in plan(sub)] == ["x", "y", "z"]


def test_cycle_is_named(tmp_path: Path) -> None:
    data = {
        "mapping": "m.json",
        "pipetask": {
            "a": {"payloadCommand": "echo {payload}", "dependsOn": "c"},
            "b": {"payloadCommand": "echo {payload}", "dependsOn": "a"},
            "c": {"payloadCommand": "echo {payload}", "dependsOn": "b"},
        },
    }
    with pytest.raises(SubmissionError, match=r"dependency cycle: a -> c -> b -> a"):
        load_submission(write(tmp_path, data))


def test_mapping_flag_overrides_the_file(tmp_path: Path) -> None:
    _, mapping = load_submission(EXAMPLES / "rubin-isr.yaml", tmp_path / "other.json")
    assert mapping == tmp_path / "other.json"


def test_include_loop_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, dict(BASE, includeConfigs="b.yaml"), "a.yaml")
    write(tmp_path, {"includeConfigs": "a.yaml"}, "b.yaml")
    with pytest.raises(SubmissionError, match="includeConfigs loop"):
        load_submission(tmp_path / "a.yaml")


def _chain(n: int) -> dict[str, object]:
    tasks = {
        f"t{i}": {"payloadCommand": "echo {payload}", **({"dependsOn": f"t{i - 1}"} if i else {})} for i in range(n)
    }
    return {"mapping": "m.json", "pipetask": tasks}


def test_a_chain_of_thousands_of_labels_is_ordered_without_recursion(tmp_path: Path) -> None:
    data = _chain(3000)
    data["pipetask"] = dict(reversed(data["pipetask"].items()))  # type: ignore[attr-defined]
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # children first: the deepest walk
    sub, _ = load_submission(path)
    assert [p.label for p in plan(sub)] == [f"t{i}" for i in range(3000)]


def test_a_long_cycle_is_named_in_one_short_line(tmp_path: Path) -> None:
    data = _chain(500)
    data["pipetask"]["t0"]["dependsOn"] = "t499"  # type: ignore[index]
    with pytest.raises(
        SubmissionError, match=r"dependency cycle: t0 -> t499 -> .* \(481 more\) .* -> t1 -> t0$"
    ) as info:
        load_submission(write(tmp_path, data))
    assert len(str(info.value)) < 400


def test_a_tiny_request_walltime_caps_the_job_size_at_the_column(tmp_path: Path) -> None:
    data = dict(BASE, enableEventService="isr", maxWmsJobWalltime=86400, requestWalltime=1e-300)
    sub, _ = load_submission(write(tmp_path, data))
    assert sizes(sub)["isr"] == (True, 2**31 - 1)  # tasks.max_payloads_per_job is an integer


def test_ordinary_anchors_and_a_diamond_of_includes_still_load(tmp_path: Path) -> None:
    (tmp_path / "common.yaml").write_text("numberOfRetries: 2\n")
    (tmp_path / "left.yaml").write_text("includeConfigs: common.yaml\n")
    (tmp_path / "right.yaml").write_text("includeConfigs: common.yaml\nretryDelay: 5\n")
    (tmp_path / "wf.yaml").write_text(
        "includeConfigs: [left.yaml, right.yaml]\nmapping: m.json\n"
        "x-cmd: &cmd 'echo {payload}'\n"
        "pipetask:\n  a: {payloadCommand: *cmd}\n  b: {payloadCommand: *cmd, dependsOn: a}\n"
    )
    sub, _ = load_submission(tmp_path / "wf.yaml")
    assert [(p.label, p.max_attempts, p.retry_delay, p.payload.command) for p in plan(sub)] == [
        ("a", 2, 5.0, "echo {payload}"),
        ("b", 2, 5.0, "echo {payload}"),
    ]


@pytest.mark.parametrize("value", ["3", 3.0, True])
def test_integer_keys_take_integers_only(tmp_path: Path, value: object) -> None:
    with pytest.raises(SubmissionError, match="numberOfRetries"):
        load_submission(write(tmp_path, dict(BASE, numberOfRetries=value)))
