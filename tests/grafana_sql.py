"""Grafana's PostgreSQL macros, expanded as its data source does, for running panel SQL."""

from __future__ import annotations

import re
from datetime import datetime


def expand(sql: str, start: datetime, end: datetime) -> str:
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
