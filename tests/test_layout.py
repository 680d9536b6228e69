"""The code's own rules that no type checker holds: library internals are touched in one
module only (dispatcher/fastpath.py, checked against the aiormq release it was written
for), so that an upgrade of aiormq, aio-pika or asyncpg breaks one place, or none."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PRODUCT = ["dispatcher", "workers", "schemas", "transport"]
FAST_PATH = ROOT / "transport" / "fastpath.py"
# aiormq channel state that only its own methods should change
LIBRARY_STATE = {"confirmations", "message_id_delivery_tag", "write_queue"}
# underscored but public (namedtuple's API, os._exit), or a class's own private method
# called from its classmethod
ALLOWED = {"_replace", "_asdict", "_fields", "_exit"}
OWN = {("transport/rabbitmq.py", "_channel"), ("transport/rabbitmq.py", "_watch")}


def offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else None
        private = node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in ALLOWED
        if private and owner not in ("self", "cls") and (str(path.relative_to(ROOT)), node.attr) not in OWN:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr} of another object")
        if node.attr in LIBRARY_STATE:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: aiormq's .{node.attr}")
        if node.attr == "delivery_tag" and isinstance(node.ctx, ast.Store):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: writes a channel's delivery tag")
    return found


def test_no_product_module_but_the_fast_path_touches_library_internals() -> None:
    files = [p for d in PRODUCT for p in (ROOT / d).rglob("*.py") if p != FAST_PATH]
    assert len(files) > 20
    assert [o for p in files for o in offences(p)] == []


def test_the_check_finds_what_it_looks_for() -> None:
    # the fast path itself is the one module that does all of it
    assert {o.split(": ", 1)[1] for o in offences(FAST_PATH)} >= {
        "aiormq's .confirmations",
        "aiormq's .write_queue",
        "writes a channel's delivery tag",
    }


def imported(path: Path) -> set[str]:
    """The top-level packages of this repository a module imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & {"dispatcher", "workers", "schemas", "transport"}


# the one place where the control plane's command line starts a worker: the wiring
WIRING = {ROOT / "dispatcher" / "cli.py"}


def test_dependencies_run_one_way() -> None:
    """schemas <- transport <- dispatcher and workers, neither of which imports the other."""
    allowed = {
        "schemas": {"schemas"},
        "transport": {"transport", "schemas"},
        "dispatcher": {"dispatcher", "transport", "schemas"},
        "workers": {"workers", "transport", "schemas"},
    }
    wrong = []
    for package, may in allowed.items():
        for path in (ROOT / package).rglob("*.py"):
            extra = imported(path) - may - ({"workers"} if path in WIRING else set())
            if extra:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert wrong == []


def imported_modules(path: Path) -> set[str]:
    """Every module a module imports, by full name (``from a.b import c`` names a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


# where the real connections are made: the command line, and its start-up waits
CONNECTING = {ROOT / "dispatcher" / "cli.py", ROOT / "dispatcher" / "connect.py"}


def test_the_control_plane_and_the_workers_know_only_the_transport_interface() -> None:
    """No RabbitMQ (nor its client libraries) above the transport, but where the
    connections are made: the worker, releaser and bookkeeper run on either adapter."""
    broker_specific = {"transport.rabbitmq", "transport.fastpath", "aio_pika", "aiormq"}
    files = [p for d in ("dispatcher", "workers") for p in (ROOT / d).rglob("*.py") if p not in CONNECTING]
    assert len(files) > 15
    wrong = {
        str(p.relative_to(ROOT)): sorted(
            m for m in imported_modules(p) if m.split(".")[0] in broker_specific or m in broker_specific
        )
        for p in files
    }
    assert {p: m for p, m in wrong.items() if m} == {}
    # and the check sees such an import where there is one
    assert "transport.rabbitmq" in imported_modules(ROOT / "dispatcher" / "cli.py")


def test_only_the_bps_plugin_imports_lsst() -> None:
    """``lsst-ctrl-bps`` is an extra (about 460 MB): the core runs without it."""
    files = [p for d in ("dispatcher", "workers", "schemas", "transport") for p in (ROOT / d).rglob("*.py")]
    users = sorted(
        str(p.relative_to(ROOT)) for p in files if any(m.split(".")[0] == "lsst" for m in imported_modules(p))
    )
    assert users == ["dispatcher/bps.py"]
    assert "dispatcher.bps" not in {m for p in files for m in imported_modules(p)}  # and nothing imports it
