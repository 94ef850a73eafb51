"""One config loader for the whole framework: YAML file -> typed dataclasses, plus dotted overrides.

Unknown keys are refused with a suggestion, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it (`key`: its dotted path)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["optim.lr=1e-3", "parallel.tp=2"] into a nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mapping into mapping; an empty mapping clears (`ratios={}`)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:  # an empty file (or comments only) would silently run with every default
        raise ConfigError(f"{path}: the config file is empty; give the keys to set (or no file for every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (optional) with dotted `key=value` overrides applied on top. An
    error names the key and where it was written: the file, or the command line's override."""
    return load_sections(cls, {}, path, overrides)[0]


def load_sections(
    cls: type[T], sections: dict[str, type], path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[T, dict[str, Any]]:
    """`load_config`, with the top-level `sections` (name -> dataclass) built on their own and returned
    by name: a config tree whose parts are plug-ins (the training objectives) that `cls` does not know."""
    raw = read_yaml(path) if path else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    try:
        built = {name: from_dict(section, raw.pop(name, {}), where=name) for name, section in sections.items()}
        return from_dict(cls, raw, where=""), built
    except ConfigError as err:
        raise ConfigError(f"{written_at(err.key, path, overrides)}: {err}", err.key) from None


def written_at(key: str | None, path: str | Path | None, overrides: list[str] | None) -> str:
    """Where `key` was set: the last command-line override of it (or of its section), else the file."""
    given = [item for item in overrides or [] if key and _same_key(item.split("=", 1)[0].strip(), key)]
    return f"command line {given[-1]!r}" if given else str(path) if path else "config"


def _same_key(written: str, key: str) -> bool:
    """Whether an override of `written` set `key` (or the section or list that holds it)."""
    key = key.split("[", 1)[0]
    return key == written or key.startswith(written + ".") or written.startswith(key + ".")


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config") -> T:
    """Recursively build a dataclass, checking every key and coercing every value to its field type.
    A section written as the word `auto` (`parallel: auto`) sets its `auto` field, where it has one."""
    if raw == "auto" and "auto" in {f.name for f in dataclasses.fields(cls)}:
        raw = {"auto": True}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {raw!r}", where)
    written = frozenset(raw)  # before a preset fills in its own keys
    presets = getattr(cls, "PRESETS", None)
    if presets is not None and raw.get("preset") is not None:
        name = raw["preset"]
        if name not in presets:
            raise ConfigError(f"{_join(where, 'preset')}: unknown preset {name!r}; choose one of {sorted(presets)}")
        raw = {**presets[name], **raw}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {_join(where, key)!r}{hint}", _join(where, key))
        try:
            kwargs[key] = _coerce(hints[key], value, _join(where, key))
        except ConfigError as err:
            raise ConfigError(str(err), err.key or _join(where, key)) from None
    try:
        built = cls(**kwargs)
        built.__dict__[_GIVEN] = written
        return built
    except ConfigError as err:
        raise ConfigError(f"{where + ': ' if where else ''}{err}", _join(where, err.key) if err.key else where) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where + ': ' if where else ''}{err}", where or None) from err


_GIVEN = "_keys_given"


def keys_given(config: Any) -> frozenset[str] | None:
    """The keys a file or the command line set on `config` (a default left alone is not among them);
    None for a config built in code, whose defaults cannot be told from values equal to them."""
    return config.__dict__.get(_GIVEN)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_coerce(key_t, k, where): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if hint in (float,) and not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return value


def check_fields(config: Any, **rules: str | tuple) -> None:
    """Refuse a field outside its rule, naming the key (`load_config` adds where it was written): a
    bound (">= 1", "> 0", ">= 0", ">= -1") or a tuple of the values allowed. None passes (optional)."""
    for key, rule in rules.items():
        value = getattr(config, key)
        if value is None:
            continue
        if isinstance(rule, tuple):
            ok, wanted = value in rule, f"one of {', '.join(map(str, rule))}"
        else:
            op, bound = rule.split()
            ok, wanted = (value > float(bound)) if op == ">" else (value >= float(bound)), rule
        if not ok:
            raise ConfigError(f"{key} must be {wanted}, got {value!r}", key)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
