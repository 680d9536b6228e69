"""The submission YAML, with the EventService keys of BPS (ctrl_bps_panda).

A submission names its tasks under ``pipetask`` (label -> settings), their dependencies
(``dependsOn``) and a mapping file (label -> event number -> payload). ``plan()`` turns it
into one ``LabelPlan`` per label with BPS's job-size rule applied.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event
from yaml.nodes import Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from schemas.messages import PayloadSpec
from schemas.shell import shell_template
from schemas.text import INT32_MAX, INT64_MAX, PosInt32, unstorable

log = logging.getLogger(__name__)

PAYLOAD_PLACEHOLDER = "{payload}"

# Bounds on what a submission may make us read. A BPS submission with its includes is a
# few KiB; these are far above that and far below what would hang or exhaust the host.
MAX_YAML_BYTES = 1 << 20  # one YAML file
MAX_YAML_TOTAL_BYTES = 4 << 20  # all files of a submission, includes of includes too
MAX_YAML_FILES = 64  # files read for one submission (an include tree may fan out)
MAX_YAML_DEPTH = 64  # nesting of lists and mappings (PyYAML composes recursively)
# values (scalars, lists, mappings) of all files, each alias counted as what it expands to:
# bounds memory and time (~15 us a value to compose), far above any real submission
MAX_YAML_NODES = 100_000

# Seconds. A delay between attempts beyond a day means the event is forgotten, not
# retried (and the worker caps each backoff step far below it anyway).
MAX_RETRY_DELAY = 86_400.0
# A walltime or payload timeout beyond 30 days exceeds any batch system's limit: a typo.
MAX_WALLTIME = 30 * 86_400.0

# Strict: a YAML ``true`` or ``"3"`` is not a number here; finite and bounded, since each
# ends in a Postgres column or an asyncio timer.
Seconds = Annotated[float, Field(gt=0, le=MAX_WALLTIME, strict=True, allow_inf_nan=False)]
Delay = Annotated[float, Field(ge=0, le=MAX_RETRY_DELAY, strict=True, allow_inf_nan=False)]
# BPS's numberOfRetries is the total number of attempts (ctrl_bps_panda: `or 3`), held in
# tasks.max_attempts (integer); 0 means the default
Retries = Annotated[int, Field(ge=0, le=INT32_MAX, strict=True)]
DEFAULT_ATTEMPTS = 3


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
    payloadTimeout: Seconds | None = None
    jobSetupCommand: str | None = None  # run once per job and worker, before its first event
    jobTeardownCommand: str | None = None  # run once per job and worker, after its last event
    # what a PanDA pilot runs for a job of this label (its transformation, then jobPars):
    # a payload that takes the job's event ranges from the pilot (docs/pilot.md)
    pilotCommand: str | None = None
    # ours: released once its parents have ended, whatever their outcome, never cancelled
    # for their failure (BPS's final job, whenRun: ALWAYS)
    runAlways: bool = False
    requestWalltime: Seconds | None = None
    dependsOn: list[str] = []
    numberOfRetries: Retries | None = None
    retryDelay: Delay | None = None
    eventsPerRange: PosInt32 | None = None

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
        if self.payloadCommand is not None and self.payloadShell:
            try:  # the worker hands the payload to /bin/sh as "$1": the quoting must be whole
                shell_template(self.payloadCommand)
            except ValueError as exc:
                raise ValueError(f"payloadCommand is not a usable shell template ({exc})") from None
        return self


class Submission(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None
    enableEventService: bool | list[str] = False
    maxWmsJobWalltime: Seconds | None = None
    requestWalltime: Seconds | None = None
    maxPayloadsPerPandaJob: PosInt32 = 10
    maxEventsPerJob: PosInt32 | None = None
    numberOfRetries: Retries | None = None  # attempts in all (BPS's meaning); unset or 0: 3
    retryDelay: Delay = 2.0  # seconds before the 2nd attempt; doubles, with jitter
    eventsPerRange: PosInt32 = 1
    mapping: str | None = None
    pipetask: dict[str, LabelConfig] = Field(min_length=1)

    @field_validator("enableEventService", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        # a string is a list of labels, as ctrl_bps_panda reads it ("True" names a label
        # True, which a workflow rarely has); a YAML boolean, on which ctrl_bps_panda
        # crashes, is our extension: true turns EventService on for every label
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
                caps[label] = _cap(label, cap)
            else:
                caps[label] = None
        return caps

    def topological_order(self) -> list[str]:
        """Labels, parents first. Iterative: a chain of thousands of labels is a valid DAG."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        for root in self.pipetask:
            if state.get(root):
                continue
            state[root] = 1
            path = [root]
            stack = [iter(self.pipetask[root].dependsOn)]
            while stack:
                for parent in stack[-1]:
                    seen = state.get(parent)
                    if seen == 2:
                        continue
                    if seen == 1:
                        raise ValueError("dependency cycle: " + _cycle([*path[path.index(parent) :], parent]))
                    state[parent] = 1
                    path.append(parent)
                    stack.append(iter(self.pipetask[parent].dependsOn))
                    break
                else:  # every parent done
                    stack.pop()
                    label = path.pop()
                    state[label] = 2
                    order.append(label)
        return order


