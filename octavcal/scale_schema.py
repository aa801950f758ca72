"""The schema of a scale file's ``octavcal`` metadata (README, "The scale file"): size and depth limits,
then every field that readers of a ScaleTable rely on. Problems raise ScaleFileError naming the field
path of the first one, e.g. ``targets['fc1:input'].axis``. Fields the reader never uses pass as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import ScaleFileError
from .grid import CONVENTIONS, MAX_BITS, MIN_BITS
from .groups import MAX_GROUP, MIN_GROUP

# Real metadata is a few kB per hundred targets; the limits keep a hostile file from costing
# memory or recursion (json.loads recurses per nesting level).
MAX_METADATA_CHARS = 4 * 1024 * 1024
MAX_DEPTH = 32
# A JSON string literal (written unrolled so that long strings cost no backtracking), and a bracket.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def parse_metadata(text: str, path: Path) -> dict[str, Any]:
    """The metadata JSON as an object, within the size and depth limits."""
    if len(text) > MAX_METADATA_CHARS:
        raise ScaleFileError(
            f"Scale file '{path}' has octavcal metadata too large to read: {len(text)} characters. "
            f"The limit is {MAX_METADATA_CHARS}."
        )
    if _nests_deeper_than(text, MAX_DEPTH):
        raise ScaleFileError(
            f"Scale file '{path}' has octavcal metadata nested too deeply: over {MAX_DEPTH} levels. "
            f"The limit is {MAX_DEPTH}."
        )
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, as is a 5,000-digit int
        raise ScaleFileError(
            f"Scale file '{path}' has corrupt octavcal metadata (not valid JSON: {_json_problem(exc)})."
        ) from exc
    if not isinstance(meta, dict):
        _Checker(path).fail("the top level", "is invalid", meta, "Expected an object")
    return meta


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return str(exc)
    if isinstance(exc, RecursionError):  # only where the recursion limit is far below MAX_DEPTH
        return "nested too deeply"
    return "a number too long"  # int() refuses more than sys.get_int_max_str_digits() digits


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Count brackets outside string literals, without recursion; stop at the first level too deep."""
    depth = 0
    for bracket in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def check_schema(meta: dict[str, Any], path: Path) -> None:
    """Every field a ScaleTable's readers use has the documented type and range."""
    _Checker(path).check(META, meta, "the top level")


def show(value: Any) -> str:
    """A value as a message shows it: JSON spelling, one line, at most about 60 characters."""
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'' if len(value) == 1 else 's'}"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:56] + '..."'


def key(name: str) -> str:
    """A mapping key inside a field path: ``['fc1:input']``."""
    text = repr(name)
    return f"[{text if len(text) <= 80 else text[:76] + '...' + text[0]}]"


@dataclass(frozen=True)
class Rule:
    """What one field may hold: ``valid`` says it in messages. Lists check each ``item``; objects their
    ``fields`` (name: rule, required) or, with ``values``, every value under any key; then ``across``."""

    valid: str
    accepts: Callable[[Any], bool] = lambda value: True
    item: Rule | None = None
    fields: dict[str, tuple[Rule, bool]] = field(default_factory=dict)
    values: Rule | None = None
    across: Callable[[_Checker, Any, str], None] | None = None  # a rule between fields of an object


