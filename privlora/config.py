"""Reading a training configuration: TOML presets and flags → ``TrainConfig`` (privlora.settings), validated before
any work.

Presets may group keys in tables (``[model]``, ``[data]``, ``[training]``, …); the tables are only for the
reader — keys are flat and unique. A key is shared by every method or belongs to one method's settings class
(registered with the method in ``privlora.objectives``); every key is also a ``--flag``.
"""
from __future__ import annotations

import argparse
import functools
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from privlora.errors import PrivloraError
from privlora.objectives import METHODS
from privlora.settings import MethodSettings, TrainConfig
from privlora.rundir import RunDir
from privlora.tomlio import inherit_chain, toml_literal

__all__ = ["TrainConfig", "MethodSettings", "build_config", "make_config", "read_toml", "add_config_flags",
           "resolved_toml", "ran_with", "write_resolved_config", "all_keys", "owners"]


SHARED_KEYS = {f.name for f in fields(TrainConfig)} - {"method_settings"}


def owners(key: str) -> list[str]:
    """The registered methods whose settings have ``key``."""
    return [name for name, cls in METHODS.items() if key in {f.name for f in fields(cls.settings_cls)}]


def all_keys() -> set[str]:
    """Every key a preset or flag may set: the shared ones and every registered method's."""
    return SHARED_KEYS | {f.name for cls in METHODS.values() for f in fields(cls.settings_cls)}


def _hint(key: str) -> str:
    owner: type = TrainConfig if key in SHARED_KEYS else METHODS[owners(key)[0]].settings_cls
    return str(_hints(owner)[key])


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def method_defaults(method: str) -> dict[str, Any]:
    """Every key of a ``method`` run at its default (flat, shared and the method's own): what a setting absent from
    an older run's resolved config stood for."""
    return make_config({"method": method}).flat()


def make_config(values: dict[str, Any] | None = None, *, source: str = "config", foreign: str = "error",
                **keys: Any) -> TrainConfig:
    """Flat keys (already typed) → a ``TrainConfig`` holding the method's settings; not validated.

    ``foreign``: what to do with a key of another method than ``method`` (``"error"``, or ``"drop"`` for presets
    and bench-wide flags that serve several methods: e.g. the paper's reference preset sets the attacker's keys
    for its plain-LoRA runs too)."""
    values = {**(values or {}), **keys}
    method = values.get("method", "lora")
    if method not in METHODS:
        raise PrivloraError(f"{source}: method {method!r} is not one of {', '.join(METHODS)}")
    kind = METHODS[method].settings_cls
    own = {f.name for f in fields(kind)}
    shared, mine = {}, {}
    for key, value in values.items():
        if key in SHARED_KEYS:
            shared[key] = value
        elif key in own:
            mine[key] = value
        elif not owners(key):
            raise PrivloraError(f"{source}: unknown config key {key!r}")
        elif foreign == "error":
            raise PrivloraError(f"{source}: {key} is a setting of {', '.join(owners(key))}, not of {method}")
    return TrainConfig(**shared, method_settings=kind(**mine))


def coerce_setting(key: str, value: Any, source: str) -> Any:
    """``value`` as ``key``'s type (a TOML string or number read as the setting's), or a one-line error naming
    ``source``."""
    hint = _hint(key)
    if value is None:
        return None
    try:
        if "bool" in hint:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "list[int]" in hint or "list[float]" in hint:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [int(v) if "list[int]" in hint else float(v) for v in value]
        if "int" in hint and "float" not in hint:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in hint:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise PrivloraError(f"{source}: {key} = {value!r} is not a valid {hint.replace('typing.', '')}") from None


def _flatten(table: dict, path: Path, out: dict | None = None) -> dict:
    out = {} if out is None else out
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, path, out)
        elif key in out:
            raise PrivloraError(f"{path}: key {key!r} is set twice")
        else:
            out[key] = value
    return out


def read_toml(path: str | Path) -> dict:
    """Flat key → value of a preset; ``inherit = "other.toml"`` (relative to this file) is read first, this
    file's keys override its."""
    flat: dict[str, Any] = {}
    for own in inherit_chain(path, "config file", _preset_keys):
        flat.update(own)
    return flat


def _preset_keys(path: Path, data: dict) -> dict:
    flat = _flatten(data, path)
    known = all_keys()
    for key in flat:
        if key not in known:
            raise PrivloraError(f"{path}: unknown config key {key!r}")
    return flat