def _cycle(labels: list[str], shown: int = 10) -> str:
    """A cycle as ``a -> b -> a``; a long one with its middle left out, to stay one line."""
    if len(labels) > 2 * shown:
        labels = [*labels[:shown], f"... ({len(labels) - 2 * shown} more)", *labels[-shown:]]
    return " -> ".join(labels)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _cap(label: str, cap: str) -> int:
    """The N of ``label:N``, as BPS reads it (int()), bounded to tasks.max_payloads_per_job."""
    number = None
    if len(cap.strip()) <= 11:  # int() refuses over 4300 digits, and anything this long is too large
        try:
            number = int(cap)
        except ValueError:
            raise ValueError(f"enableEventService: cap of {label!r} is not an integer: {_short(cap)!r}") from None
    if number is None or number > INT32_MAX:
        raise ValueError(f"enableEventService: cap of {label!r} is larger than {INT32_MAX}: {_short(cap)!r}")
    return number


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
    pilot_command: str | None = None  # what a PanDA pilot runs for the label's jobs
    job_walltime: float | None = None  # a job's walltime when requestWalltime does not set it
    run_always: bool = False  # released once its parents ended, whatever their outcome


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
        size, es, job_walltime = 1, False, None
        if label in caps:
            es = True
            if sub.maxWmsJobWalltime and walltime:
                # a tiny requestWalltime makes the ratio huge (or inf): no job holds more
                # than tasks.max_payloads_per_job (integer) can say
                size = int(min(sub.maxWmsJobWalltime / walltime, INT32_MAX))
                es = size >= 2  # as in BPS: only here does a size below 2 turn it off
            else:
                size = caps[label] or sub.maxEventsPerJob or sub.maxPayloadsPerPandaJob
                # BPS gives such a job the whole walltime allowed (with requestWalltime
                # it is requestWalltime x its payloads)
                job_walltime = None if walltime else sub.maxWmsJobWalltime
        retries = cfg.numberOfRetries if cfg.numberOfRetries is not None else sub.numberOfRetries
        plans.append(
            LabelPlan(
                label=label,
                parents=tuple(cfg.dependsOn),
                event_service=es,
                max_payloads_per_job=size if es else 1,
                request_walltime=walltime,
                max_attempts=retries or DEFAULT_ATTEMPTS,
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
                pilot_command=cfg.pilotCommand,
                job_walltime=job_walltime,
                run_always=cfg.runAlways,
            )
        )
    return plans


@dataclass(frozen=True)
class _Unreadable:
    """A scalar YAML could not turn into a value; refused, with its field, by ``_refuse_unfit``."""

    reason: str


