"""The shape of ``app/`` (docs/ARCHITECTURE.md), checked statically on the source.

* No import cycles: every import of every module of ``app/``, at module level and inside
  functions, makes one graph, which must be acyclic. (Imports under ``if TYPE_CHECKING:`` are
  not run and are left out.) An edge goes to the module an import statement names and to the
  submodules it imports from a package (``from .queue import service``); ancestor packages are
  not counted, since every module descends from ``app``, whose ``__init__`` builds the
  application out of all of them.
* The queue owns its tables: only modules under ``app/queue/`` write ``messages`` and
  ``recipients``. A write is a Core ``insert``/``update``/``delete`` of ``Message`` or
  ``Recipient`` (or their ``__table__``), SQL text that inserts into, updates or deletes from
  those tables, constructing a ``Message`` or ``Recipient``, ``session.delete()`` of one, or an
  assignment to one of their mapped attributes. Without types, objects are told apart by
  name: an assignment counts when the attribute is mapped on those models only
  (``lease_owner``, ``attempts``...) or when the object is named like one (``message.x``,
  ``recipient.x``, ``rcpt.x``); so a job's ``sender`` or an event's ``queue_state`` is not a
  write to the queue, and ``message.queue_state`` is.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import sqlalchemy as sa

from app.models import Message, Recipient

APP_DIR = Path(__file__).resolve().parent.parent / "app"
OWNER = "app.queue"
OWNED_MODELS = {"Message", "Recipient"}
OWNED_TABLES = ("messages", "recipients")
WRITE_SQL = re.compile(r"\b(?:insert\s+into|update|delete\s+from)\s+(?:only\s+)?"
                       rf"(?:{'|'.join(OWNED_TABLES)})\b", re.IGNORECASE)
STATEMENT_VERBS = {"insert", "update", "delete"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(APP_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def app_modules() -> dict[str, tuple[Path, ast.Module]]:
    modules = {}
    for path in sorted(APP_DIR.rglob("*.py")):
        modules[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return modules


def is_package(name: str, modules: dict[str, tuple[Path, ast.Module]]) -> bool:
    return name in modules and modules[name][0].name == "__init__.py"


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _run_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs, wherever it is (module, class or function body)."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _run_imports(node)


def imports_of(name: str, modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, int]:
    """The app modules that module ``name`` imports, with the line of the first import."""
    path, tree = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != name:
            found.setdefault(target, line)

    for node in _run_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
        add(target, node.lineno)
        if is_package(target, modules):
            for alias in node.names:
                add(f"{target}.{alias.name}", node.lineno)
    return found


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == white:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = black
        return None

    for start in sorted(graph):
        if colour[start] == white:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_import_graph_of_app_has_no_cycle() -> None:
    modules = app_modules()
    graph = {name: imports_of(name, modules) for name in modules}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in pairwise(cycle)) + f" -> {cycle[-1]}"


def test_the_cycle_finder_finds_a_function_level_cycle() -> None:
    """The check itself: a function-level import that closes a loop is a cycle."""
    modules = {
        "app": (Path("app/__init__.py"), ast.parse("from .metrics import init\n")),
        "app.metrics": (Path("app/metrics.py"),
                        ast.parse("def version():\n    from . import __version__\n")),
        "app.extensions": (Path("app/extensions.py"), ast.parse(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import metrics\n")),
    }
    graph = {name: imports_of(name, modules) for name in modules}
    assert find_cycle(graph) == ["app", "app.metrics", "app"]
    assert graph["app.extensions"] == {}


# --------------------------------------------------------------------------- table ownership


@dataclass(frozen=True)
class Write:
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what}"


def _mentions_owned_model(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id in OWNED_MODELS
               or isinstance(n, ast.Attribute) and n.attr in OWNED_MODELS
               for n in ast.walk(node))


def _declared_elsewhere(modules: dict[str, tuple[Path, ast.Module]]) -> set[str]:
    """Attribute names that classes of app/ other than the owned models declare."""
    names: set[str] = set()
    for _path, tree in modules.values():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef) or cls.name in OWNED_MODELS:
                continue
            for node in ast.walk(cls):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
                elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        for sub in ast.walk(target):
                            if isinstance(sub, ast.Name) and node in cls.body:
                                names.add(sub.id)
                            if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                                    and sub.value.id == "self"):
                                names.add(sub.attr)
    return names


MODEL_LIKE_NAME = re.compile(r"message|recipient|rcpt", re.IGNORECASE)


@dataclass(frozen=True)
class OwnedAttributes:
    mapped: frozenset[str]  # every mapped attribute of the owned models
    exclusive: frozenset[str]  # those that no other class of app/ declares

    def written_by(self, target: ast.Attribute) -> bool:
        if target.attr not in self.mapped:
            return False
        if isinstance(target.value, ast.Name) and target.value.id == "self":
            return False
        return (target.attr in self.exclusive
                or bool(MODEL_LIKE_NAME.search(ast.unparse(target.value))))


def owned_attributes(modules: dict[str, tuple[Path, ast.Module]]) -> OwnedAttributes:
    mapped = set(sa.inspect(Message).attrs.keys()) | set(sa.inspect(Recipient).attrs.keys())
    return OwnedAttributes(frozenset(mapped), frozenset(mapped - _declared_elsewhere(modules)))


def _callee(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _is_session_delete(node: ast.Call) -> bool:
    return (isinstance(node.func, ast.Attribute) and node.func.attr == "delete"
            and "session" in ast.unparse(node.func.value) and len(node.args) == 1)


def _writes(name: str, tree: ast.Module, attributes: OwnedAttributes) -> Iterator[Write]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _is_session_delete(node):  # the ORM deletes a loaded object
                if MODEL_LIKE_NAME.search(ast.unparse(node.args[0])):
                    yield Write(name, node.lineno, ast.unparse(node)[:80])
            elif _callee(node) in STATEMENT_VERBS:
                # sa.insert(Message), postgresql.insert(Recipient), Message.__table__.delete()
                subject: list[ast.AST] = list(node.args[:1])
                if isinstance(node.func, ast.Attribute):
                    subject.append(node.func.value)
                if any(_mentions_owned_model(s) for s in subject):
                    yield Write(name, node.lineno, ast.unparse(node)[:80])
            elif isinstance(node.func, ast.Name) and node.func.id in OWNED_MODELS:
                yield Write(name, node.lineno, f"new {node.func.id} row")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = WRITE_SQL.search(node.value)
            if match:
                yield Write(name, node.lineno, f"SQL {match.group(0)!r}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                            and attributes.written_by(sub)):
                        yield Write(name, node.lineno, f"assignment to .{sub.attr}")


def writes_of(name: str, tree: ast.Module, attributes: OwnedAttributes) -> list[Write]:
    """Every write to ``messages`` or ``recipients`` in one module (see the module docstring)."""
    return sorted(_writes(name, tree, attributes), key=lambda w: w.line)


def writes_outside_the_queue(modules: dict[str, tuple[Path, ast.Module]]) -> list[Write]:
    attributes = owned_attributes(modules)
    return [write for name, (_path, tree) in sorted(modules.items())
            if not (name == OWNER or name.startswith(OWNER + "."))
            for write in writes_of(name, tree, attributes)]


def test_only_the_queue_writes_messages_and_recipients() -> None:
    writes = writes_outside_the_queue(app_modules())
    assert not writes, "writes to the queue's tables outside app/queue/:\n" + "\n".join(
        map(str, writes))


def test_the_ownership_check_recognises_every_kind_of_write() -> None:
    """The check itself, on code of the shapes that wrote the queue's tables before issue 17."""
    source = '''
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

def writes(session, rows, recipient, message):
    session.execute(sa.insert(Message), rows)
    session.execute(postgresql.insert(Recipient).values(rows))
    session.execute(sa.update(Recipient).where(Recipient.id == 1).values(lease_owner=None))
    session.execute(sa.delete(Message).where(Message.queue_state == "failed"))
    session.execute(Message.__table__.delete())
    session.execute(sa.text("WITH x AS (INSERT INTO messages (id) VALUES (1)) SELECT 1"))
    session.add(Message(id="m"))
    session.delete(message)
    recipient.attempts += 1
    recipient.lease_owner, recipient.lease_expires_at = None, None
    message.queue_state = "failed"

def reads(session, job):
    session.scalars(sa.select(Message).where(Message.queue_state == "failed"))
    session.execute(sa.delete(OtherTable))
    session.delete(api_key)
    job.sender = "x"
    event.queue_state = "failed"
'''
    writes = writes_of("app.example", ast.parse(source), owned_attributes(app_modules()))
    assert [w.line for w in writes] == [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 16]
