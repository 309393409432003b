"""Rules files: YAML in, validated and compiled :class:`Rule` values out (pure).

A rules file (``--rules FILE`` / ``DAS_RULES``, reference in docs/policies.md)::

    timezone: Europe/Berlin            # for time-of-day predicates and the change window
    change_window: {days: [mon, tue, wed, thu, fri], hours: "07:00-19:00"}
    builtins:                          # the built-in pack is on; tune or disable each rule
      off_hours_ddl: false
      brute_force_login: {count: 10, window: 2m}
    rules:
      - name: rdsadmin_noise
        where: {user: rdsadmin, command: [SELECT, SHOW]}
        action: drop

Every error names its line (``rules.yaml:12: ...``); :func:`load_rules` raises
:class:`RulesError` with all of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from ingest.policy.subject import (
    ENGINE_ALIASES,
    GROUP_FIELDS,
    NUMBER_FIELDS,
    TEXT_FIELDS,
    Subject,
)

KINDS = ("match", "threshold", "first_seen", "stream_health")
ACTIONS = ("alert", "redact", "drop")
SEVERITIES = ("critical", "high", "medium", "low")
REDACTABLE = ("command_text", "param_list")
REDACT_MODES = ("literals", "hash")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_DURATION = re.compile(r"^(\d+)\s*(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
#: Match rules alert once per group per this window unless they say otherwise.
DEFAULT_DEDUPE = timedelta(minutes=10)

Predicate = Callable[[Subject], bool]


class RulesError(ValueError):
    """A rules file that cannot be used; ``errors`` are "<line>: <message>" strings."""

    def __init__(self, source: str, errors: Sequence[tuple[int, str]]) -> None:
        self.source = source
        self.errors = [f"{source}:{line}: {message}" for line, message in errors]
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Rule:
    """One compiled rule. ``spec`` is what it was compiled from (for ``rules list``)."""

    name: str
    kind: str
    action: str
    severity: str
    title: str
    #: alternative group key sets: an event counts once under each
    group_by: tuple[tuple[str, ...], ...]
    window: timedelta
    count: int
    sum_field: str | None
    single: int | None
    value: str | None
    learning: timedelta
    gap: timedelta
    redact: Mapping[str, str]
    where: Predicate
    builtin: bool
    spec: Mapping[str, Any] = field(compare=False)

    @property
    def per_event(self) -> bool:
        """Evaluated on each event in the decode processes (all but stream health)."""
        return self.kind != "stream_health"


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    timezone: str = "UTC"

    def by_name(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


# --- YAML with line numbers ---------------------------------------------------------------


class _Doc:
    """Plain values from a YAML document plus the line of each (by path)."""

    def __init__(self, text: str, source: str) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        self.source = source
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 if mark is not None else 1
            problem = getattr(exc, "problem", None) or str(exc)
            raise RulesError(source, [(line, f"not valid YAML: {problem}")]) from None
        self.value = {} if node is None else self._plain(node, ())

    def _plain(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._plain(key_node, (*path, "<key>"))
                out[key] = self._plain(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(v, (*path, i)) for i, v in enumerate(node.value)]
        return _scalar(node)

    def line(self, path: tuple[Any, ...]) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


# --- compiling ----------------------------------------------------------------------------


class _Compiler:
    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        self.errors: list[tuple[int, str]] = []

    def error(self, path: tuple[Any, ...], message: str) -> None:
        self.errors.append((self.doc.line(path), message))

    def duration(self, value: Any, path: tuple[Any, ...]) -> timedelta | None:
        match = _DURATION.match(str(value).strip()) if isinstance(value, str | int) else None
        if match is None or isinstance(value, bool):
            self.error(path, f"{value!r} is not a duration (e.g. 60s, 10m, 2h, 7d)")
            return None
        return timedelta(seconds=int(match[1]) * _UNITS[match[2]])

    def positive_int(self, value: Any, path: tuple[Any, ...]) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.error(path, f"{value!r} must be a positive integer")
            return None
        return value

    # predicates

    def where(self, spec: Any, path: tuple[Any, ...]) -> Predicate:
        if spec is None:
            return _always
        if not isinstance(spec, dict):
            self.error(path, "where must be a mapping of field: condition")
            return _always
        preds: list[Predicate] = []
        for key, cond in spec.items():
            sub = (*path, key)
            if key == "any":
                if not isinstance(cond, list) or not cond:
                    self.error(sub, "any must be a non-empty list of where mappings")
                    continue
                alternatives = [self.where(c, (*sub, i)) for i, c in enumerate(cond)]
                preds.append(_any_of(alternatives))
            elif key == "failed":
                if not isinstance(cond, bool):
                    self.error(sub, "failed must be true or false")
                    continue
                preds.append(_failed(cond))
            elif key == "time":
                pred = self.time_predicate(cond, sub)
                if pred is not None:
                    preds.append(pred)
            elif key == "fingerprint_hash":
                if isinstance(cond, bool) or not isinstance(cond, int):
                    self.error(sub, "fingerprint_hash must be an integer")
                    continue
                preds.append(_fingerprint_hash(cond))
            elif key in NUMBER_FIELDS:
                pred = self.number_predicate(key, cond, sub)
                if pred is not None:
                    preds.append(pred)
            elif key in TEXT_FIELDS:
                pred = self.text_predicate(key, cond, sub)
                if pred is not None:
                    preds.append(pred)
            else:
                self.error(sub, f"unknown field {key!r} (known: {', '.join(_WHERE_KEYS)})")
        return _all_of(preds)

    def number_predicate(self, key: str, cond: Any, path: tuple[Any, ...]) -> Predicate | None:
        get = NUMBER_FIELDS[key]
        if isinstance(cond, int) and not isinstance(cond, bool):
            low: int | None = cond
            high: int | None = cond
        elif isinstance(cond, dict) and cond and set(cond) <= {"min", "max"}:
            low, high = cond.get("min"), cond.get("max")
            for bound in (low, high):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                    self.error(path, f"{key} bounds must be integers")
                    return None
        else:
            self.error(path, f"{key} takes a number or {{min: N, max: N}}")
            return None

        def pred(s: Subject) -> bool:
            value = get(s)
            if value is None:
                return False
            return (low is None or value >= low) and (high is None or value <= high)

        return pred

    def text_predicate(self, key: str, cond: Any, path: tuple[Any, ...]) -> Predicate | None:
        get = TEXT_FIELDS[key]
        if isinstance(cond, dict):
            if len(cond) != 1:
                self.error(path, f"{key}: one of in, not_in, regex, not_regex, prefix")
                return None
            ((op, arg),) = cond.items()
        else:
            op, arg = "in", cond
        if op in ("in", "not_in"):
            values = arg if isinstance(arg, list) else [arg]
            if not values or not all(isinstance(v, str | int) for v in values):
                self.error(path, f"{key}: a value or a list of values")
                return None
            if key == "remote_host":
                test = self.host_test(values, path)
                if test is None:
                    return None
            elif key == "engine":
                test = _in_test(values, True)
            else:
                # The commonest predicate (command: [...]): the field read, lower-cased and
                # looked up in one closure.
                return _in_lower(get, frozenset(str(v).lower() for v in values), op == "not_in")
        elif op in ("regex", "not_regex"):
            try:
                pattern = re.compile(str(arg), re.IGNORECASE)
            except re.error as exc:
                self.error(path, f"{key}: bad regular expression: {exc}")
                return None
            return _regex(get, pattern.search, op == "not_regex")

        elif op == "prefix":
            prefix = str(arg).lower()

            def test(value: str) -> bool:
                return value.lower().startswith(prefix)

        else:
            self.error(
                path, f"{key}: unknown operator {op!r} (in, not_in, regex, not_regex, prefix)"
            )
            return None
        if key == "engine" and op in ("in", "not_in"):
            unknown = [v for v in (arg if isinstance(arg, list) else [arg]) if v not in _ENGINES]
            if unknown:
                known = ", ".join(_ENGINES)
                self.error(path, f"engine must be one of {known}, not {unknown[0]!r}")
        negate: bool = str(op).startswith("not_")

        def pred(s: Subject) -> bool:
            value = get(s)
            if value is None or value == "":
                return negate
            return bool(test(value)) != negate

        return pred

    def host_test(self, values: list[Any], path: tuple[Any, ...]) -> Callable[[str], bool] | None:
        names: set[str] = set()
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for v in values:
            text = str(v)
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                if "/" in text:
                    self.error(path, f"remote_host: {text!r} is not a CIDR")
                    return None
                names.add(text.lower())

        def test(value: str) -> bool:
            if value.lower() in names:
                return True
            if not nets:
                return False
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                return False
            return any(addr in net for net in nets)

        return test

    def time_predicate(self, cond: Any, path: tuple[Any, ...]) -> Predicate | None:
        if cond in ("change_window", "outside_change_window"):
            # The file's change window (the built-in default when the file names none).
            key = "between" if cond == "change_window" else "outside"
            cond = {key: self.change_window["hours"], "days": self.change_window["days"]}
        if not isinstance(cond, dict) or not set(cond) <= {"between", "outside", "days"}:
            self.error(
                path,
                "time takes {between: 'HH:MM-HH:MM'} or {outside: ...}, and days; or "
                "change_window, outside_change_window",
            )
            return None
        days = cond.get("days", list(DAYS))
        if not isinstance(days, list) or not all(d in DAYS for d in days):
            self.error(path, f"days must be a list of {', '.join(DAYS)}")
            return None
        day_set = frozenset(DAYS.index(d) for d in days)
        span = cond.get("between", cond.get("outside"))
        outside = "outside" in cond
        if "between" in cond and "outside" in cond:
            self.error(path, "time: between or outside, not both")
            return None
        hours = self.hours(span, path) if span is not None else None
        if span is not None and hours is None:
            return None
        zone = self.zone

        def pred(s: Subject) -> bool:
            stamp = s.event.log_time
            if stamp is None:
                return False
            local = stamp.astimezone(zone)
            inside = local.weekday() in day_set and (
                hours is None or _within(local.time(), hours[0], hours[1])
            )
            return not inside if outside else inside

        return pred

    def hours(self, span: Any, path: tuple[Any, ...]) -> tuple[time, time] | None:
        match = re.match(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$", str(span))
        if match is None:
            self.error(path, f"{span!r} is not a time span 'HH:MM-HH:MM'")
            return None
        a, b, c, d = (int(x) for x in match.groups())
        if a > 24 or c > 24 or b > 59 or d > 59:
            self.error(path, f"{span!r} is not a time span 'HH:MM-HH:MM'")
            return None
        return time(min(a, 23), b if a < 24 else 59), time(min(c, 23), d if c < 24 else 59)

    zone: ZoneInfo = ZoneInfo("UTC")
    #: the file's change window, its defaults filled in (``time: change_window``)
    change_window: Mapping[str, Any] = {}


#: Distinct values a regular expression's answers are remembered for (per predicate): the same
#: fingerprints, users and commands come back all the time, a search costs microseconds.
MEMO_SIZE = 4096


def _regex(
    get: Callable[[Subject], str | None], search: Callable[[str], Any], negate: bool
) -> Predicate:
    """A field's value searched with a regular expression (``negate``: not found, or no
    value); the answers are remembered per value (MEMO_SIZE at most)."""
    seen: dict[str, bool] = {}

    def pred(s: Subject) -> bool:
        value = get(s)
        if value is None or value == "":
            return negate
        found = seen.get(value)
        if found is None:
            found = search(value) is not None
            if len(seen) >= MEMO_SIZE:
                seen.clear()
            seen[value] = found
        return found != negate

    return pred


def _in_lower(
    get: Callable[[Subject], str | None], wanted: frozenset[str], negate: bool
) -> Predicate:
    """A field's value, lower-cased, in a set (``negate``: not in it, or no value)."""
    if negate:

        def pred(s: Subject) -> bool:
            value = get(s)
            if value is None or value == "":
                return True
            return value.lower() not in wanted

    else:

        def pred(s: Subject) -> bool:
            value = get(s)
            if value is None or value == "":
                return False
            return value.lower() in wanted

    return pred


