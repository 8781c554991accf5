"""The config engine: safe YAML, frozen dataclasses built from mappings, typed dotted ``key=value`` overrides.

Every config of the project goes through this module: the training config (``facecrafter_jax.train.config``),
the toy pipeline's, the mixed-conditioning and AD-loss configs, the toy world / analyser / VAE configs::

    cfg = load_config("configs/stage_a_landmark.yaml", ["optim.lr=1e-4", "mesh.fsdp=4"], cls=TrainConfig)
    cfg.optim.lr                      # 0.0001 (float: the type of the field, not of the YAML literal)
    to_dict(cfg) / to_yaml(cfg)       # round-trip: from_dict(TrainConfig, to_dict(cfg)) == cfg
    from_dict(MixedConditioningConfig, {"id_only": 1}, what="mixed-conditioning")   # coerced, keys checked

Rules:

* Files are read with the safe YAML loader only (:func:`load_yaml`). Invalid YAML is a one-line
  :class:`ConfigError` naming the file, line and column; a tag the safe loader does not know (in particular
  ``!!python/object/apply:...``, which an unsafe loader would execute) is refused with one line.
* Every key must be a field of the dataclass it lands in; an unknown key is a :class:`ConfigError` naming
  its full dotted path and the valid keys (:func:`check_keys`).
* Values are coerced to the field's annotated type: ``"1e-4"`` becomes a float for a float field
  (YAML 1.1 reads ``1e-4`` as a string), ``"8"`` an int, ``"true"``/``"false"`` a bool, ``"null"``
  None for optional fields, ``"a,b"`` or ``"[a, b]"`` a tuple. A value that cannot be coerced is an
  error naming the key and the expected type.
* Fields typed ``dict`` / ``Mapping`` hold free-form sub-configs (an inline diffusers UNet config, say); an
  override ``model.unet.block_out_channels=[32,64]`` sets one key inside them (the value is parsed as YAML
  and takes the type of the existing value when there is one). Their content is checked by the consumer,
  which builds its own dataclass with :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from facecrafter_jax.errors import ConfigError

__all__ = ["ConfigError", "FrozenDict", "load_yaml", "parse_yaml", "check_keys", "coerce", "fields_from_dict",
           "from_dict", "to_dict", "to_yaml", "to_json", "parse_overrides", "apply_overrides", "load_config"]


# ------------------------------------------------------------------------------------------- safe YAML
def parse_yaml(text: str, source: str = "<string>") -> Any:
    """``yaml.safe_load(text)``; errors become one-line :class:`ConfigError` naming ``source``, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        tag = _tag_of(e)
        where = _mark(e.problem_mark)
        if tag is not None and "python/" in tag:
            raise ConfigError(f"{source}{where}: refused the YAML tag '{tag}': configs are plain data read with the "
                              "safe loader, and a python tag would run code; remove the tag") from None
        raise ConfigError(f"{source}{where}: unsupported YAML tag '{tag or e.problem}' (configs are plain data: "
                          "mappings, lists, strings, numbers, booleans, null)") from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"{source}{_mark(e.problem_mark)}: invalid YAML: {e.problem or e.context}; "
                          "fix the file (indentation, a missing ':' or an unclosed bracket/quote)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def _tag_of(e: yaml.constructor.ConstructorError) -> str | None:
    problem = str(e.problem or "")
    if "tag '" in problem:
        tag = problem.split("tag '", 1)[1].rsplit("'", 1)[0]
        return tag.replace("tag:yaml.org,2002:", "!!")
    return None


def _mark(mark) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader (see :func:`parse_yaml`); a missing file is a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return parse_yaml(text, str(path))


# ------------------------------------------------------------------------------------------- coercion
_NONE_STRINGS = {"null", "none", "~", ""}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _is_mapping_type(tp) -> bool:
    origin = typing.get_origin(tp) or tp
    return origin in (dict, Mapping, typing.Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping))


