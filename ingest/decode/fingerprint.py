"""Query fingerprints and literal redaction (pure), in the style of pt-query-digest.

A fingerprint is the statement with its literals, lists and comments normalized away, so every
execution of one query shape has the same text whatever its values: ``SELECT * FROM t WHERE
id = 42 AND name = 'x'`` and ``select *  from t where id=7 and name='y' -- hi`` both become
``select * from t where id = ? and name = ?``. Its 64-bit hash (the first 8 bytes of BLAKE2b,
as a signed integer so it fits a ``bigint``) is what groups and indexes use.

One hand-written tokenizer (one compiled regular expression) serves the four engines' SQL
dialects: PostgreSQL (``E'..'``, ``$tag$..$tag$``, ``$1``), MySQL (backslash escapes, ``#``
comments are *not* stripped since ``#`` is an operator in PostgreSQL, backticks), Oracle
(``q'[..]'``, ``:name`` binds) and SQL Server (``N'..'``, ``[ident]``, ``@p1``). It never
parses: a statement it cannot make sense of (a missing quote) still gets a stable fingerprint,
with the rest of the text from the opening quote on replaced by one ``?``. Measured against
``sqlglot`` and ``pglast`` in ``bench/fingerprint.py`` (see the README): an order of magnitude
faster, and the only one of the three that accepts all four dialects and any text.

:func:`redact` reuses the tokenizer to replace only the literals (strings and numbers) by
``?``, keeping everything else (case, spacing, comments) as it was.
"""

from __future__ import annotations

import re
from hashlib import blake2b

#: One alternation, tried left to right at each position; the group that matched names the
#: token. Strings come before identifiers so E'..', N'..' and q'[..]' win over the bare word.
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
  | (?P<string>
        (?:[EeNnBbXx]|_utf8mb4|_utf8|_latin1)?'(?:[^'\\]|\\.|'')*'
      | [Qq]'(?:\[.*?\]|\(.*?\)|\{.*?\}|<.*?>|(?P<qd>[^\s\[({<]).*?(?P=qd))'
      | (?P<dollar>\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$).*?(?P=dollar)
      | '.*\Z
    )
  | (?P<number>
        0[xX][0-9a-fA-F]+\b
      | (?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_$\d])
    )
  | (?P<param>\$\d+|\?|:[A-Za-z_][A-Za-z0-9_]*|:\d+|@@?[A-Za-z_][A-Za-z0-9_@$#]*)
  | (?P<qident>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[A-Za-z_][^\]]*\])
  | (?P<word>[^\W\d][\w$#]*|\d[\w$#]*)
  | (?P<op>::|<=|>=|<>|!=|\|\||:=|=>|.)
    """,
    re.VERBOSE | re.DOTALL,
)

#: After these a "-" or "+" before a number is a sign, not an operator.
_SIGN_CONTEXT = frozenset(
    ["(", ",", "=", "<", ">", "<=", ">=", "<>", "!=", "+", "-", "*", "/", "select", "where",
     "and", "or", "not", "values", "in", "by", "then", "else", "when", "return", "between",
     "like", "limit", "offset", ""]
)  # fmt: skip
#: System variables (@@version) and SQL Server local variables are names, not values: they
#: stay. Only bind placeholders become "?".
_VARIABLE = re.compile(r"@@?[A-Za-z_]")
#: "(?, ?, ?)" -> "(?+)"; "values (?+), (?+)" -> "values (?+)".
_LIST = re.compile(r"\(\?(?:, \?)+\)")
_ROWS = re.compile(r"(values|value) \(\?\+\)(?:, \(\?\+\))+")
#: Spacing: none inside "a.b", "f(", "(x" and "x)", before "," ; "::" binds tightly.
_TIGHT = re.compile(r" ?(\.|::) ?| (?=[,)\]])|(?<=[(\[]) ")

MAX_INPUT = 65536


def fingerprint(sql: str) -> str:
    """The normalized text of a statement (empty for an empty or comment-only one)."""
    if len(sql) > MAX_INPUT:
        # Huge generated statements (bulk INSERTs) are normalized by their head: the shape is
        # there, and the cost per event stays bounded.
        sql = sql[:MAX_INPUT]
    out: list[str] = []
    append = out.append
    last = ""
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup
        if kind == "ws" or kind == "comment":
            continue
        if kind == "qd" or kind == "dollar":  # inner groups of a string
            kind = "string"
        if kind == "string" or kind == "number":
            if last in ("-", "+") and (out[-2] if len(out) >= 2 else "") in _SIGN_CONTEXT:
                out.pop()
            append("?")
            last = "?"
            continue
        text = match.group()
        if kind == "param":
            text = text.lower() if _VARIABLE.match(text) else "?"
        elif kind == "word" or kind == "op":
            text = text.lower()
        append(text)
        last = text
    if out and out[-1] == ";":
        out.pop()
    joined = _TIGHT.sub(_tight, " ".join(out))
    if "?" in joined:
        joined = _LIST.sub("(?+)", joined)
        if "(?+), (?+)" in joined:
            joined = _ROWS.sub(r"\1 (?+)", joined)
    return joined


def _tight(match: re.Match[str]) -> str:
    return match.group(1) or ""


def fingerprint_hash(text: str) -> int:
    """A signed 64-bit hash of a fingerprint (BLAKE2b, 8 bytes, big-endian)."""
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def redact(sql: str) -> str:
    """``sql`` with every string and number literal replaced by ``?``; nothing else changes."""
    parts: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup
        if kind in ("string", "number", "qd", "dollar"):
            parts.append(sql[pos : match.start()])
            parts.append("?")
            pos = match.end()
    if pos == 0:
        return sql
    parts.append(sql[pos:])
    return "".join(parts)


Fingerprint = tuple[str, int]

_CACHE_SIZE = 8192
_cache: dict[str, Fingerprint | None] = {}


def of_statement(command_text: str | None) -> Fingerprint | None:
    """(fingerprint, hash) of an event's ``command_text``; None when it has no statement
    (NULL, empty, only a comment). Cached per process: the same statement text repeats."""
    if not command_text:
        return None
    found = _cache.get(command_text, _MISSING)
    if found is not _MISSING:
        return found  # type: ignore[return-value]
    text = fingerprint(command_text)
    result = (text, fingerprint_hash(text)) if text else None
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[command_text] = result
    return result


_MISSING = object()