def _within(t: time, start: time, end: time) -> bool:
    if start <= end:
        return start <= t < end
    return t >= start or t < end  # a span over midnight


def _always(_s: Subject) -> bool:
    return True


# The combinators are closures of fixed arity for the common sizes: they run for every event,
# and a generator expression per call costs more than the predicates it combines.


def _all_of(preds: list[Predicate]) -> Predicate:
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda s: a(s) and b(s)
    if len(preds) == 3:
        a, b, c = preds
        return lambda s: a(s) and b(s) and c(s)
    first, rest = preds[0], _all_of(preds[1:])
    return lambda s: first(s) and rest(s)


def _any_of(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda s: a(s) or b(s)
    first, rest = preds[0], _any_of(preds[1:])
    return lambda s: first(s) or rest(s)


def _none_of(pred: Predicate) -> Predicate:
    return lambda s: not pred(s)


def _failed(want: bool) -> Predicate:
    return lambda s: s.failed == want


def _fingerprint_hash(want: int) -> Predicate:
    return lambda s: s.fingerprint is not None and s.fingerprint[1] == want


def _in_test(values: list[Any], exact: bool) -> Callable[[str], bool]:
    if exact:  # engines, with their aliases
        values = [ENGINE_ALIASES.get(str(v), v) for v in values]
    wanted = frozenset(str(v) if exact else str(v).lower() for v in values)
    if exact:
        return wanted.__contains__
    return lambda value: value.lower() in wanted


_ENGINES = ("postgresql", "postgres", "mysql", "oracle", "sqlserver")
_WHERE_KEYS = (*TEXT_FIELDS, *NUMBER_FIELDS, "failed", "time", "fingerprint_hash", "any")

_RULE_KEYS = frozenset(
    {
        "name", "kind", "where", "action", "severity", "title", "group_by", "window", "count",
        "sum", "single", "value", "learning", "gap", "redact", "enabled", "description",
        "unless",
    }
)  # fmt: skip


def _compile_rule(c: _Compiler, spec: Any, path: tuple[Any, ...], builtin: bool) -> Rule | None:
    if not isinstance(spec, dict):
        c.error(path, "a rule is a mapping (name, kind, where, action, ...)")
        return None
    before = len(c.errors)
    for key in spec:
        if key not in _RULE_KEYS:
            c.error((*path, key), f"unknown rule key {key!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        c.error((*path, "name"), "name must be a lower-case identifier ([a-z][a-z0-9_]*)")
        name = "?"
    kind = spec.get("kind", "match")
    if kind not in KINDS:
        c.error((*path, "kind"), f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    action = spec.get("action", "alert")
    if action not in ACTIONS:
        c.error((*path, "action"), f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if action != "alert" and kind != "match":
        c.error((*path, "action"), f"a {kind} rule can only alert")
    severity = spec.get("severity", "medium")
    if severity not in SEVERITIES:
        c.error((*path, "severity"), f"severity must be one of {', '.join(SEVERITIES)}")
    title = spec.get("title", f"{name}: {{group}}")
    if not isinstance(title, str):
        c.error((*path, "title"), "title must be a string")
        title = name
    group_by = _group_by(c, spec.get("group_by", []), (*path, "group_by"))
    default_window = DEFAULT_DEDUPE if kind == "match" else timedelta(minutes=1)
    window = default_window
    if "window" in spec:
        window = c.duration(spec["window"], (*path, "window")) or default_window
    count = c.positive_int(spec.get("count", 1), (*path, "count")) or 1
    sum_field = spec.get("sum")
    if sum_field is not None and sum_field not in NUMBER_FIELDS:
        c.error((*path, "sum"), f"sum takes a numeric field ({', '.join(NUMBER_FIELDS)})")
    single = spec.get("single")
    if single is not None:
        single = c.positive_int(single, (*path, "single"))
        if sum_field is None:
            c.error((*path, "single"), "single needs sum")
    value = spec.get("value")
    if kind == "first_seen" and value not in GROUP_FIELDS:
        known = ", ".join(GROUP_FIELDS)
        c.error((*path, "value"), f"a first_seen rule names its value field ({known})")
    learning = c.duration(spec.get("learning", "0s"), (*path, "learning")) or timedelta(0)
    gap = c.duration(spec.get("gap", "5m"), (*path, "gap")) or timedelta(minutes=5)
    redact = _redact(c, spec.get("redact"), action, (*path, "redact"))
    if kind in ("threshold", "first_seen", "match") and action == "alert" and not group_by:
        group_by = ((),)
    where = c.where(spec.get("where"), (*path, "where"))
    if spec.get("unless") is not None:
        # An exemption: events matching ``unless`` are not the rule's, whatever ``where`` says
        # (a built-in keeps its own ``where`` and a team adds only what it expects).
        exempt = c.where(spec["unless"], (*path, "unless"))
        where = _all_of([where, _none_of(exempt)])
    if len(c.errors) > before:
        return None
    return Rule(
        name=name, kind=kind, action=action, severity=severity, title=title,
        group_by=group_by, window=window or default_window, count=count,
        sum_field=sum_field, single=single, value=value, learning=learning, gap=gap,
        redact=redact, where=where, builtin=builtin, spec=spec,
    )  # fmt: skip


def _group_by(c: _Compiler, spec: Any, path: tuple[Any, ...]) -> tuple[tuple[str, ...], ...]:
    if not isinstance(spec, list):
        c.error(path, "group_by is a list of fields, or a list of such lists")
        return ()
    sets = spec if spec and all(isinstance(x, list) for x in spec) else [spec]
    out: list[tuple[str, ...]] = []
    for keys in sets:
        for key in keys:
            if key not in GROUP_FIELDS:
                c.error(path, f"group_by: unknown field {key!r}")
        out.append(tuple(str(k) for k in keys))
    return tuple(out) if spec else ()


def _redact(c: _Compiler, spec: Any, action: str, path: tuple[Any, ...]) -> dict[str, str]:
    if action != "redact":
        if spec is not None:
            c.error(path, "redact is for action: redact")
        return {}
    if spec is None:
        return dict.fromkeys(REDACTABLE, "literals")
    items = (
        spec.items()
        if isinstance(spec, dict)
        else ((f, "literals") for f in spec)
        if isinstance(spec, list)
        else None
    )
    if items is None:
        c.error(path, "redact is a list of fields or a mapping field: literals|hash")
        return {}
    out: dict[str, str] = {}
    for f, mode in items:
        if f not in REDACTABLE:
            c.error(path, f"redact: {f!r} cannot be redacted ({', '.join(REDACTABLE)})")
        elif mode not in REDACT_MODES:
            c.error(path, f"redact: mode must be literals or hash, not {mode!r}")
        else:
            out[f] = mode
    return out


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        replace = key in ("where", "unless")  # conditions are replaced whole, never merged
        if replace or not isinstance(value, dict) or not isinstance(out.get(key), dict):
            out[key] = value
        else:
            out[key] = _deep_merge(out[key], value)
    return out


def load_rules(text: str | None, source: str = "rules", *, builtins: bool = True) -> RuleSet:
    """Compile a rules file (None or empty: the built-in pack alone, when ``builtins``)."""
    from ingest.policy.builtin import CHANGE_DAYS, CHANGE_HOURS, builtin_specs

    doc = _Doc(text or "", source)
    c = _Compiler(doc)
    top = doc.value
    if not isinstance(top, dict):
        raise RulesError(source, [(1, "a rules file is a mapping (timezone, builtins, rules)")])
    for key in top:
        if key not in ("timezone", "change_window", "builtins", "rules"):
            c.error((key,), f"unknown key {key!r} (timezone, change_window, builtins, rules)")
    zone_name = top.get("timezone", "UTC")
    try:
        c.zone = ZoneInfo(str(zone_name))
    except (ZoneInfoNotFoundError, ValueError):
        c.error(("timezone",), f"unknown time zone {zone_name!r}")
    window = top.get("change_window") or {}
    if not isinstance(window, dict) or not set(window) <= {"days", "hours"}:
        c.error(("change_window",), "change_window takes days and hours")
        window = {}
    c.change_window = {
        "days": window.get("days", list(CHANGE_DAYS)),
        "hours": window.get("hours", CHANGE_HOURS),
    }
    specs: list[tuple[dict[str, Any], tuple[Any, ...], bool]] = []
    tuning = top.get("builtins") or {}
    if not isinstance(tuning, dict):
        c.error(("builtins",), "builtins maps a built-in rule's name to false or its settings")
        tuning = {}
    defaults = builtin_specs(window)
    for name in tuning:
        if name not in defaults:
            c.error(("builtins", name), f"no built-in rule {name!r} ({', '.join(defaults)})")
    if builtins:
        for name, spec in defaults.items():
            over = tuning.get(name, {})
            if over is False or (isinstance(over, dict) and over.get("enabled") is False):
                continue
            if over is True or over is None:
                over = {}
            if not isinstance(over, dict):
                c.error(("builtins", name), "a built-in's setting is false or a mapping")
                continue
            merged = _deep_merge(spec, {k: v for k, v in over.items() if k != "enabled"})
            specs.append((merged, ("builtins", name), True))
    rules_spec = top.get("rules") or []
    if not isinstance(rules_spec, list):
        c.error(("rules",), "rules is a list")
        rules_spec = []
    for i, spec in enumerate(rules_spec):
        if isinstance(spec, dict) and spec.get("enabled") is False:
            continue
        specs.append((spec, ("rules", i), False))
    rules: list[Rule] = []
    seen: set[str] = set()
    for spec, path, builtin in specs:
        rule = _compile_rule(c, spec, path, builtin)
        if rule is None:
            continue
        if rule.name in seen:
            c.error((*path, "name"), f"rule {rule.name!r} is defined twice")
            continue
        seen.add(rule.name)
        rules.append(rule)
    if c.errors:
        raise RulesError(source, sorted(c.errors))
    return RuleSet(tuple(rules), str(zone_name))


def load_rules_file(path: str | None, *, builtins: bool = True) -> RuleSet:
    """The rules of ``path`` (None: the built-in pack). OSError if it cannot be read."""
    if path is None:
        return load_rules(None, builtins=builtins)
    with open(path, encoding="utf-8") as f:
        return load_rules(f.read(), path, builtins=builtins)
