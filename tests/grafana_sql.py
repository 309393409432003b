"""Grafana's PostgreSQL macros, expanded as its data source does, for running panel SQL."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime


def expand(sql: str, start: datetime, end: datetime, streams: Sequence[str] | None = None) -> str:
    """``$stream`` (a multi-value variable) becomes the quoted list of ``streams``, as Grafana
    writes a multi-value SQL variable (All: every value of the variable's query)."""
    if "$stream" in sql:
        assert streams, "the query filters by $stream: pass the selected streams"
        quoted = ", ".join("'" + name.replace("'", "''") + "'" for name in streams)
        sql = sql.replace("$stream", quoted)
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: f"{m[1]} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'",
        sql,
    )
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*'(\d+)([hm])'\)",
        lambda m: (
            f"floor(extract(epoch from {m[1]})/{int(m[2]) * (3600 if m[3] == 'h' else 60)})"
            f'*{int(m[2]) * (3600 if m[3] == "h" else 60)} AS "time"'
        ),
        sql,
    )
    assert "$__" not in sql, sql
    return sql