class _BoundedComposer(Composer):
    """PyYAML's composer, bounded: nesting depth (it recurses per level) and node count
    with aliases expanded (a "billion laughs" is tiny as nodes, huge as data). An alias to
    a node that contains it (a recursive structure) is refused too."""

    peek_event: Callable[[], Event]  # the parser's, in the loader

    def __init__(self, max_nodes: int) -> None:
        Composer.__init__(self)
        self.max_nodes = max_nodes
        self.nodes = 0  # of the document, once composed
        self._sizes: dict[int, int] = {}  # id(node) -> its node count, aliases expanded
        self._open: list[int] = []  # node counts so far of the nodes being composed

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is PyYAML's own error
                size = self._sizes.get(id(target))
                if size is None:
                    problem = f"alias *{event.anchor} is a loop: it refers to a node that contains it"
                    raise ComposerError(None, None, problem, _mark(event))
                self._count(size, event)
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_YAML_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", _mark(event))
        self._open.append(0)
        node = super().compose_node(parent, index)
        size = self._open.pop() + 1
        if node is not None:
            self._sizes[id(node)] = size  # nodes stay alive (in the document) while ids are in use
        self._count(size, event)
        return node

    def _count(self, size: int, event: Event) -> None:
        total = size + (self._open[-1] if self._open else 0)
        if total > self.max_nodes:
            problem = f"more than {MAX_YAML_NODES} values in all files, aliases expanded (an alias bomb?)"
            raise ComposerError(None, None, problem, _mark(event))
        if self._open:
            self._open[-1] = total
        else:
            self.nodes = total


def _mark(event: Event) -> Any:  # libyaml's Mark or PyYAML's: both print the same
    return event.start_mark


