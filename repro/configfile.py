"""Config files: YAML in, YAML out, `section.key=value` overrides, `base:` chains.

A config file mirrors repro/config.py: top-level keys are the sections (model, data, optim,
train, wandb), nested keys their fields. One more top-level key, `base: other.yaml`, means
"load that file first (relative to this file's folder), then apply mine"; chains are allowed,
cycles are an error, and `base: null` (or `none`, or no `base`) means the defaults. Every value is checked against the field's type as it is read, so a
mistake is reported with the file (or "command line") it came from:

- int fields take ints; float fields take ints or floats (and strings such as `5e-4`, which
  YAML 1.1 reads as a string); bool fields take only true/false; tuple fields take a list;
  bools are never numbers and null is never a value.
- str fields in a file take strings; `on`/`off` (which YAML 1.1 reads as booleans) are turned
  back into 'on'/'off' for fields whose choices are 'auto'|'on'|'off'. On the command line a
  str field takes the text as typed (`wandb.name=2012`, `train.compile=off`).
- Duplicate keys in one mapping are an error (PyYAML would keep the last one silently).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from repro.config import CHOICES, Config, ConfigError, config_to_dict, validate

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
"""Section name -> its dataclass."""

BASE_KEY = "base"
COMMAND_LINE = "command line"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _closest(word: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _convert(section: str, key: str, value: Any, origin: str) -> Any:
    """The value as the field's type, or a ConfigError naming the key, origin and types."""
    tp = _field_types(section)[key]
    dotted = f"{section}.{key}"

    def wrong() -> ConfigError:
        hint = ""
        if tp is str and origin != COMMAND_LINE:
            hint = " (quote it in YAML: '...')"
        return ConfigError(
            f"{origin}: {dotted}: expected {_type_name(tp)}, got {_describe(value)}{hint}"
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{origin}: {dotted}: expected a finite float, got {value!r}")
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, bool) and "on" in CHOICES.get(dotted, ()):
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, str):
            return value
        raise wrong()
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise wrong()
        out = []
        for v in value:
            ok = isinstance(v, item) and not (item is int and isinstance(v, bool))
            if not ok:
                raise ConfigError(
                    f"{origin}: {dotted}: expected {_type_name(tp)}, got {_describe(v)} in {value!r}"
                )
            out.append(v)
        return tuple(out)
    raise TypeError(f"{dotted}: field type {tp!r} has no YAML conversion")  # a new field's type


def _check_section(section: Any, origin: str) -> None:
    if section not in SECTIONS:
        valid = list(SECTIONS)
        raise ConfigError(
            f"{origin}: unknown section {section!r}; {_closest(str(section), valid)}"
            f"valid sections: {', '.join(valid)} (and `{BASE_KEY}` in a file)"
        )


def _check_key(section: str, key: Any, origin: str) -> None:
    _check_section(section, origin)
    valid = list(_field_types(section))
    if key not in valid:
        raise ConfigError(
            f"{origin}: unknown key '{section}.{key}'; {_closest(f'{section}.{key}', [f'{section}.{k}' for k in valid])}"
            f"valid keys of {section}: {', '.join(valid)}"
        )


def _apply(
    values: dict[str, dict[str, Any]], origins: dict[str, str], data: Mapping[Any, Any], origin: str
) -> None:
    """Check and merge one layer ({section: {key: value}}) into `values`."""
    for section, body in data.items():
        _check_section(section, origin)
        if body is None:  # `model:` with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(
                f"{origin}: section {section!r} must be a mapping of keys to values, got {_describe(body)}"
            )
        for key, value in body.items():
            _check_key(section, key, origin)
            values[section][key] = _convert(section, key, value, origin)
            origins[f"{section}.{key}"] = origin


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        line = f", line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must be a mapping of sections ({', '.join(SECTIONS)}), "
            f"got {_describe(data)}"
        )
    return data


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict[Any, Any]]]:
    """[(origin, layer)] for `path` and its bases, the deepest base first."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: `base` chain loops back on itself: {chain}")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    layers: list[tuple[str, dict[Any, Any]]] = []
    if isinstance(base, str) and base.strip().lower() not in ("", "none"):
        layers = _file_chain(path.parent / base, (*seen, resolved))
    elif base is not None and not isinstance(base, str):
        raise ConfigError(
            f"{path}: base: expected a file name relative to this file, got {_describe(base)}"
        )
    return [*layers, (str(path), data)]


def _parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value): parsed as YAML, or the raw text for str fields."""
    dotted, sep, raw = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        owners = [f"{s}.{dotted.strip()}" for s in SECTIONS if dotted.strip() in _field_types(s)]
        hint = f"did you mean {owners[0]}={raw}? " if len(owners) == 1 and sep else ""
        raise ConfigError(
            f"{COMMAND_LINE}: override {item!r} must look like section.key=value "
            f"(e.g. optim.lr=0.02); {hint}sections: {', '.join(SECTIONS)}"
        )
    section, key = parts
    _check_key(section, key, COMMAND_LINE)
    if _field_types(section)[key] is str:
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = None
        # Quoted text loses its quotes; anything else stays exactly as typed.
        return section, key, parsed if isinstance(parsed, str) else raw.strip()
    try:
        return section, key, yaml.safe_load(raw)
    except yaml.YAMLError:
        return section, key, raw  # reported as a type error by _convert


def _build(values: dict[str, dict[str, Any]], origins: dict[str, str]) -> Config:
    cfg = Config(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    validate(cfg, origins)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- the `base` chain of `path` <- `path` <- overrides, then validate.

    `path` None means the defaults (the paper's recipe) plus overrides. Each override is
    `section.key=value`, the value read as YAML (`0.02`, `true`, `[25, 51, 79]`).
    """
    if isinstance(overrides, str):  # one override passed bare, not in a list
        overrides = [overrides]
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: dict[str, str] = {}
    if path is not None:
        for origin, layer in _file_chain(Path(path)):
            _apply(values, origins, layer, origin)
    for item in overrides:
        section, key, value = _parse_override(item)
        _apply(values, origins, {section: {key: value}}, COMMAND_LINE)
    return _build(values, origins)


def config_from_dict(data: Mapping[str, Any], origin: str = "checkpoint") -> Config:
    """A validated Config from a nested dict (config_to_dict's form); missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: config must be a mapping of sections, got {_describe(data)}")
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: dict[str, str] = {}
    _apply(values, origins, data, origin)
    return _build(values, {k: origin for k in origins})


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the whole resolved config (every field) as YAML; load_config reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        "# Resolved config of this run (repro/config.py); load with load_config.\n" + text
    )
    os.replace(tmp, path)  # a reader never sees half a file
    return path