class _Checker:
    """Raises the ScaleFileError of the first bad field: its path, the value seen, what is valid."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str, value: Any, valid: str) -> NoReturn:
        seen = f": {show(value)}" if problem == "is invalid" else ""
        raise ScaleFileError(
            f"Scale file '{self.path}' has invalid metadata: {where} {problem}{seen}. {valid}."
        )

    def check(self, rule: Rule, value: Any, where: str) -> None:
        if not rule.accepts(value):
            self.fail(where, "is invalid", value, f"Expected {rule.valid}")
        if rule.item is not None:
            for i, item in enumerate(value):
                self.check(rule.item, item, f"{where}[{i}]")
        for name, (sub, required) in rule.fields.items():
            inner = name if where == "the top level" else f"{where}.{name}"
            if name in value:
                self.check(sub, value[name], inner)
            elif required:
                self.fail(inner, "is missing", None, f"Expected {sub.valid}")
        if rule.values is not None:
            for name, sub_value in value.items():
                self.check(rule.values, sub_value, f"{where}{key(name)}")
        if rule.across is not None:
            rule.across(self, value, where)


def _axis_fits(check: _Checker, target: dict[str, Any], where: str) -> None:
    """A kept axis belongs to a weight and lies inside its shape (when the shape is known)."""
    axis, shape = target["axis"], target["shape"]
    if axis is not None and target["kind"] == "activation":
        check.fail(f"{where}.axis", "is invalid", axis, "Activations are per tensor: expected null")
    if axis is not None and shape and axis >= len(shape):
        check.fail(f"{where}.axis", "is invalid", axis, f"Expected null or an axis of the shape {shape}")
    group = target.get("group_size")
    if group is None:
        return
    if axis is None or len(shape) != 2:
        valid = "Per-group scales belong to a 2-D weight with an output axis: expected no group_size"
        check.fail(f"{where}.group_size", "is invalid", group, valid)
    if shape[1 - axis] % group:
        valid = f"Expected a group size that divides the {shape[1 - axis]} input features of {shape}"
        check.fail(f"{where}.group_size", "is invalid", group, valid)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(fields: dict[str, tuple[Rule, bool]], across: Any = None) -> Rule:
    return Rule("an object", lambda v: isinstance(v, dict), fields=fields, across=across)


STRING = Rule("a string", lambda v: isinstance(v, str))
STRING_OR_NULL = Rule("a string or null", lambda v: v is None or isinstance(v, str))
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
SIZE = Rule("an integer >= 0", lambda v: _integer(v) and v >= 0)
BITS = Rule(f"an integer in {MIN_BITS}..{MAX_BITS}", lambda v: _integer(v) and MIN_BITS <= v <= MAX_BITS)
STRINGS = Rule("a list of strings", lambda v: isinstance(v, list), item=STRING)
GROUP_SIZE = Rule(
    f"an integer in {MIN_GROUP}..{MAX_GROUP}", lambda v: _integer(v) and MIN_GROUP <= v <= MAX_GROUP
)
SIZES = Rule("a list of integers >= 0", lambda v: isinstance(v, list), item=SIZE)

TARGET = _object(
    {
        "module": (STRING, True),
        "role": (STRING, True),
        "op": (STRING, True),
        "kind": (Rule('"weight" or "activation"', lambda v: v in ("weight", "activation")), True),
        "bits": (BITS, True),
        "signed": (BOOLEAN, True),
        "axis": (Rule("null or an integer >= 0", lambda v: v is None or (_integer(v) and v >= 0)), True),
        "shape": (SIZES, True),
        "masked": (BOOLEAN, True),
        "shared_with": (STRING_OR_NULL, True),
        "methods": (STRINGS, True),
        # Format 2 only; version 1 files have neither.
        "param": (STRING_OR_NULL, False),
        "tied": (STRINGS, False),
        # Format 3, per-group weights only.
        "group_size": (GROUP_SIZE, False),
    },
    across=_axis_fits,
)
UNCOVERED = _object(
    {name: (STRING, True) for name in ("parameter", "category", "reason")} | {"shape": (SIZES, True)}
)
CONVENTION = Rule(" or ".join(map(json.dumps, CONVENTIONS)), lambda v: v in CONVENTIONS)
META = _object(
    {
        "grid": (_object({"convention": (CONVENTION, True)}), False),
        "methods": (STRINGS, False),
        "bits": (BITS, False),
        "batches": (SIZE, False),
        "seed": (Rule("an integer or null", lambda v: v is None or _integer(v)), False),
        "skipped": (STRINGS, False),
        "uncovered": (Rule("a list of objects", lambda v: isinstance(v, list), item=UNCOVERED), False),
        "model_fingerprint": (STRING_OR_NULL, False),
        "targets": (Rule("an object", lambda v: isinstance(v, dict), values=TARGET), True),
    }
)
