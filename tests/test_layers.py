"""The layers of the product package, read from the source with ``ast`` (see docs/architecture.md).

- ``decode/`` imports only its own modules and the pure leaf modules (errors included), and no
  I/O library: it is what the process pool runs (tests/test_decode_purity.py checks the same at
  run time, in a fresh interpreter).
- The leaf modules (shared values) import no other ingest module than leaves.
- ``kinesis.py`` imports nothing from ``warehouse/``; ``consumer/`` never sees ``argparse``.
- No cycle between ingest's subpackages (and top-level modules), nor between its modules.
- The product package ``ingest`` never imports the development package ``das_dev``.
- ``das-ingest --help`` builds every command's parser without loading the heavy libraries.

Every import counts, wherever it sits: at module level, inside a function (lazy), or under
``TYPE_CHECKING``. A failure names the offending import as ``path:line: module imports target``.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = "ingest"
DEV = "das_dev"

#: Leaf modules of pure values: no I/O library, no ingest module but other pure leaves.
PURE_LEAVES = frozenset(
    {
        "ingest.errors",  # the error classes and whether they are retriable
        "ingest.checkpoint",  # checkpoint sentinels
        "ingest.lease",  # Lease, LeaseToken, ShardInfo
        "ingest.copytext",  # COPY text primitives and the one EVENT_COLUMNS
        "ingest.digests",  # event digests by UTC day (the chain's input)
        "ingest.moments",  # the commands' ISO 8601 times
    }
)
#: Leaves that are not pure: shared types of an I/O library.
LEAVES = PURE_LEAVES | {"ingest.conn"}  # the warehouse connection type (asyncpg)

#: Libraries that do I/O or pull in an event loop; none belongs in the decode layer.
IO_LIBRARIES = frozenset(
    {"asyncio", "aiobotocore", "botocore", "boto3", "asyncpg", "aiohttp", "s3transfer", "uvloop"}
    | {"socket", "subprocess", "http", "urllib", "prometheus_client"}
)
#: What ``--help`` must not load: the libraries a command imports inside its function.
HEAVY = frozenset(
    {"asyncio", "aiobotocore", "botocore", "boto3", "asyncpg", "aiohttp", "uvloop"}
    | {"aws_encryption_sdk", "cryptography", "prometheus_client", "orjson"}
)


@dataclass(frozen=True)
class Import:
    """One import statement's target, as the importing module sees it."""

    where: str  # the file, relative to the tree's root
    line: int
    module: str  # the importing module, e.g. ingest.decode.batch
    target: str  # the module imported, e.g. ingest.errors (a package or a module)

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.module} imports {self.target}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import in ``path``. ``from package import name`` targets the module
    ``package.name`` when there is one in the source tree, else ``package``; relative imports
    are resolved against the importing module."""
    module = module_name(path, root)
    where = path.relative_to(root).as_posix()
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(Import(where, node.lineno, module, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop] if drop else anchor
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if _is_module(sub, root) else base
                found.append(Import(where, node.lineno, module, target))
    return list(dict.fromkeys(found))  # one per target and line


def sources(package: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def product_imports() -> tuple[Import, ...]:
    return tuple(i for path in sources(PRODUCT) for i in imports_of(path))


def internal(found: Iterable[Import], package: str = PRODUCT) -> list[Import]:
    return [i for i in found if i.target == package or i.target.startswith(package + ".")]


def top(name: str) -> str:
    return name.split(".")[0]


def unit(name: str) -> str:
    """A subpackage or top-level module of ingest (``ingest.decode``, ``ingest.kinesis``), or
    ``ingest`` itself (its ``__init__``)."""
    return ".".join(name.split(".")[:2])


def find_cycle(edges: dict[str, dict[str, Import]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(edges.get(node, {})):
            if state.get(succ) == 1:
                return [*path[path.index(succ) :], succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def graph(found: Iterable[Import], *, by_unit: bool) -> dict[str, dict[str, Import]]:
    edges: dict[str, dict[str, Import]] = {}
    for imp in found:
        a, b = (unit(imp.module), unit(imp.target)) if by_unit else (imp.module, imp.target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, imp)
    return edges


def describe_cycle(cycle: list[str], edges: dict[str, dict[str, Import]]) -> str:
    return (
        "import cycle "
        + " -> ".join(cycle)
        + ":\n"
        + "\n".join(f"  {edges[a][b]}" for a, b in itertools.pairwise(cycle))
    )


# --- the rules ----------------------------------------------------------------------------------


def test_decode_imports_only_itself_errors_and_pure_leaves() -> None:
    decode = [i for i in product_imports() if i.module.startswith("ingest.decode")]
    assert len(decode) > 50  # the scan sees the layer
    bad = [
        str(i)
        for i in internal(decode)
        if not (i.target == "ingest.decode" or i.target.startswith("ingest.decode."))
        and i.target not in PURE_LEAVES
    ]
    assert bad == [], "decode/ may import only its own modules and pure leaves:\n" + "\n".join(bad)
    io = [str(i) for i in decode if top(i.target) in IO_LIBRARIES]
    assert io == [], "decode/ must not import I/O libraries:\n" + "\n".join(io)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_only_leaves(leaf: str) -> None:
    path = ROOT.joinpath(*leaf.split(".")).with_suffix(".py")
    assert path.is_file(), f"{leaf} is gone: update LEAVES here and docs/architecture.md"
    found = imports_of(path)
    allowed = PURE_LEAVES if leaf in PURE_LEAVES else LEAVES
    bad = [str(i) for i in internal(found) if i.target not in allowed]
    assert bad == [], f"{leaf} is a leaf module:\n" + "\n".join(bad)
    if leaf in PURE_LEAVES:
        io = [str(i) for i in found if top(i.target) in IO_LIBRARIES]
        assert io == [], f"{leaf} is a pure leaf module:\n" + "\n".join(io)


def test_kinesis_imports_nothing_from_the_warehouse() -> None:
    kinesis = [i for i in product_imports() if i.module == "ingest.kinesis"]
    assert kinesis, "ingest/kinesis.py is gone"
    bad = [str(i) for i in internal(kinesis, "ingest.warehouse")]
    assert bad == [], "the Kinesis adapter must not know the warehouse:\n" + "\n".join(bad)


def test_the_consumer_never_sees_argparse() -> None:
    consumer = [i for i in product_imports() if i.module.startswith("ingest.consumer")]
    assert consumer, "ingest/consumer/ is gone"
    bad = [str(i) for i in consumer if top(i.target) == "argparse"]
    assert bad == [], "settings reach consumer/ as frozen dataclasses:\n" + "\n".join(bad)


def test_no_cycle_between_the_subpackages() -> None:
    edges = graph(internal(product_imports()), by_unit=True)
    assert {"ingest.decode", "ingest.warehouse", "ingest.integrity"} <= set(edges)
    cycle = find_cycle(edges)
    assert cycle is None, describe_cycle(cycle, edges)


def test_no_cycle_between_the_modules() -> None:
    edges = graph(internal(product_imports()), by_unit=False)
    cycle = find_cycle(edges)
    assert cycle is None, describe_cycle(cycle, edges)


def test_the_product_does_not_import_the_dev_package() -> None:
    assert (ROOT / DEV / "devstack.py").is_file()
    bad = [str(i) for i in internal(product_imports(), DEV)]
    assert bad == [], f"{PRODUCT} must work without {DEV}:\n" + "\n".join(bad)


def test_the_architecture_page_maps_every_unit_and_leaf() -> None:
    """docs/architecture.md names every subpackage and top-level module of ingest, and its
    leaf table lists exactly the leaf modules these rules know."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    units = {unit(m) for i in product_imports() for m in (i.module, i.target) if top(m) == PRODUCT}
    for name in sorted(units - {PRODUCT, "ingest.__main__"}):
        short = name.split(".")[1]
        package = (ROOT / PRODUCT / short).is_dir()
        assert f"`{short}/`" in doc if package else f"`{short}.py`" in doc, name
    table = doc.split("Leaf modules", 1)[1].split("\n\n", 2)[1]
    listed = {f"ingest.{row.split('`')[1].removesuffix('.py')}" for row in table.splitlines()[2:]}
    assert listed == LEAVES


