"""Presets and configuration layering.

Precedence, lowest first: built-in defaults < preset < ``--config FILE`` <
flags (``--model``, ``--data``, ``--budget``) < ``--set key=value``. Each resolved
value remembers which layer set it (``Resolved.sources``), so ``vramfit plan`` can
say where every number came from.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import RunConfig
from .errors import ConfigError, UsageError

PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ABOUT_KEY = "about"  # preset metadata; not part of RunConfig


def _data_dir(name: str) -> Path:
    """Packaged data dir: inside the wheel, or at the repo root for a source checkout."""
    packaged = resources.files("vramfit") / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / name


def presets_dir() -> Path:
    return _data_dir("presets")


def deepspeed_dir() -> Path:
    return _data_dir("configs") / "deepspeed"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    about: dict[str, Any]
    values: dict[str, Any]

    @property
    def card_gib(self) -> float | None:
        v = self.about.get("card_gib")
        return float(v) if v is not None else None

    @property
    def summary(self) -> str:
        return str(self.about.get("summary", ""))


def list_presets() -> list[Preset]:
    """Every preset file, cpu first, then by card size, then the multi-card ones."""
    found = [load_preset(p.stem) for p in presets_dir().glob("*.yaml")]
    return sorted(found, key=lambda p: (p.name != "cpu", p.card_gib is None, p.card_gib or 0, p.name))


def load_preset(name: str) -> Preset:
    if not PRESET_NAME.match(name):
        raise UsageError(
            f"invalid preset name {name!r}",
            "preset names are lowercase letters, digits, '-' and '_'; see `vramfit presets`",
        )
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        names = [p.stem for p in sorted(presets_dir().glob("*.yaml"))]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown preset {name!r}", f"{hint}available: {', '.join(names)}")
    data = _read_yaml(path)
    about = data.pop(ABOUT_KEY, {}) or {}
    return Preset(name=name, path=path, about=about, values=data)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}", "check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}", "pass a readable UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)  # safe_load: a config file must never construct objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML", "fix the syntax near that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level", "see `vramfit presets show cpu`")
    return data


# ---------------------------------------------------------------- layering


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of the schema -> whether it is a section (has sub-keys)."""
    out: dict[str, bool] = {}
    for name, f in model.model_fields.items():
        key = prefix + name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[key] = True
            out.update(valid_keys(ann, key + "."))
        else:
            out[key] = False
    return out


def _check_keys(data: dict[str, Any], source: str, prefix: str = "") -> None:
    keys = valid_keys()
    for k, v in data.items():
        dotted = prefix + str(k)
        if dotted not in keys:
            close = difflib.get_close_matches(dotted, [x for x in keys if not keys[x]], n=1, cutoff=0.5)
            if not close:
                close = difflib.get_close_matches(dotted.split(".")[-1], [x.split(".")[-1] for x in keys], n=1)
                close = [x for x in keys if x.endswith("." + close[0]) or x == close[0]][:1] if close else []
            hint = f"did you mean {close[0]!r}?" if close else "see `vramfit presets show cpu` for every key"
            raise ConfigError(f"unknown config key {dotted!r} (from {source})", hint)
        if keys[dotted]:
            if not isinstance(v, dict):
                raise ConfigError(f"{dotted!r} (from {source}) must be a mapping of keys", f"e.g. {dotted}: {{...}}")
            _check_keys(v, source, dotted + ".")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's (or a layer's) values by dotted key; dict-valued keys (launch.env) kept whole."""
    keys = valid_keys()
    out: dict[str, Any] = {}
    for k, v in data.items():
        dotted = prefix + str(k)
        if keys.get(dotted) and isinstance(v, dict):
            out.update(flatten(v, dotted + "."))
        else:
            out[dotted] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, v in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lora.r=8", "data.path=x.jsonl"]`` -> nested dict; values parsed as YAML scalars."""
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}", "e.g. --set lora.r=8")
        try:
            flat[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            flat[key] = raw
    return _unflatten(flat)


@dataclass
class Resolved:
    config: RunConfig
    sources: dict[str, str] = field(default_factory=dict)  # dotted key -> layer name
    preset: Preset | None = None


def resolve(layers: list[tuple[str, dict[str, Any]]], preset: Preset | None = None) -> Resolved:
    """Merge ``(source_name, values)`` layers over the defaults, validate once, keep provenance."""
    flat = flatten(RunConfig().model_dump())
    sources = {k: "default" for k in flat}
    for source, values in layers:
        if not values:
            continue
        _check_keys(values, source)
        for k, v in flatten(values).items():
            if isinstance(flat.get(k), dict) and isinstance(v, dict):
                v = {**flat[k], **v}  # maps (launch.env) merge key by key across layers
            flat[k] = v
            sources[k] = source
    try:
        config = RunConfig.model_validate(_unflatten(flat))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or "config"
        src = sources.get(loc, "a combination of settings")
        raise ConfigError(f"{loc}: {err['msg']} (from {src})", "fix that value; `vramfit presets show NAME` shows valid ones") from None
    return Resolved(config=config, sources=sources, preset=preset)


def resolve_layers(
    preset: str | None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    set_items: list[str] | None = None,
) -> Resolved:
    """The standard stack: defaults < preset < --config file < flags < --set."""
    layers: list[tuple[str, dict[str, Any]]] = []
    p = load_preset(preset) if preset else None
    if p:
        layers.append((f"preset:{p.name}", p.values))
    if config_file:
        layers.append((f"file:{config_file}", _read_yaml(Path(config_file))))
    if overrides:
        layers.append(("flag", overrides))
    if set_items:
        layers.append(("--set", parse_set(set_items)))
    return resolve(layers, preset=p)