def build_config(config_file: str | None, overrides: dict[str, Any], *, foreign_flags: str = "drop") -> TrainConfig:
    """Preset values, then flag overrides (flags win); the result is validated.

    A preset's keys of other methods than the run's are dropped (a shared base preset serves several methods);
    ``foreign_flags="error"`` refuses such flags (``privlora train``), ``"drop"`` ignores them (bench-wide flags)."""
    values: dict[str, Any] = {}
    if config_file:
        base = Path(config_file).parent
        for key, value in read_toml(config_file).items():
            values[key] = coerce_setting(key, value, str(config_file))
        # relative paths in a preset are relative to it
        for key in ("train_data_dir", "splits_dir", "splits", "sample_prompts"):
            value = values.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                values[key] = str(base / values[key])
    known = all_keys()
    for key, value in overrides.items():
        if key not in known:
            raise PrivloraError(f"command line: unknown option --{key}")
        values[key] = coerce_setting(key, value, f"--{key}")
    source = str(config_file or "command line")
    if foreign_flags == "error" and values.get("method", "lora") in METHODS:
        flags = {k: v for k, v in values.items() if k in overrides or k == "method"}
        make_config(flags, source="command line")  # a flag of another method is a one-line error
    return make_config(values, source=source, foreign="drop").validate(source)


def add_config_flags(parser: argparse.ArgumentParser | Any) -> None:
    """Every key becomes ``--key VALUE`` (booleans also accept a bare ``--key``); on a parser, each method's keys
    form their own help section."""
    def add(target: Any, name: str, hint: str, help_text: str | None) -> None:
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=name)
        if "bool" in hint:
            kw.update(nargs="?", const="true", metavar="BOOL")
        if name == "method":
            kw.update(choices=list(METHODS), help="; ".join(f"{n}: {c.summary}" for n, c in METHODS.items()))
        elif help_text:
            kw["help"] = help_text
        target.add_argument(f"--{name}", **kw)

    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name != "method_settings":
            add(parser, f.name, str(hints[f.name]), f.metadata.get("help"))
    seen: set[type] = set()
    for cls in METHODS.values():
        kind = cls.settings_cls
        if kind in seen or not fields(kind):
            continue
        seen.add(kind)
        names = ", ".join(n for n, c in METHODS.items() if c.settings_cls is kind)
        on_parser = isinstance(parser, argparse.ArgumentParser)
        group = parser.add_argument_group(f"{names} settings") if on_parser else parser
        kind_hints = get_type_hints(kind)
        for f in fields(kind):
            text = f.metadata.get("help")
            if not on_parser:
                text = f"[{names}] {text or ''}".strip()
            add(group, f.name, str(kind_hints[f.name]), text)


RESOLVED_NAME = RunDir.RESOLVED


def resolved_toml(cfg: TrainConfig) -> str:
    """Every key of ``cfg`` after inherit and flags, as a TOML preset that ``build_config`` reads back: the shared
    keys, then the method's own under a table named after the method.

    TOML has no null: an unset key (None) is written as a comment, which reads back as its default (None).
    """
    lines = ["# privlora: the fully resolved training settings (every key, after inherit and flags)"]

    def line(key: str, value: Any) -> str:
        return f"# {key} = (unset)" if value is None else f"{key} = {toml_literal(value)}"

    own = cfg.method_settings.values()
    lines += [line(k, v) for k, v in cfg.flat().items() if k not in own]
    if own:
        lines += ["", f"[{cfg.method}]  # the method's own settings"] + [line(k, v) for k, v in own.items()]
    return "\n".join(lines) + "\n"


def ran_with(cfg: TrainConfig, out: str | Path) -> bool:
    """Whether the run in folder ``out`` was started with every setting of ``cfg`` (its resolved_config.toml;
    ``resume``/``overwrite`` say how a run was started, not what it trains, and are ignored)."""
    path = Path(out) / RESOLVED_NAME

    def settings(text: str) -> dict:
        flat = _flatten(tomllib.loads(text), path)
        return {k: v for k, v in flat.items() if k not in ("resume", "overwrite")}

    try:
        now = settings(resolved_toml(cfg))
        then = settings(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, PrivloraError):
        return False
    # a file written before methods owned their settings also lists other methods' keys: they never applied
    applies = SHARED_KEYS | set(cfg.method_settings.values())
    return {k: v for k, v in then.items() if k in applies} == now


def write_resolved_config(cfg: TrainConfig, out: str | Path, derived: dict[str, str] | None = None) -> Path:
    """``derived``: what the method worked out from the settings (DP-LoRA's noise multiplier, …), as comments."""
    from privlora.io import write_text

    text = resolved_toml(cfg)
    if derived:
        text += "# derived by the method at the start of the run:\n" + "".join(
            f"# {k} = {v}\n" for k, v in derived.items())
    return write_text(Path(out) / RESOLVED_NAME, text)
