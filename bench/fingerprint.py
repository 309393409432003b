"""Query fingerprint cost and correctness: the hand tokenizer against sqlglot and pglast.

    python -m bench.fingerprint [--statements 20000]

Statements come from the emulator's realistic Aurora PostgreSQL and MySQL traffic (each with
its unique marker comment, so no cache helps; the per-process cache of ``of_statement`` is
bypassed). For each normalizer: microseconds per statement, how many statements it could not
handle, and how many distinct fingerprints the traffic's statement texts collapse to (fewer is
better, as long as different shapes stay apart; the emulator has a fixed set of shapes).
sqlglot and pglast are measured only when installed (they are not dependencies of das-ingest:
``pip install sqlglot pglast`` to compare).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from ingest.decode.fingerprint import fingerprint
from ingest.emulate.traffic import Traffic


def statements(count: int) -> list[tuple[str, str]]:
    """(engine, command text) of the traffic's statement events."""
    out: list[tuple[str, str]] = []
    for engine in ("postgres", "mysql"):
        for record in Traffic(7, engine).records(10, count):
            for event in record.events:
                text = event.get("commandText")
                if text and event.get("substatementId", 1) == 1:
                    out.append((engine, text))
    return out


def _sqlglot() -> Callable[[str, str], str] | None:
    try:
        import sqlglot
        from sqlglot import exp
    except ImportError:
        return None
    import logging

    logging.getLogger("sqlglot").setLevel(logging.ERROR)  # a warning per unsupported statement

    def normalize(engine: str, sql: str) -> str:
        dialect = "postgres" if engine == "postgres" else "mysql"
        tree = sqlglot.parse_one(sql, read=dialect)

        def literal(node: Any) -> Any:
            return exp.Placeholder() if isinstance(node, exp.Literal) else node

        return str(tree.transform(literal).sql(dialect=dialect, comments=False))

    return normalize


def _pglast() -> Callable[[str, str], str] | None:
    try:
        from pglast import parser
    except ImportError:
        return None

    def normalize(engine: str, sql: str) -> str:
        # libpg_query's fingerprint: PostgreSQL's grammar only (MySQL fails on its quoting).
        return str(parser.fingerprint(sql))

    return normalize


def measure(name: str, fn: Callable[[str, str], str], stmts: list[tuple[str, str]]) -> None:
    failed = 0
    prints: set[str] = set()
    start = time.perf_counter()
    for engine, sql in stmts:
        try:
            prints.add(fn(engine, sql))
        except Exception:
            failed += 1
    elapsed = time.perf_counter() - start
    print(
        f"{name:<16} {elapsed / len(stmts) * 1e6:8.1f} µs/statement  "
        f"failed {failed:>6}/{len(stmts)}  distinct fingerprints {len(prints)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=20000, help="events per engine")
    args = parser.parse_args()
    stmts = statements(args.statements)
    pg = [s for s in stmts if s[0] == "postgres"]
    my = [s for s in stmts if s[0] == "mysql"]
    print(f"{len(pg)} PostgreSQL and {len(my)} MySQL statements from the emulator")
    candidates: list[tuple[str, Callable[[str, str], str] | None]] = [
        ("hand tokenizer", lambda _engine, sql: fingerprint(sql)),
        ("sqlglot", _sqlglot()),
        ("pglast", _pglast()),
    ]
    for label, subset in (("PostgreSQL", pg), ("MySQL", my)):
        print(f"-- {label}")
        for name, fn in candidates:
            if fn is None:
                print(f"{name:<16} not installed")
            else:
                measure(name, fn, subset)


if __name__ == "__main__":
    main()