class _BoundedConstructor(SafeConstructor):
    """Scalars that Python cannot convert become ``_Unreadable`` instead of a ValueError
    (that escaped yaml.load, as a traceback): an integer over 4300 digits, a date like
    2024-13-45."""

    def construct_yaml_int(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            return _Unreadable(f"an integer of {len(node.value)} digits is out of range")

    def construct_yaml_timestamp(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as exc:
            return _Unreadable(f"not a valid date or time {_short(node.value)!r} ({exc})")


_BoundedConstructor.yaml_constructors = {
    **SafeConstructor.yaml_constructors,
    "tag:yaml.org,2002:int": _BoundedConstructor.construct_yaml_int,
    "tag:yaml.org,2002:timestamp": _BoundedConstructor.construct_yaml_timestamp,
}


class _PyParser(Reader, Scanner, Parser):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


try:  # libyaml scans and parses ~7x faster; our composer runs on its events either way
    from yaml._yaml import CParser as _EventParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _EventParser = _PyParser  # type: ignore[assignment,misc]


class _Loader(_BoundedComposer, _EventParser, _BoundedConstructor, Resolver):
    def __init__(self, stream: str, max_nodes: int) -> None:
        _EventParser.__init__(self, stream)
        _BoundedComposer.__init__(self, max_nodes)
        _BoundedConstructor.__init__(self)
        Resolver.__init__(self)


@dataclass
class _Budget:
    """What the files of one submission have used of the limits so far."""

    files: int = 0
    size: int = 0
    nodes: int = 0


def read_regular_file(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``path``, refused unless it is a regular file of at most ``limit``
    bytes: /dev/zero never ends, a FIFO blocks until someone writes to it."""
    fd = open_regular_file(path, what)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise SubmissionError(f"{what} {path} is larger than {limit} bytes")
    return data


def open_regular_file(path: Path, what: str) -> int:
    """A descriptor of ``path`` open for reading; SubmissionError unless a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SubmissionError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise SubmissionError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise SubmissionError(f"{what} {path!r}: the path contains a NUL character") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SubmissionError(f"{what} {path} is not a regular file")
    return fd


def _read_yaml(path: Path, what: str, budget: _Budget) -> dict[str, Any]:
    budget.files += 1
    if budget.files > MAX_YAML_FILES:
        raise SubmissionError(
            f"includeConfigs: more than {MAX_YAML_FILES} files to read in all (includes of includes count too)"
        )
    raw = read_regular_file(path, what, min(MAX_YAML_BYTES, MAX_YAML_TOTAL_BYTES - budget.size))
    budget.size += len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{path} is not UTF-8 text: {exc}") from None
    loader = _Loader(text, MAX_YAML_NODES - budget.nodes)
    try:
        data = loader.get_single_data()
        budget.nodes += loader.nodes
    except yaml.YAMLError as exc:
        where = str(exc).replace('in "<unicode string>", ', "at ")  # the text came from path
        raise SubmissionError(f"invalid YAML in {path}: {where}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmissionError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    _refuse_unfit(data, path)
    return data


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _field(where: str, key: object) -> str:
    part = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else f"[{_short(repr(key))}]"
    return f"{where}.{part}" if where and not str(part).startswith("[") else f"{where}{part}"


def _refuse_unfit(data: dict[str, Any], path: Path) -> None:
    """Refuse, naming the field, any value Postgres or JSON cannot hold: NUL and lone
    surrogates in text (keys too), non-finite floats, integers beyond bigint, bytes.
    Every key, those we do not read included: the whole spec is stored as jsonb."""
    stack: list[tuple[Any, str]] = [(data, "")]
    seen: set[int] = set()  # a value reached through several aliases is checked once
    while stack:
        value, where = stack.pop()
        problem = None
        if isinstance(value, str):
            found = unstorable(value)
            problem = f"contains {found}" if found else None
        elif value is None or isinstance(value, bool | datetime.date):
            pass
        elif isinstance(value, int):
            problem = None if -INT64_MAX - 1 <= value <= INT64_MAX else f"the integer is beyond {INT64_MAX}"
        elif isinstance(value, float):
            problem = None if math.isfinite(value) else f"{value} is not a finite number"
        elif isinstance(value, _Unreadable):
            problem = value.reason
        elif isinstance(value, dict | list | tuple | set):
            if id(value) not in seen:
                seen.add(id(value))
                if isinstance(value, dict):
                    items = [(_field(where, key), item) for key, item in value.items()]
                    for key in value:  # a key is refused as its own field
                        found = unstorable(key) if isinstance(key, str) else None
                        if found:
                            problem = f"key {_short(repr(key))} contains {found}"
                            raise SubmissionError(f"invalid submission {path}:\n  {where or 'top level'}: {problem}")
                        if not isinstance(key, str):
                            stack.append((key, f"{where}[key {_short(repr(key))}]"))
                else:
                    items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
                stack.extend((item, field) for field, item in reversed(items))
        else:
            problem = f"a value of type {type(value).__name__} (e.g. !!binary bytes) is not accepted"
        if problem:
            raise SubmissionError(f"invalid submission {path}:\n  {where or 'top level'}: {problem}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)  # recursion bounded by MAX_YAML_DEPTH
        else:
            out[key] = value
    return out


def _load_with_includes(path: Path, what: str, budget: _Budget, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """BPS's ``includeConfigs``: included files first, the including file's keys win.
    Recursion depth is bounded by MAX_YAML_FILES."""
    path = path.resolve()
    if path in seen:
        raise SubmissionError(f"includeConfigs loop through {path}")
    data = _read_yaml(path, what, budget)
    includes = _split_labels(data.pop("includeConfigs", []) or [])
    if not isinstance(includes, list) or not all(isinstance(inc, str) for inc in includes):
        raise SubmissionError(f"{path}: includeConfigs must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for inc in includes:
        included = _load_with_includes(path.parent / inc, f"{path}: includeConfigs file", budget, (*seen, path))
        merged = _merge(merged, included)
    # a mapping path is relative to the file that names it
    if isinstance(data.get("mapping"), str):
        data["mapping"] = str(path.parent / data["mapping"])
    return _merge(merged, data)


def load_submission(path: str | Path, mapping: str | Path | None = None) -> tuple[Submission, Path]:
    """Read and validate a submission; returns it and the mapping file's path."""
    path = Path(path)
    data = _load_with_includes(path, "submission file", _Budget())
    if "name" not in data:
        if unstorable(path.stem):  # undecodable bytes of a file name, as surrogates
            raise SubmissionError(f"{path!r}: the file name is not valid UTF-8: set 'name:'")
        data["name"] = path.stem
    try:
        sub = Submission.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError(_describe(exc, path)) from None
    mapping_path = Path(mapping) if mapping else (Path(sub.mapping) if sub.mapping else None)
    if mapping_path is None:
        raise SubmissionError(f"{path}: no mapping file (set 'mapping:' or pass --mapping)")
    if unstorable(str(mapping_path)):  # it is stored (workflows.mapping_path)
        raise SubmissionError(f"mapping file path {str(mapping_path)!r} is not valid UTF-8")
    return sub, mapping_path


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return f"invalid submission {path}:\n  " + "\n  ".join(lines)