def test_the_architecture_page_shows_the_shard_consumers_own_diagram() -> None:
    """The state diagram of docs/architecture.md is the one in consumer/shard.py's docstring
    (its first literal block), so the two cannot drift apart."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    docstring = ast.get_docstring(
        ast.parse((ROOT / "ingest" / "consumer" / "shard.py").read_text())
    )
    assert docstring is not None
    lines: list[str] = []
    for line in docstring.split("::\n\n", 1)[1].splitlines():
        if line and not line.startswith(" "):
            break
        lines.append(line)
    diagram = textwrap.dedent("\n".join(lines)).strip("\n")
    assert "WAITING_ON_PARENTS" in diagram
    assert "LEASE_LOST" in diagram
    assert f"```\n{diagram}\n```" in doc


HELP_CHILD = """
import json, sys
from ingest.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(json.dumps(sorted(sys.modules)))
"""


def test_help_loads_no_heavy_library_and_no_layer_below_the_commands() -> None:
    """``das-ingest --help`` imports every command module (statically) and nothing heavy: the
    commands import asyncio, the AWS SDK, asyncpg and the consumer inside their functions."""
    result = subprocess.run(
        [sys.executable, "-c", HELP_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "ingest.commands.run" in loaded  # the commands were imported
    assert "ingest.emulate.cli" in loaded
    assert sorted(m for m in loaded if top(m) in HEAVY) == []
    below = ("ingest.consumer", "ingest.warehouse", "ingest.integrity", "ingest.decode")
    assert sorted(m for m in loaded if m.startswith(below)) == []
    assert "importlib" not in Path(ROOT / "ingest" / "cli.py").read_text()  # static dispatch


# --- the checker itself -------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from . import mod\n",
            "pkg/mod.py": "",
            "pkg/sub/__init__.py": "from ..mod import x\n",
            "pkg/sub/leaf.py": """\
                from __future__ import annotations
                import asyncio.events
                from typing import TYPE_CHECKING
                from pkg import mod, not_a_module
                from . import sibling
                from .. import mod as again
                if TYPE_CHECKING:
                    from pkg.sub import typed
                def lazy() -> None:
                    import pkg.mod
            """,
        },
    )
    leaf = {str(i) for i in imports_of(root / "pkg" / "sub" / "leaf.py", root)}
    assert leaf == {
        "pkg/sub/leaf.py:1: pkg.sub.leaf imports __future__",
        "pkg/sub/leaf.py:2: pkg.sub.leaf imports asyncio.events",
        "pkg/sub/leaf.py:3: pkg.sub.leaf imports typing",
        "pkg/sub/leaf.py:4: pkg.sub.leaf imports pkg.mod",
        "pkg/sub/leaf.py:4: pkg.sub.leaf imports pkg",  # not_a_module: a name in pkg
        "pkg/sub/leaf.py:5: pkg.sub.leaf imports pkg.sub",  # sibling is no module: a name
        "pkg/sub/leaf.py:6: pkg.sub.leaf imports pkg.mod",
        "pkg/sub/leaf.py:8: pkg.sub.leaf imports pkg.sub",
        "pkg/sub/leaf.py:10: pkg.sub.leaf imports pkg.mod",
    }
    assert [i.target for i in imports_of(root / "pkg" / "__init__.py", root)] == ["pkg.mod"]
    assert [i.target for i in imports_of(root / "pkg" / "sub" / "__init__.py", root)] == ["pkg.mod"]


def test_the_checker_finds_a_cycle_and_names_its_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a/__init__.py": "",
            "pkg/a/x.py": "from pkg.b import y\n",
            "pkg/b/__init__.py": "",
            "pkg/b/y.py": "def f() -> None:\n    from pkg.c import z\n",
            "pkg/c.py": "import pkg.a.x\n",
            "pkg/d.py": "import pkg.c\n",
        },
    )
    found = internal(
        (i for p in sorted((root / "pkg").rglob("*.py")) for i in imports_of(p, root)), "pkg"
    )
    edges = graph(found, by_unit=True)
    cycle = find_cycle(edges)
    assert cycle == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert describe_cycle(cycle, edges).splitlines()[1:] == [
        "  pkg/a/x.py:1: pkg.a.x imports pkg.b.y",
        "  pkg/b/y.py:2: pkg.b.y imports pkg.c",
        "  pkg/c.py:1: pkg.c imports pkg.a.x",
    ]
    del edges["pkg.c"]
    assert find_cycle(edges) is None
