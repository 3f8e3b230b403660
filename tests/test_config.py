"""Configuration: the shipped file is valid and complete; each kind of mistake is one clear line."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from daemon.config import PRESETS, Config, ConfigError, load_config, parse_config, worker_threads
from pipeline.stages import STAGES

SHIPPED = Path(__file__).resolve().parents[1] / "config.toml"


def test_shipped_config_validates():
    config = load_config(SHIPPED)
    assert config.chain().stages[0].name == "upscale"


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= _fields(kind, f"{prefix}{name}.")
        else:
            names.add(f"{prefix}{name}")
    return names


def _documented_keys(text: str) -> set[str]:
    """Keys set or shown (commented out) in the TOML, with their section path."""
    keys, section = set(), ""
    for raw in text.splitlines():
        line = raw.lstrip("# ").strip()
        if line.startswith("[[") or (line.startswith("[") and line.endswith("]")):
            section = line.strip("[]") + "."
        elif "=" in line and line.split("=", 1)[0].strip().isidentifier():
            keys.add(section + line.split("=", 1)[0].strip())
    return keys


def test_the_shipped_config_survives_the_trip_to_a_worker_and_the_page():
    """Worker processes and the review page's process rebuild the config from its JSON dump;
    every value (the shipped `token = ""` included) must come back as it was."""
    config = load_config(SHIPPED)
    assert config.web.token == ""
    assert Config.model_validate(config.model_dump(mode="json")) == config


def test_shipped_config_documents_every_option():
    text = SHIPPED.read_text()
    keys = _documented_keys(text)
    fields = _fields(Config) - {"pipeline.stages"}
    missing = {f for f in fields if f not in keys and not any(k.startswith(f"{f}.") for k in keys)}
    assert not missing, f"config.toml does not document {sorted(missing)}"
    assert {t["kind"] for t in tomllib.loads(text)["pipeline"]["stages"]} <= set(STAGES)
    for kind in STAGES:  # every stage's options, set or shown commented out
        options = {f"pipeline.stages.{name}" for name in STAGES[kind].Options.model_fields}
        assert not options - keys, f"config.toml does not document {sorted(options - keys)}"


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("[processing]\ndevise = 'cpu'\n", "cfg.toml: processing.devise: unknown key"),
        ("[processing]\ndevice = 'gpu'\n", "cfg.toml: processing.device: must be auto, cpu"),
        ("[processing]\ndevice = 'vulkan:x'\n", "cfg.toml: processing.device: must be auto, cpu"),
        ("[image]\nquality = 101\n", "cfg.toml: image.quality: Input should be less than or equal"),
        ("[image]\nmax_pixels = 'many'\n", "cfg.toml: image.max_pixels: Input should be a valid"),
        (
            "[[pipeline.stages]]\nkind = 'sharpen'\n",
            "cfg.toml: pipeline.stages[0].kind: unknown stage 'sharpen'",
        ),
        ("[[pipeline.stages]]\nscale = 2\n", "cfg.toml: pipeline.stages[0].kind: missing"),
        (
            "[[pipeline.stages]]\nkind = 'upscale'\ntile = 8\n",
            "cfg.toml: pipeline.stages[0].tile: must be 0 (whole image) or at least 32",
        ),
        (
            "[[pipeline.stages]]\nkind = 'upscale'\ncolour = 1\n",
            "cfg.toml: pipeline.stages[0].colour: unknown option",
        ),
        (
            "[[pipeline.stages]]\nkind = 'upscale'\n"
            "[[pipeline.stages]]\nkind = 'upscale'\nscale = 99\n",
            "cfg.toml: pipeline.stages[1].scale: Input should be less than or equal to 8",
        ),
        ("[image\n", "cfg.toml: not valid TOML"),
    ],
)
def test_each_mistake_is_reported_with_file_and_key_path(tmp_path, toml, line):
    path = tmp_path / "cfg.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = [p.replace(str(path), "cfg.toml") for p in caught.value.problems]
    assert any(p.startswith(line) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_all_mistakes_are_reported_at_once():
    data = {
        "processing": {"device": "gpu", "seed": "x"},
        "pipeline": {"stages": [{"kind": "upscale", "tile": 8}, {"kind": "nope"}]},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="c.toml")
    assert len(caught.value.problems) == 4


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_config_is_frozen():
    config = Config()
    with pytest.raises(Exception, match="frozen"):
        config.processing.device = "cpu"  # type: ignore[misc]


def test_shipped_presets_are_the_built_in_ones():
    shipped = tomllib.loads(SHIPPED.read_text())["presets"]
    assert {name: tuple(stages) for name, stages in shipped.items()} == PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_chain_in_a_sensible_order(name):
    chain = Config().chain(name)
    kinds = [stage.name for stage in chain.stages]
    assert kinds[-1] == "upscale"
    assert ("face" in kinds) == (name != "archival")  # archival generates no faces


def test_an_unknown_preset_is_one_line_naming_it(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("[pipeline]\npreset = 'museum'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: pipeline.preset: unknown preset 'museum' "
        "(one of archival, creative, crisp, family)"
    ]


def test_a_mistake_in_a_preset_names_its_key_path(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("[[presets.mine]]\nkind = 'upscale'\n[[presets.mine]]\nkind = 'denoise'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: presets.mine[1].kind: 'denoise' after 'upscale' (stage 0): put 'denoise' "
        "first; stages after an upscale would work on many more pixels and on invented detail"
    ]


def test_a_user_preset_is_selectable():
    config = parse_config({"presets": {"quick": [{"kind": "upscale", "scale": 2}]}})
    assert [s.options.scale for s in config.chain("quick").stages] == [2]


def test_several_workers_share_the_cores_unless_threads_are_set(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    config = load_config(SHIPPED)

    def threads(workers: int, threads: int) -> int:
        data = config.model_dump(mode="json")
        data["daemon"]["workers"], data["processing"]["threads"] = workers, threads
        return worker_threads(Config.model_validate(data))

    assert threads(1, 0) == 0  # one worker: the engines take every core
    assert (threads(2, 0), threads(3, 0), threads(4, 0), threads(8, 0)) == (3, 2, 1, 1)
    assert threads(2, 5) == threads(1, 5) == 5  # set by hand: as set
