"""Config loading: YAML + overrides, unknown keys and bad values refused with a suggestion, every shipped YAML valid."""

from pathlib import Path

import pytest

from rlft.cli import STAGES, main
import yaml

from rlft.config import ConfigError, from_dict, load_config, merged, read_yaml
from rlft.sft import SFTConfig

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("tiny/*.yaml")) + sorted((ROOT / "examples").glob("*/*.yaml"))


def test_yaml_then_overrides_later_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\ntrain:\n  learning_rate: 0.001\n")
    config = load_config(SFTConfig, path, ["lora.r=32", "train.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert config.lora.r == 32
    assert config.train.learning_rate == 1e-4  # "1e-4" is a string to YAML 1.1; still a float here
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.lora.alpha == 32  # untouched default


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rr=3", "unknown config key 'lora.rr'; did you mean 'lora.r'?"),
        ("trian.epochs=1", "did you mean 'train'?"),
        ("lora.r=0", "bad value for 'lora.r': must be a positive integer rank"),
        ("lora.r=abc", "bad value for 'lora.r': expected int"),
        ("model.quantization=4bits", "did you mean '4bit'?"),
        ("train.batch_size=2.5", "expected int"),
        ("lora", "not of the form key.sub=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, None, [override])
    assert message in str(error.value)


def test_missing_config_file_is_one_clear_line(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file" in err[0] and "not found" in err[0]


def test_extends_merges_sections_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("lora: {r: 8, alpha: 16}\ntrain: {learning_rate: 0.001, epochs: 2}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nlora: {r: 4}\n")
    config = load_config(SFTConfig, tmp_path / "variant.yaml", ["train.epochs=3"])
    assert (config.lora.r, config.lora.alpha) == (4, 16)  # r from the variant, alpha kept from its base
    assert (config.train.learning_rate, config.train.epochs) == (0.001, 3)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(SFTConfig, tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml' not found.*extended by"):
        load_config(SFTConfig, tmp_path / "orphan.yaml")


STAGE_OF = {"quickstart": "pipeline"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    """Each YAML in configs/ and examples/ names its stage as the file's prefix (sft_qlora.yaml -> sft)."""
    stage = path.stem.split("_")[0]
    stage = STAGE_OF.get(stage, stage)
    assert stage in STAGES, f"{path.name}: name it <stage>[_variant].yaml"
    import importlib

    module_name, class_name, _ = STAGES[stage]
    config_class = getattr(importlib.import_module(module_name), class_name)
    load_config(config_class, path)


def stated_keys(data: dict, prefix: tuple = ()) -> list[tuple]:
    """Every leaf key a YAML mapping states, as a path of keys (a list or an empty mapping is one leaf)."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += stated_keys(value, (*prefix, key))
        else:
            keys.append((*prefix, key))
    return keys


def without(data: dict, path: tuple) -> dict:
    head, *rest = path
    if not rest:
        return {k: v for k, v in data.items() if k != head}
    return {**data, head: without(data[head], tuple(rest))}


def needed(config_class, base: dict, own: dict, key: tuple, resolved) -> bool:
    """Whether the config resolves otherwise (or not at all) when `own` does not state `key`."""
    try:
        return from_dict(config_class, merged(base, without(own, key))) != resolved
    except ConfigError:
        return True


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.is_relative_to(CONFIGS)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_states_only_what_differs(path):
    """One source of defaults: a key a YAML under configs/ states that its dataclass (or the file it extends)
    already holds is a second copy of that default, free to drift from it. (examples/ holds templates for
    users' own models and data, which name the keys to edit.)"""
    import importlib

    stage = STAGE_OF.get(path.stem.split("_")[0], path.stem.split("_")[0])
    module_name, class_name, _ = STAGES[stage]
    config_class = getattr(importlib.import_module(module_name), class_name)
    own = yaml.safe_load(path.read_text()) or {}
    base = read_yaml(path.parent / own.pop("extends")) if "extends" in own else {}
    resolved = from_dict(config_class, merged(base, own))
    restated = [".".join(key) for key in stated_keys(own)
                if not needed(config_class, base, own, key, resolved)]
    assert not restated, f"{path.relative_to(ROOT)} restates what it would be anyway: {restated}"


def test_show_config_prints_the_resolved_values(capsys):
    assert main(["sft", "--show-config", "lora.r=4"]) == 0
    assert "r: 4" in capsys.readouterr().out


def test_ppo_defaults_are_the_tuned_config():
    """One source of defaults: `rlft ppo` and `rlft ppo --config configs/ppo.yaml` are the same run, and the
    quickstart's PPO stage is that run too (bar the paths the pipeline wires in, the quickstart's one
    hold-out of a fifth, and its length floor, beta floor and result scaling, set on its task's seeds)."""
    from dataclasses import replace

    from rlft.pipeline import PipelineConfig
    from rlft.ppo.config import PPOConfig

    defaults = load_config(PPOConfig)
    assert load_config(PPOConfig, CONFIGS / "ppo.yaml") == defaults
    quickstart = load_config(PipelineConfig, CONFIGS / "quickstart.yaml")
    assert replace(quickstart.ppo, data=replace(quickstart.ppo.data, eval_fraction=0.1),
                   sampling=replace(quickstart.ppo.sampling, min_new_tokens=0),
                   ppo=replace(quickstart.ppo.ppo, kl_coef_min=0.0, max_result_scale=0.0)) == defaults
    assert quickstart.ppo.data.eval_fraction == quickstart.sft.data.eval_fraction == 0.2
