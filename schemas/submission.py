"""The submission YAML, with the EventService keys of BPS (ctrl_bps_panda).

A submission names its tasks under ``pipetask`` (label -> settings), their dependencies
(``dependsOn``) and a mapping file (label -> event number -> payload). ``plan()`` turns it
into one ``LabelPlan`` per label with BPS's job-size rule applied.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.messages import PayloadSpec

log = logging.getLogger(__name__)

PAYLOAD_PLACEHOLDER = "{payload}"


class SubmissionError(ValueError):
    """A submission that cannot be accepted; the message names the problem."""


def _split_labels(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class LabelConfig(BaseModel):
    """Settings of one label (task). Keys BPS knows but we do not use are kept and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    payloadCommand: str | None = None
    payloadFunction: str | None = None
    payloadShell: bool = False
    payloadTimeout: float | None = Field(default=None, gt=0)
    jobSetupCommand: str | None = None  # run once per job and worker, before its first event
    jobTeardownCommand: str | None = None  # run once per job and worker, after its last event
    requestWalltime: float | None = Field(default=None, gt=0)
    dependsOn: list[str] = []
    numberOfRetries: int | None = Field(default=None, ge=0)
    retryDelay: float | None = Field(default=None, ge=0)
    eventsPerRange: int | None = Field(default=None, ge=1)

    _split_deps = field_validator("dependsOn", mode="before")(_split_labels)

    @field_validator("payloadCommand")
    @classmethod
    def _has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and PAYLOAD_PLACEHOLDER not in value:
            raise ValueError(f"payloadCommand must contain {PAYLOAD_PLACEHOLDER}: {value!r}")
        return value

    @field_validator("payloadFunction")
    @classmethod
    def _is_callable_path(cls, value: str | None) -> str | None:
        if value is not None:
            module, _, func = value.partition(":")
            if not module or not func:
                raise ValueError(f"payloadFunction must look like 'module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_payload_kind(self) -> LabelConfig:
        if (self.payloadCommand is None) == (self.payloadFunction is None):
            raise ValueError("set exactly one of payloadCommand and payloadFunction")
        if self.payloadCommand is not None and not self.payloadShell:
            try:  # the worker splits it into argv: find a bad template now, not per event
                shlex.split(self.payloadCommand)
            except ValueError as exc:
                raise ValueError(
                    f"payloadCommand cannot be split into arguments ({exc}): {self.payloadCommand!r}"
                ) from None
        return self


class Submission(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None
    enableEventService: bool | list[str] = False
    maxWmsJobWalltime: float | None = Field(default=None, gt=0)
    requestWalltime: float | None = Field(default=None, gt=0)
    maxPayloadsPerPandaJob: int = Field(default=10, ge=1)
    maxEventsPerJob: int | None = Field(default=None, ge=1)
    numberOfRetries: int = Field(default=3, ge=0)
    retryDelay: float = Field(default=2.0, ge=0)  # seconds before the 2nd attempt; doubles, with jitter
    eventsPerRange: int = Field(default=1, ge=1)
    mapping: str | None = None
    pipetask: dict[str, LabelConfig] = Field(min_length=1)

    @field_validator("enableEventService", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return _split_labels(value)

    @model_validator(mode="after")
    def _dag(self) -> Submission:
        for label, cfg in self.pipetask.items():
            for parent in cfg.dependsOn:
                if parent not in self.pipetask:
                    raise ValueError(f"pipetask.{label}.dependsOn names unknown label {parent!r}")
        self.topological_order()  # raises on a cycle
        self.es_caps()  # raises on a bad label:N cap
        return self

    def es_caps(self) -> dict[str, int | None]:
        """Labels with EventService on, each with its own ``label:N`` cap if given."""
        if self.enableEventService is True:
            return {label: None for label in self.pipetask}
        if self.enableEventService is False:
            return {}
        caps: dict[str, int | None] = {}
        for item in self.enableEventService:
            label, _, cap = item.partition(":")
            label = label.strip()
            if cap:
                try:
                    caps[label] = int(cap)
                except ValueError:
                    raise ValueError(f"enableEventService: cap of {label!r} is not an integer: {cap!r}") from None
            else:
                caps[label] = None
        return caps

    def topological_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done

        def visit(label: str, path: list[str]) -> None:
            if state.get(label) == 2:
                return
            if state.get(label) == 1:
                cycle = [*path[path.index(label) :], label]
                raise ValueError("dependency cycle: " + " -> ".join(cycle))
            state[label] = 1
            for parent in self.pipetask[label].dependsOn:
                visit(parent, [*path, label])
            state[label] = 2
            order.append(label)

        for label in self.pipetask:
            visit(label, [])
        return order


@dataclass(frozen=True)
class LabelPlan:
    """What the dispatcher does with one label."""

    label: str
    parents: tuple[str, ...]
    event_service: bool
    max_payloads_per_job: int
    request_walltime: float | None
    max_attempts: int
    retry_delay: float
    events_per_range: int
    payload: PayloadSpec


def plan(sub: Submission) -> list[LabelPlan]:
    """Apply BPS's rule for job sizes to every label, in dependency order."""
    caps = sub.es_caps()
    for unknown in sorted(set(caps) - set(sub.pipetask)):
        # BPS configs list labels of many pipelines (e.g. "isr,step1"); absent ones are ignored.
        log.info("enableEventService names label %r, which this workflow does not have", unknown)
    plans = []
    for label in sub.topological_order():
        cfg = sub.pipetask[label]
        walltime = cfg.requestWalltime or sub.requestWalltime
        size = 1
        if label in caps:
            if sub.maxWmsJobWalltime and walltime:
                size = int(sub.maxWmsJobWalltime / walltime)
            else:
                size = caps[label] or sub.maxEventsPerJob or sub.maxPayloadsPerPandaJob
        es = size >= 2  # as in BPS: a job size below 2 means no EventService
        retries = cfg.numberOfRetries if cfg.numberOfRetries is not None else sub.numberOfRetries
        plans.append(
            LabelPlan(
                label=label,
                parents=tuple(cfg.dependsOn),
                event_service=es,
                max_payloads_per_job=size if es else 1,
                request_walltime=walltime,
                max_attempts=retries + 1,
                retry_delay=cfg.retryDelay if cfg.retryDelay is not None else sub.retryDelay,
                events_per_range=cfg.eventsPerRange or sub.eventsPerRange,
                payload=PayloadSpec(
                    command=cfg.payloadCommand,
                    shell=cfg.payloadShell,
                    function=cfg.payloadFunction,
                    timeout=cfg.payloadTimeout or walltime,
                    setup=cfg.jobSetupCommand,
                    teardown=cfg.jobTeardownCommand,
                ),
            )
        )
    return plans


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path} is not UTF-8 text: {exc}") from None
    except FileNotFoundError:
        raise SubmissionError(f"submission file not found: {path}") from None
    except OSError as exc:
        raise SubmissionError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SubmissionError(f"invalid YAML in {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmissionError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """BPS's ``includeConfigs``: included files first, the including file's keys win."""
    path = path.resolve()
    if path in seen:
        raise SubmissionError(f"includeConfigs loop through {path}")
    data = _read_yaml(path)
    includes = _split_labels(data.pop("includeConfigs", []) or [])
    if not isinstance(includes, list):
        raise SubmissionError(f"{path}: includeConfigs must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = _merge(merged, _load_with_includes(path.parent / str(inc), (*seen, path)))
    # a mapping path is relative to the file that names it
    if isinstance(data.get("mapping"), str):
        data["mapping"] = str(path.parent / data["mapping"])
    return _merge(merged, data)


def load_submission(path: str | Path, mapping: str | Path | None = None) -> tuple[Submission, Path]:
    """Read and validate a submission; returns it and the mapping file's path."""
    path = Path(path)
    data = _load_with_includes(path)
    data.setdefault("name", path.stem)
    try:
        sub = Submission.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError(_describe(exc, path)) from None
    mapping_path = Path(mapping) if mapping else (Path(sub.mapping) if sub.mapping else None)
    if mapping_path is None:
        raise SubmissionError(f"{path}: no mapping file (set 'mapping:' or pass --mapping)")
    return sub, mapping_path


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return f"invalid submission {path}:\n  " + "\n  ".join(lines)