def _parse_scalar_string(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def coerce(value, tp, key: str):
    """Coerce ``value`` to annotated type ``tp`` or raise :class:`ConfigError` naming ``key``."""
    args = _union_args(tp)
    if args is not None:
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS)):
            return None
        if len(non_none) == 1:
            return coerce(value, non_none[0], key)
        parsed = _parse_scalar_string(value) if isinstance(value, str) else value
        for a in non_none:  # non-string members first, on the YAML-parsed value
            if a is str:
                continue
            try:
                return coerce(parsed, a, key)
            except ConfigError:
                pass
        if str in non_none and isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {' or '.join(_type_name(a) for a in args)}")
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
    if _is_dataclass_type(tp):
        if isinstance(value, str):
            value = _parse_scalar_string(value)
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, prefix=key)
    origin = typing.get_origin(tp)
    if origin in (tuple, list) or tp in (tuple, list):
        inner = typing.get_args(tp)
        if isinstance(value, str):
            parsed = _parse_scalar_string(value)
            if isinstance(parsed, list):
                value = parsed
            else:
                value = [v.strip() for v in value.strip().strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = inner[0] if inner else Any
        out = tuple(coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
        return list(out) if (origin or tp) is list else out
    if _is_mapping_type(tp):
        if isinstance(value, str):
            value = _parse_scalar_string(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _freeze_dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}': expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


class FrozenDict(dict):
    """A read-only, hashable dict (free-form sub-configs inside the frozen dataclasses)."""

    def _ro(self, *a, **k):
        raise TypeError("config dicts are read-only; use apply_overrides / dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self):  # type: ignore[override]
        return hash(json.dumps(_plain(self), sort_keys=True))


def _freeze_dict(d: Mapping) -> FrozenDict:
    def freeze(v):
        if isinstance(v, Mapping):
            return FrozenDict({str(k): freeze(x) for k, x in v.items()})
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        return v

    return freeze(d)


def _plain(v):
    """Dataclasses / frozen dicts / tuples -> plain dicts and lists (YAML / JSON)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------- dataclasses
def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: take values as given
        return {}


def check_keys(cls, d: Mapping[str, Any], *, what: str = "", prefix: str = "") -> None:
    """Raise :class:`ConfigError` if a key of ``d`` is not a field of dataclass ``cls``.

    The message names the first unknown key with its dotted path (``prefix.key``) and the valid keys:
    ``unknown [what ]config key 'optim.warmup'; valid keys of 'optim': [...]``.
    """
    names = _field_names(cls)
    unknown = [k for k in d if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        more = f" (and {len(unknown) - 1} more: {[str(k) for k in unknown[1:]]})" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown {what + ' ' if what else ''}config key '{key}'{more}; valid keys"
                          f"{' of ' + repr(prefix) if prefix else ''}: {names}")


def fields_from_dict(cls, d: Mapping[str, Any] | None, *, what: str = "", prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of ``cls`` given by ``d``: keys checked (:func:`check_keys`), values coerced to
    the field types. For consumers that construct the dataclass themselves."""
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        where = prefix or what or "<root>"
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(d).__name__}")
    check_keys(cls, d, what=what, prefix=prefix)
    hints = _hints(cls)
    return {name: coerce(d[name], hints.get(name, Any), f"{prefix}.{name}" if prefix else name)
            for name in _field_names(cls) if name in d}


def from_dict(cls, d: Mapping[str, Any] | None, *, prefix: str = "", what: str = ""):
    """Build dataclass ``cls`` from a (YAML) mapping; unknown keys and bad values raise :class:`ConfigError`
    (a ``ValueError`` / ``TypeError`` of the dataclass's own checks becomes one too, naming the section)."""
    kwargs = fields_from_dict(cls, d, what=what, prefix=prefix)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        where = prefix or (f"{what} config" if what else "<root>")
        raise ConfigError(f"config section '{where}': {e}") from e


def to_dict(cfg) -> dict:
    """Plain nested dict (lists for tuples) of a config dataclass; ``from_dict(type(cfg), to_dict(cfg)) == cfg``."""
    return _plain(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


# ------------------------------------------------------------------------------------------- overrides
def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]`` (error for an item without ``=``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override {item!r} has an empty key")
        out.append((k, v))
    return out


def _set_in_dict(d: Mapping, parts: list[str], raw: str, key: str) -> FrozenDict:
    d = dict(d)
    head = parts[0]
    if len(parts) == 1:
        parsed = _parse_scalar_string(raw)
        if head in d and d[head] is not None and parsed is not None:
            old = d[head]
            tp = (tuple if isinstance(old, (list, tuple)) else dict if isinstance(old, Mapping) else type(old))
            if tp is tuple:
                parsed = coerce(raw, tuple[Any, ...], key)
            elif tp in (bool, int, float, str, dict):
                parsed = coerce(raw, tp, key)
        d[head] = parsed
    else:
        sub = d.get(head)
        if sub is None:
            sub = {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"config key '{key}': '{head}' holds {sub!r}, not a mapping")
        d[head] = _set_in_dict(sub, parts[1:], raw, key)
    return _freeze_dict(d)


def _override(cfg, parts: list[str], raw: str, key: str, done: str):
    name = parts[0]
    names = _field_names(type(cfg))
    if name not in names:
        where = f"{done}.{name}" if done else name
        raise ConfigError(f"unknown config key '{where}' in override '{key}'; valid keys"
                          f"{' of ' + repr(done) if done else ''}: {names}")
    tp = _hints(type(cfg)).get(name, Any)
    path = f"{done}.{name}" if done else name
    current = getattr(cfg, name)
    union = _union_args(tp) or ()
    if len(parts) == 1:
        new = coerce(raw, tp, path)
    elif dataclasses.is_dataclass(current):
        new = _override(current, parts[1:], raw, key, path)
    elif current is None and any(_is_dataclass_type(a) for a in union):
        sub_cls = next(a for a in union if _is_dataclass_type(a))
        new = _override(sub_cls(), parts[1:], raw, key, path)
    elif isinstance(current, Mapping) or (current is None and any(_is_mapping_type(a) for a in union)) \
            or _is_mapping_type(tp):
        new = _set_in_dict(current or {}, parts[1:], raw, key)
    else:
        raise ConfigError(f"config key '{path}' is a {_type_name(tp)}, it has no sub-key '{parts[1]}' (override '{key}')")
    try:
        return dataclasses.replace(cfg, **{name: new})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override '{key}': {e}") from e


def apply_overrides(cfg, overrides: Sequence[str] | Sequence[tuple[str, str]]):
    """Apply ``key=value`` overrides (strings or pairs) to a config dataclass; returns a new config."""
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    for key, raw in pairs:
        cfg = _override(cfg, key.split("."), raw, key, "")
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *, cls):
    """Read a YAML file (:func:`load_yaml`) into dataclass ``cls``, apply overrides, then ``cfg.validate()``
    when ``cls`` has one. Every problem is a :class:`ConfigError` whose message starts with the file name."""
    data: Any = {}
    if path is not None:
        data = load_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg = apply_overrides(cfg, list(overrides))
    return cfg.validate() if hasattr(cfg, "validate") else cfg
