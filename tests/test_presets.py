"""Presets (every presets/*.yaml) and configuration layering. Offline, no torch."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from conftest import PRESET_FILES, PRESET_NAMES
from vramfit.config import RunConfig
from vramfit.errors import ConfigError, UsageError
from vramfit.presets import list_presets, load_preset, parse_set, presets_dir, resolve, resolve_layers, valid_keys


def test_glob_finds_presets_and_package_uses_same_dir():
    assert len(PRESET_FILES) >= 9
    assert "cpu" in PRESET_NAMES and "8gb" in PRESET_NAMES
    assert sorted(p.stem for p in presets_dir().glob("*.yaml")) == PRESET_NAMES


def test_list_presets_lists_every_file_cpu_first():
    names = [p.name for p in list_presets()]
    assert sorted(names) == PRESET_NAMES
    assert names[0] == "cpu"
    sized = [p.card_gib for p in list_presets() if p.card_gib is not None]
    assert sized == sorted(sized)


@pytest.mark.parametrize("path", PRESET_FILES, ids=PRESET_NAMES)
def test_preset_loads_and_validates(path):
    name = path.stem
    p = load_preset(name)
    assert p.name == name
    assert "about" not in p.values
    r = resolve_layers(name)
    assert isinstance(r.config, RunConfig)
    assert r.preset is not None and r.preset.name == name
    # Every key the preset sets is attributed to it.
    flat_keys = [k for k in r.sources if r.sources[k] == f"preset:{name}"]
    assert flat_keys, "a preset that sets nothing"
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        if section == "about":
            continue
        if isinstance(values, dict):
            for k in values:
                assert r.sources[f"{section}.{k}"] == f"preset:{name}"
        else:
            assert r.sources[section] == f"preset:{name}"


@pytest.mark.parametrize("path", PRESET_FILES, ids=PRESET_NAMES)
def test_preset_about_header(path):
    p = load_preset(path.stem)
    assert {"summary", "card_gib"} <= set(p.about), p.about
    assert isinstance(p.about["summary"], str) and len(p.about["summary"]) > 10
    m = re.fullmatch(r"(\d+)gb", path.stem)
    if m:
        assert p.card_gib == float(m.group(1))
    else:
        assert p.card_gib is None or p.card_gib > 0


@pytest.mark.parametrize("path", PRESET_FILES, ids=PRESET_NAMES)
def test_preset_file_starts_with_comment_header(path):
    name = path.stem
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, f"{path.name} must start with comment lines"
    assert header[0].startswith(f"# {name}:"), header[0]
    text = " ".join(header)
    # Who it is for: the hardware it targets (card size, GPUs, or CPU).
    assert re.search(r"\b(\d+\s?GB|\d\+? GPUs|GPUs?|cards?|CPU|no-GPU)\b", text), "header names no target hardware"
    cmds = [h.lstrip("# ").strip() for h in header if f"vramfit train --preset {name}" in h]
    assert cmds, f"header lacks `vramfit train --preset {name}`"
    # The --set overrides shown in the header command are valid.
    argv = shlex.split(cmds[0].split("(")[0])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    resolve_layers(name, set_items=sets)


def test_layer_precedence_and_sources(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        "lora:\n  r: 4\n  alpha: 8\ndata:\n  seq_len: 128\n  path: from-file.jsonl\ntrain:\n  lr: 0.01\n"
    )
    overrides = {"data": {"path": "flag.jsonl"}, "budget_gib": 7.5, "train": {"lr": 0.02}}
    r = resolve_layers("cpu", cfg, overrides, ["train.lr=0.03", "lora.alpha=9"])
    c, s = r.config, r.sources
    # default only
    assert c.quant.bits == 4 and s["quant.bits"] == "default"
    # preset over default
    assert c.train.max_steps == 60 and s["train.max_steps"] == "preset:cpu"
    # file over preset
    assert c.lora.r == 4 and s["lora.r"] == f"file:{cfg}"
    assert c.data.seq_len == 128 and s["data.seq_len"] == f"file:{cfg}"
    # flag over file
    assert c.data.path == "flag.jsonl" and s["data.path"] == "flag"
    assert c.budget_gib == 7.5 and s["budget_gib"] == "flag"
    # --set over flag and file
    assert c.train.lr == 0.03 and s["train.lr"] == "--set"
    assert c.lora.alpha == 9 and s["lora.alpha"] == "--set"
    # untouched preset value keeps its source
    assert c.lora.target_modules == "all-linear" and s["lora.target_modules"] == "preset:cpu"


def test_no_preset_is_pure_defaults():
    r = resolve_layers(None)
    assert r.config == RunConfig()
    assert set(r.sources.values()) == {"default"}
    assert r.preset is None


@pytest.mark.parametrize(
    ("item", "suggestion"),
    [
        ("lora.rank=8", "lora.r"),
        ("train.micro_bach=2", "train.micro_batch"),
        ("data.seqlen=64", "data.seq_len"),
        ("deepspeed.stag=2", "deepspeed.stage"),
    ],
)
def test_unknown_key_suggests_nearest(item, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key {item.split('=')[0]!r}") as e:
        resolve_layers("cpu", set_items=[item])
    assert f"(hint: did you mean {suggestion!r}?)" in e.value.one_line()
    assert "(from --set)" in str(e.value)
    assert e.value.exit_code == 2


def test_unknown_key_in_config_file_names_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'") as e:
        resolve_layers("cpu", f)
    assert "did you mean 'lora.r'" in e.value.hint
    assert f"file:{f}" in str(e.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        resolve([("x", {"trian": {"lr": 1}})])


def test_section_must_be_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora: 5\n")
    with pytest.raises(ConfigError, match="'lora'.*must be a mapping"):
        resolve_layers(None, f)


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("lora.r=abc", "lora.r"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("train.micro_batch=[1]", "train.micro_batch"),
        ("method=qlor", "method"),
        ("data.seq_len=-1", "data.seq_len"),
        ("deepspeed.stage=1", "deepspeed.stage"),
        ("train.optimizer=adam", "train.optimizer"),
    ],
)
def test_wrong_type_or_value(item, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*\(from --set\)") as e:
        resolve_layers("cpu", set_items=[item])
    assert e.value.hint


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="offload_params needs stage 3"):
        resolve_layers(None, set_items=["deepspeed.stage=2", "deepspeed.offload_params=true"])
    with pytest.raises(ConfigError, match="node_rank"):
        resolve_layers(None, set_items=["launch.node_rank=2", "launch.nodes=2"])


def test_unknown_preset_suggests_close_name():
    with pytest.raises(UsageError, match=r"unknown preset '8bg'.*") as e:
        load_preset("8bg")
    assert "did you mean '8gb'" in e.value.hint
    for name in PRESET_NAMES:
        assert name in e.value.hint


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "a/b", "/abs", "x\\y", "CPU", "", ".hidden"])
def test_preset_name_with_path_parts_rejected(name):
    with pytest.raises(UsageError, match="invalid preset name"):
        load_preset(name)


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("lora:\n  r: 8\n  target_modules: [q_proj, v_proj\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+: invalid YAML"):
        resolve_layers("cpu", f)
    g = tmp_path / "tab.yaml"
    g.write_text("lora:\n  r: 8\n\tq: 1\n")
    with pytest.raises(ConfigError, match=r"tab\.yaml line 3: invalid YAML"):
        resolve_layers("cpu", g)


def test_yaml_top_level_must_be_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_layers(None, f)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        resolve_layers(None, tmp_path / "nope.yaml")


def test_empty_config_file_is_no_layer(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    r = resolve_layers("cpu", f)
    assert not any(s.startswith("file:") for s in r.sources.values())


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("model:\n  name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve_layers(None, f)


# ---------------------------------------------------------------- --set parsing


def test_parse_set_scalars_and_nesting():
    got = parse_set(
        [
            "lora.r=8",
            "train.lr=0.5",
            "lora.target_modules=[q_proj, v_proj]",
            "data.max_examples=null",
            "train.grad_ckpt=false",
            "data.path=dir/a=b.jsonl",
            "model.name=",
            "budget_gib=7.5",
        ]
    )
    assert got == {
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 0.5, "grad_ckpt": False},
        "data": {"max_examples": None, "path": "dir/a=b.jsonl"},
        "model": {"name": ""},
        "budget_gib": 7.5,
    }
    assert isinstance(got["lora"]["r"], int)


def test_set_scientific_notation_resolves_to_float():
    # YAML 1.1 reads "1e-4" as a string; the validated config must still hold the float.
    r = resolve_layers("cpu", set_items=["train.lr=1e-4"])
    assert r.config.train.lr == pytest.approx(1e-4)


def test_set_null_and_list_reach_config():
    r = resolve_layers("cpu", set_items=["data.max_examples=10", "lora.target_modules=[q_proj,v_proj]"])
    assert r.config.data.max_examples == 10
    assert r.config.lora.target_modules == ["q_proj", "v_proj"]
    r = resolve_layers("cpu", set_items=["data.max_examples=10", "data.max_examples=null"])
    assert r.config.data.max_examples is None


def test_later_set_wins():
    r = resolve_layers("cpu", set_items=["lora.r=2", "lora.r=3"])
    assert r.config.lora.r == 3


@pytest.mark.parametrize("item", ["lora.r", "=8", "", "  =1"])
def test_parse_set_requires_key_equals_value(item):
    with pytest.raises(UsageError, match="--set expects key=value"):
        parse_set([item])


def test_valid_keys_covers_schema():
    keys = valid_keys()
    assert keys["lora"] is True and keys["lora.r"] is False
    assert keys["launch.env"] is False  # a dict value, not a section
    assert "about" not in keys


@pytest.mark.parametrize("name", [p.name for p in list_presets() if p.card_gib])
def test_preset_fits_its_card_with_its_reference_model(name):
    """"It fits": each card preset, on its reference model (Qwen2.5-7B), is predicted
    under the card's memory by the calibrated memory model."""
    from conftest import QWEN7B_CONFIG
    from vramfit.memory import estimate
    from vramfit.model_shape import shape_from_config

    preset = load_preset(name)
    cfg = resolve([(name, preset.values)]).config
    peak = estimate(shape_from_config(QWEN7B_CONFIG), cfg, "bfloat16", "cuda").peak_gib
    assert peak <= preset.card_gib, f"{name}: predicted {peak:.2f} GiB on a {preset.card_gib} GiB card"
