"""The shape ``ARCHITECTURE.md`` draws, held by the suite.

Read from the source text alone (nothing of ``bastion`` is imported, nothing outside
the checkout is read), so CI on a bare clone checks it too:

* no import cycle among ``bastion.*`` modules, counting every import: top-level,
  in-function and ``TYPE_CHECKING`` ones (a cycle hidden behind ``TYPE_CHECKING`` is
  still two modules that cannot be read, or split, one without the other);
* the pure layers (``protocol/``, ``security/``) import no I/O layer, and nothing
  that does I/O, reads a clock or draws random numbers: time and randomness are
  arguments there;
* the cluster seam has no ``clustered`` flag to branch on, and no implementation
  of it raises ``NotImplementedError``;
* modules stay small enough to read in one sitting (:data:`LINE_LIMITS`).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "bastion"

#: Layers that do I/O; the pure layers import none of them.
IO_LAYERS = (
    "bastion.core",
    "bastion.server",
    "bastion.api",
    "bastion.adapters",
    "bastion.store",
    "bastion.webhooks",
)
PURE_LAYERS = ("bastion.protocol", "bastion.security")
#: Modules that do I/O, read a clock or draw random numbers: never in a pure layer.
IMPURE_MODULES = frozenset(
    {
        "asyncio",
        "httptools",
        "random",
        "redis",
        "secrets",
        "selectors",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "threading",
        "time",
        "uvloop",
        "websockets",
    }
)
#: ``datetime.now()`` and friends read the clock as surely as ``time.time()``.
CLOCK_READS = frozenset({"now", "utcnow", "today"})

#: The most lines a module may have, by path under ``src/bastion`` (the first match
#: wins). A module may go past the default only with a row here and its reason.
LINE_LIMITS: tuple[tuple[str, int, str], ...] = (
    ("server/http.py", 350, "the listener's protocol only: it carries bytes"),
    ("api/admin.py", 500, "the admin API's routes; SQL and config patching live elsewhere"),
    ("core/", 400, "the hub is a package of concepts, one small module each"),
    ("", 800, "a module is one concept, readable in one sitting"),
)


# --- reading the source --------------------------------------------------------------


@functools.cache
def _modules() -> Mapping[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


@functools.cache
def _tree(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _owner(dotted: str) -> str | None:
    """The module of ours that ``dotted`` names or lies in; ``None``: not ours."""
    modules = _modules()
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _base(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    package = name.split(".")
    if _modules()[name].name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _imports(name: str) -> set[str]:
    """The modules of ours that ``name`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_owner(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, node)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                owner = child if child in _modules() else _owner(base)
                if owner is not None:
                    found.add(owner)
    found.discard(name)
    if _modules()[name].name == "__init__.py":
        # A package re-exporting its own modules is not a cycle with them.
        found = {module for module in found if not module.startswith(name + ".")}
    return found


@functools.cache
def _graph() -> Mapping[str, frozenset[str]]:
    return {name: frozenset(_imports(name)) for name in _modules()}


def _cycles(graph: Mapping[str, frozenset[str]]) -> list[list[str]]:
    """One cycle through each back edge a depth-first walk meets, as a path."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target)
        on_path.discard(module)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return cycles


def _in_layer(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _line_limit(relative: str) -> tuple[int, str]:
    for prefix, limit, reason in LINE_LIMITS:
        if relative.startswith(prefix):
            return limit, reason
    raise AssertionError("the last row of LINE_LIMITS matches every module")


def _names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every identifier a module binds or reads: names, attributes, arguments, defs."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.arg | ast.keyword) and node.arg is not None:
            yield node.lineno, node.arg
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.lineno, node.name
        elif isinstance(node, ast.alias):
            yield node.lineno, (node.asname or node.name).rpartition(".")[2]


# --- the rules -----------------------------------------------------------------------


def test_no_import_cycle_among_bastion_modules() -> None:
    cycles = [" -> ".join(cycle) for cycle in _cycles(_graph())]
    assert not cycles, (
        "import cycles (every import counts, TYPE_CHECKING and in-function ones too):\n  "
        + "\n  ".join(cycles)
        + "\nBreak each one: move what both sides need into a module both can import, "
        "or have the lower layer take what it needs as an argument (a Protocol, a callback)."
    )


def test_pure_layers_import_no_io_layer_clock_or_randomness() -> None:
    problems: list[str] = []
    for name, path in _modules().items():
        if not _in_layer(name, PURE_LAYERS):
            continue
        for target in sorted(_graph()[name]):
            if _in_layer(target, IO_LAYERS):
                problems.append(f"{_relative(path)} imports {target}")
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.Import):
                tops = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                tops = []
            problems.extend(
                f"{_relative(path)}:{node.lineno} imports {top}"
                for top in tops
                if top in IMPURE_MODULES
            )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_READS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"datetime", "date"}
            ):
                problems.append(f"{_relative(path)}:{node.lineno} reads the clock")
    assert not problems, (
        "protocol/ and security/ are pure (ARCHITECTURE.md, rule 1):\n  "
        + "\n  ".join(problems)
        + "\nPass time and random values in as arguments (`now`), and keep I/O in "
        "server/, adapters/, store/, api/ or webhooks/, which call the pure code."
    )


def test_nothing_is_named_clustered() -> None:
    found = [
        f"{_relative(path)}:{line}"
        for name, path in _modules().items()
        for line, identifier in _names(_tree(name))
        if identifier == "clustered"
    ]
    assert not found, (
        f"`clustered` in {', '.join(found)}: callers must not branch on the deployment. "
        "Give the behaviour to the cluster seam (adapters/: Bus, ClusterState), which the "
        "local, memory and Redis implementations each honour in full."
    )


def test_no_adapter_raises_not_implemented() -> None:
    found = [
        f"{_relative(path)}:{line}"
        for name, path in _modules().items()
        if _in_layer(name, ("bastion.adapters",))
        for line, identifier in _names(_tree(name))
        if identifier == "NotImplementedError"
    ]
    assert not found, (
        f"NotImplementedError in {', '.join(found)}: every implementation of the cluster "
        "seam honours all of it. Implement the method, or take it out of the interface."
    )


def test_modules_stay_small() -> None:
    problems: list[str] = []
    for path in _modules().values():
        relative = _relative(path)
        limit, reason = _line_limit(relative)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            problems.append(f"{relative} has {lines} lines, over {limit} ({reason})")
    assert not problems, (
        "modules over their size limit:\n  "
        + "\n  ".join(problems)
        + "\nMove a cohesive piece into a module of its own. If a module must stay whole, "
        "give it a row in LINE_LIMITS (tests/test_structure.py) that says why."
    )


# --- the rules can fail --------------------------------------------------------------


def test_the_import_walk_sees_every_kind_of_import() -> None:
    graph = _graph()
    assert len(graph) > 50, sorted(graph)
    # Top-level, relative-free ``from`` import of a module.
    assert "bastion.server.context" in graph["bastion.server.http"]
    # An import under ``if TYPE_CHECKING:``.
    assert "bastion.config" in graph["bastion.security.tokens"]
    # An import inside a function.
    nested = {
        target
        for node in ast.walk(_tree("bastion.cli"))
        if isinstance(node, ast.FunctionDef)
        for inner in ast.walk(node)
        if isinstance(inner, ast.ImportFrom) and inner.module
        for target in [_owner(inner.module)]
        if target is not None
    }
    assert nested, "bastion.cli imports some module inside a function"
    assert nested <= graph["bastion.cli"]


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a", "d"}),
        "d": frozenset(),
        "e": frozenset({"e"}),
    }
    assert _cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _cycles({"a": frozenset({"b"}), "b": frozenset()}) == []
