"""``das-ingest rules check FILE`` and ``das-ingest rules list``: the policy rules."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import Any

from ingest.commands.options import add_log_argument, env_default, env_flag


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        metavar="FILE",
        default=env_default("DAS_RULES", None),
        help="policy rules file (YAML, see docs/policies.md); the built-in pack is on without "
        "it [DAS_RULES]",
    )
    parser.add_argument(
        "--no-builtin-rules",
        action="store_true",
        default=env_flag("DAS_NO_BUILTIN_RULES"),
        help="evaluate only the rules of --rules, without the built-in pack [DAS_NO_BUILTIN_RULES]",
    )


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rules",
        help="check a policy rules file, or list the effective rules",
        description="Policy rules detect (alert), redact and drop events as they are "
        "ingested. See docs/policies.md for the file format and the built-in pack.",
    )
    sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        help="validate a rules file: every error with its line; exit 2 if any",
        description="Validate FILE as `run --rules FILE` would; print each error as "
        "FILE:LINE: message and exit 2, else print how many rules are in effect and exit 0.",
    )
    check.add_argument("file", metavar="FILE")
    add_log_argument(check)
    check.set_defaults(func=_check)
    listing = sub.add_parser(
        "list",
        help="show the effective rules (built-ins with their tuning, then the file's)",
        description="Print the rules run would evaluate: name, kind, action, severity and "
        "settings; --json for one JSON object per rule.",
    )
    add_rules_argument(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_log_argument(listing)
    listing.set_defaults(func=_list)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])


def _load(path: str | None, builtins: bool) -> Any:
    from ingest.policy.rules import RulesError, load_rules_file

    try:
        return load_rules_file(path, builtins=builtins)
    except RulesError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None
    except OSError as exc:
        print(f"das-ingest rules: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    rules = _load(args.file, True)
    if rules is None:
        return 2
    custom = sum(1 for r in rules.rules if not r.builtin)
    print(
        f"{args.file}: ok, {len(rules.rules)} rules in effect "
        f"({len(rules.rules) - custom} built-in, {custom} from the file)"
    )
    return 0


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def describe(rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": rule.name,
        "kind": rule.kind,
        "action": rule.action,
        "builtin": rule.builtin,
    }
    if rule.action == "alert":
        out["severity"] = rule.severity
        out["title"] = rule.title
        out["group_by"] = [list(keys) for keys in rule.group_by]
    if rule.kind in ("threshold", "match") and rule.action == "alert":
        out["window"] = _duration(rule.window)
    if rule.kind == "threshold":
        out["count"] = rule.count
        if rule.sum_field:
            out["sum"] = rule.sum_field
        if rule.single:
            out["single"] = rule.single
    if rule.kind == "first_seen":
        out["value"] = rule.value
        out["learning"] = _duration(rule.learning)
    if rule.kind == "stream_health":
        out["gap"] = _duration(rule.gap)
    if rule.action == "redact":
        out["redact"] = dict(rule.redact)
    if "where" in rule.spec:
        out["where"] = rule.spec["where"]
    return out


def _list(args: argparse.Namespace) -> int:
    rules = _load(args.rules, not args.no_builtin_rules)
    if rules is None:
        return 2
    for rule in rules.rules:
        info = describe(rule)
        if args.json:
            print(json.dumps(info, sort_keys=False, default=str))
            continue
        origin = "built-in" if rule.builtin else "file"
        settings = ", ".join(
            f"{k}={v}"
            for k, v in info.items()
            if k not in ("name", "kind", "action", "builtin", "where", "title", "severity")
        )
        severity = f" {rule.severity}" if rule.action == "alert" else ""
        print(f"{rule.name:<20} {rule.kind:<13} {rule.action}{severity:<10} ({origin}) {settings}")
    print(f"time zone: {rules.timezone}", file=sys.stderr)
    return 0
