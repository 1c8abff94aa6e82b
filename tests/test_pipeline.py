"""`rlft pipeline` end to end on tiny models: every stage runs, is wired to the previous, and is reused on rerun."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from rlft.cli import main
from rlft.errors import RlftError

POSITIVE = {"good", "great", "happy", "love", "yes", "thanks"}
ROWS = [("hello how are you ?", "i am good , thanks !"), ("tell me a story", "the cat and the dog love the sun"),
        ("what is the day", "today is a great day"), ("do you hate rain", "no , i love rain and night"),
        ("tell me about you", "i am a helpful bot"), ("how is the night", "the night is slow and sad")] * 6


def positivity(prompts, completions):
    """Rule judge for the tiny vocabulary: share of positive words."""
    return [sum(w in POSITIVE for w in c.split()) / max(len(c.split()), 1) for c in completions]


def tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path) -> list[str]:
    """Every stage of the pipeline on the tiny models and a tiny dialog file, in seconds."""
    data = tmp_path / "dialogs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "completion": [{"role": "assistant", "content": c}]}) + "\n" for p, c in ROWS))
    judge = "[{kind: function, path: 'tests.test_pipeline:positivity'}]"
    return [
        f"sft.model.name_or_path={tiny_lm_dir}", f"sft.data.path={data}", "sft.data.eval_fraction=0.2",
        "preferences.data.eval_fraction=0.2", "ppo.data.eval_fraction=0.2", "eval.data.eval_fraction=0.2",
        "sft.lora.r=8", "sft.train.learning_rate=5e-3", "sft.train.epochs=2", "sft.num_samples=0",
        f"preferences.data.path={data}", "preferences.num_samples=4", "preferences.sampling.max_new_tokens=8",
        f"preferences.judge={judge}",
        f"reward.model.name_or_path={tiny_reward_dir}", "reward.data.eval_fraction=0.2", "reward.train.epochs=2",
        "reward.train.learning_rate=1e-3", "reward.data.eval_split=",
        f"ppo.data.path={data}", "ppo.ppo.steps=4", "ppo.ppo.rollout_batch_size=8", "ppo.ppo.mini_batch_size=8",
        "ppo.sampling.max_new_tokens=8", "ppo.save_every=2", "ppo.lora.r=8", "ppo.ppo.kl_budget=1e9",
        f"eval.data.path={data}", "eval.num_prompts=8", "eval.sampling.max_new_tokens=8",
    ]


def test_pipeline_runs_every_stage_then_reuses_them(tiny_lm_dir, tiny_reward_dir, tmp_path, capsys, caplog):
    out = tmp_path / "quick"
    args = ["pipeline", f"output_dir={out}", *tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    for stage in ("sft", "preferences", "reward", "ppo"):
        assert (out / stage / "metrics.json").is_file(), stage
    assert (out / "preferences" / "pairs.jsonl").read_text().strip()
    report = json.loads((out / "eval" / "report.json").read_text())
    labels = [policy["label"] for policy in report["policies"]]
    assert len(labels) == 2 and report["gold"] == "gold" and report["proxy"] == "proxy"
    assert set(report["policies"][1]["rewards"]) == {"proxy", "gold"}
    assert len(report["checkpoints"]) == 2  # ppo steps 2 and 4, for the over-optimisation plot
    assert report["policies"][1]["reference_adapter"] == str(out / "sft")  # PPO's reference is the SFT model
    assert (out / "eval" / "report.html").is_file()

    timings = json.loads((out / "pipeline.json").read_text())["stage_wall_time_s"]
    assert set(timings) == {"sft", "preferences", "reward", "ppo", "eval"}
    stamps = {stage: (out / stage / "metrics.json").stat().st_mtime_ns for stage in ("sft", "reward", "ppo")}
    with caplog.at_level(logging.INFO, logger="rlft.pipeline"):
        assert main(args) == 0
    assert caplog.text.count("already complete") == 4  # sft, preferences, reward, ppo; eval re-renders
    rerun = json.loads((out / "pipeline.json").read_text())["stage_wall_time_s"]
    assert {k: rerun[k] for k in ("sft", "ppo")} == {k: timings[k] for k in ("sft", "ppo")}  # from the first run
    assert stamps == {stage: (out / stage / "metrics.json").stat().st_mtime_ns for stage in stamps}

    # a finished stage of another config is never taken for this one's
    assert main([*args, "ppo.ppo.learning_rate=1e-5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "[ppo]" in error and "another config (ppo.learning_rate: 0.0007 -> 1e-05)" in error, error

    # a variant of the PPO stage on the same SFT and reward models: it trains only its own PPO policy
    variant = tmp_path / "rloo"
    assert main([*args, f"output_dir={variant}", f"reuse_from={out}", "stages=[sft,preferences,reward,ppo]",
                 "ppo.ppo.advantage_estimator=rloo", "ppo.ppo.num_generations=2"]) == 0
    assert sorted(p.name for p in variant.iterdir() if p.is_dir()) == ["ppo"]
    ppo_config = (variant / "ppo" / "config.yaml").read_text()
    assert f"sft_adapter: {out / 'sft'}" in ppo_config and f"path: {out / 'reward'}" in ppo_config
    assert stamps == {stage: (out / stage / "metrics.json").stat().st_mtime_ns for stage in stamps}

    # DPO on the same SFT model and pairs, reported against the SFT model with the same proxy and gold
    dpo = tmp_path / "dpo"
    assert main([*args, f"output_dir={dpo}", f"reuse_from={out}", "stages=[sft,preferences,reward,dpo,eval]",
                 "dpo.train.max_steps=4", "dpo.train.batch_size=4", "dpo.lora.r=8", "dpo.data.eval_fraction=0.2",
                 "report_sft=false"]) == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in dpo.iterdir() if p.is_dir()) == ["dpo", "eval"]
    report = json.loads((dpo / "eval" / "report.json").read_text())
    assert [Path(policy["path"]).name for policy in report["policies"]] == ["dpo"] and report["checkpoints"] == []
    assert report["policies"][0]["reference_adapter"] == str(out / "sft")  # the SFT model, as PPO's
    assert set(report["policies"][0]["rewards"]) == {"proxy", "gold"}
    assert f"path: {out / 'preferences' / 'pairs.jsonl'}" in (dpo / "dpo" / "config.yaml").read_text()
    assert stamps == {stage: (out / stage / "metrics.json").stat().st_mtime_ns for stage in stamps}

    # one base: a LoRA reward model on the SFT model's base is trained on the SFT model and scored by PPO on
    # its own weights (kind: adapter), next to an adapter critic; SFT and pairs come from the first pipeline
    one_base = tmp_path / "one_base"
    assert main([*args, f"output_dir={one_base}", f"reuse_from={out}", "reuse_stages=[sft,preferences]",
                 f"reward.model.name_or_path={tiny_lm_dir}", "reward.lora_enabled=true", "reward.lora.r=4",
                 "ppo.ppo.critic=adapter"]) == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in one_base.iterdir() if p.is_dir()) == ["eval", "ppo", "reward"]
    from rlft.policy import adapter_info

    assert adapter_info(one_base / "reward")[1] == str(out / "sft")
    assert "kind: adapter" in (one_base / "ppo" / "config.yaml").read_text()
    # a variant of that one reuses its reward model, and the SFT model and pairs from where it took them
    head = tmp_path / "one_base_head"
    assert main([*args, f"output_dir={head}", f"reuse_from={one_base}", "stages=[sft,preferences,reward,ppo]",
                 f"reward.model.name_or_path={tiny_lm_dir}", "reward.lora_enabled=true", "reward.lora.r=4"]) == 0
    assert sorted(p.name for p in head.iterdir() if p.is_dir()) == ["ppo"]
    ppo_config = (head / "ppo" / "config.yaml").read_text()
    assert f"sft_adapter: {out / 'sft'}" in ppo_config and f"path: {one_base / 'reward'}" in ppo_config

    # the first pipeline's folder moved elsewhere whole: its finished stages are still its own, and its report
    # still finds each policy's reference
    moved = tmp_path / "elsewhere" / "quick"
    moved.parent.mkdir()
    shutil.move(out, moved)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlft.pipeline"):
        assert main([*args, f"output_dir={moved}"]) == 0, capsys.readouterr().err[-2000:]
    assert caplog.text.count("already complete") == 4
    report = json.loads((moved / "eval" / "report.json").read_text())
    assert report["policies"][1]["reference_adapter"] == str(moved / "sft")


def test_a_moved_pipeline_resumes_its_unfinished_stage(tiny_lm_dir, tiny_reward_dir, tmp_path, monkeypatch, caplog):
    """Ctrl-C mid-PPO, then the pipeline folder moved whole: the rerun there reuses the finished stages and resumes
    PPO's checkpoint, whose saved SFT adapter and reward model paths moved with it."""
    from rlft.ppo import train

    out = tmp_path / "quick"
    args = ["pipeline", *tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path), "ppo.save_every=1"]
    step = train.ppo_step

    def stopped(ppo, index):  # Ctrl-C during the third step, its second checkpoint saved
        if index == 2:
            raise KeyboardInterrupt
        return step(ppo, index)
    monkeypatch.setattr(train, "ppo_step", stopped)
    assert main([*args, f"output_dir={out}"]) == 130
    monkeypatch.undo()
    moved = tmp_path / "elsewhere" / "quick"
    moved.parent.mkdir()
    shutil.move(out, moved)
    with caplog.at_level(logging.INFO):
        assert main([*args, f"output_dir={moved}"]) == 0
    assert caplog.text.count("already complete") == 3  # sft, preferences, reward
    assert f"resumed from {moved / 'ppo' / 'checkpoints' / 'step-000002'} (step 2)" in caplog.text
    assert (moved / "ppo" / "metrics.json").is_file()


def test_one_seed_reaches_every_stage():
    from rlft.config import load_config
    from rlft.pipeline import PipelineConfig, wire

    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    stages = wire(load_config(PipelineConfig, quickstart, ["seed=7", "sft.seed=1", "ppo.seed=2"]))
    assert {name: stage.seed for name, stage in stages.items()} == dict.fromkeys(stages, 7)


@pytest.mark.parametrize("override", ["ppo.data.eval_fraction=0.1", "eval.data.eval_fraction=0.3",
                                      "preferences.data.eval_split=test"])
def test_one_hold_out_for_every_stage(override):
    """A stage on SFT's dataset with another hold-out would report trained prompts as held out: refused."""
    from rlft.config import load_config
    from rlft.pipeline import PipelineConfig, wire

    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    key = override.split("=")[0]
    with pytest.raises(RlftError, match=rf"{key}=.* but sft\.data\.{key.split('.')[-1]}="):
        wire(load_config(PipelineConfig, quickstart, [override]))
    setting = override.split(".", 1)[1]
    wire(load_config(PipelineConfig, quickstart, [f"{stage}.{setting}" for stage in ("sft", "preferences", "ppo", "eval")]))
    wire(load_config(PipelineConfig, quickstart, [override, f"{key.split('.')[0]}.data.path=elsewhere.jsonl"]))



@pytest.mark.parametrize("key", ["temperature=0.9", "min_new_tokens=2"])
def test_eval_samples_as_ppo_sampled(key):
    """The report measures PPO's policy as PPO sampled it: another temperature or length floor is refused."""
    from rlft.config import load_config
    from rlft.pipeline import PipelineConfig, wire

    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    name = key.split("=")[0]
    with pytest.raises(RlftError, match=rf"eval\.sampling\.{name}=.* but ppo\.sampling\.{name}="):
        wire(load_config(PipelineConfig, quickstart, [f"eval.sampling.{key}"]))
    wire(load_config(PipelineConfig, quickstart, [f"eval.sampling.{key}", f"ppo.sampling.{key}"]))
    wire(load_config(PipelineConfig, quickstart, [f"eval.sampling.{key}", "stages=[sft,preferences,reward,eval]"]))

def test_a_pipeline_without_sft_or_reward_stages_trains_on_its_own_reward_functions():
    """configs/quickstart_verifiable.yaml: PPO from the base on reward functions, the report scored by the config's
    own scorers; the first quickstart keeps its trained reward model and SFT adapter."""
    from rlft.config import load_config
    from rlft.pipeline import PipelineConfig, wire

    configs = Path(__file__).parents[1] / "configs"
    verifiable = load_config(PipelineConfig, configs / "quickstart_verifiable.yaml")
    stages = wire(verifiable)
    accuracy = "reward_models.verifiable:accuracy"
    assert [(s.name, s.kind, s.path) for s in stages["ppo"].reward] == [("accuracy", "function", accuracy)]
    assert stages["ppo"].sft_adapter == "" and stages["ppo"].model.chat_template == "chatml"
    assert [(s.name, s.path) for s in stages["eval"].scorers] == [("accuracy", accuracy), ("gold", accuracy)]
    assert stages["eval"].gold_scorer == "gold"
    assert stages["eval"].policies == [str(Path(verifiable.output_dir) / "ppo")]
    assert stages["eval"].sampling.temperature == stages["ppo"].sampling.temperature  # accuracy as PPO samples

    quickstart = load_config(PipelineConfig, configs / "quickstart.yaml")
    stages = wire(quickstart)
    assert [(s.name, s.kind) for s in stages["ppo"].reward] == [("proxy", "model")]
    assert stages["ppo"].reward[0].path == str(Path(quickstart.output_dir) / "reward")
    assert stages["ppo"].sft_adapter == str(Path(quickstart.output_dir) / "sft")
    assert [s.name for s in stages["eval"].scorers] == ["proxy", "gold"]

    # PPO and eval on one dataset hold out one split even when no SFT stage sets it
    with pytest.raises(RlftError, match=r"eval\.data\.eval_fraction=0\.3 but ppo\.data\.eval_fraction=0\.2"):
        wire(load_config(PipelineConfig, configs / "quickstart_verifiable.yaml", ["eval.data.eval_fraction=0.3"]))


def test_a_reward_function_pipeline_runs_ppo_and_eval_alone(tiny_lm_dir, tmp_path, capsys):
    """stages [ppo, eval] on the built-in arithmetic problems: no SFT, pairs or reward model are made, and the
    report's gold is the held-out accuracy of PPO's policy and of its reference, the base."""
    out = tmp_path / "verifiable"
    config = Path(__file__).parents[1] / "configs" / "quickstart_verifiable.yaml"
    assert main(["pipeline", "--config", str(config), f"output_dir={out}", f"ppo.model.name_or_path={tiny_lm_dir}",
                 "ppo.model.chat_template=", "ppo.ppo.steps=2", "ppo.ppo.rollout_batch_size=16",
                 "ppo.ppo.mini_batch_size=16", "ppo.ppo.forward_batch_size=16", "ppo.sampling.max_new_tokens=4",
                 "ppo.ppo.kl_budget=1e9", "eval.num_prompts=16", "eval.batch_size=16",
                 "eval.sampling.max_new_tokens=4"]) == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["eval", "ppo"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["gold"] == "gold" and report["proxy"] == "accuracy"
    policy = report["policies"][0]
    assert set(policy["rewards"]) == {"accuracy", "gold"}
    assert policy["reference_adapter"] in ("", None)  # the reference is the base itself


def test_seed_sweep_tables_seeds_and_repeats_a_seed_exactly(tiny_lm_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """The sweep's table holds each run's figures; the same seed and thread count twice gives the same report."""
    from examples.quickstart import seed_sweep

    overrides = tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("before\n%s\nold table\n%s\nafter\n%s\nold headline\n%s\n" % (*seed_sweep.MARKERS,
                                                                                 *seed_sweep.HEADLINE))
    sweep = seed_sweep.main(["--runs", "0:1", "1:1", "--out", str(tmp_path / "a"), "--table", str(tmp_path / "t"),
                             "--readme", str(readme), "--headline", str(readme), "--", *overrides])
    assert [(r["seed"], r["threads"]) for r in sweep["runs"]] == [(0, 1), (1, 1)]
    table = (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text()) == sweep and "| mean ± std |" in table
    assert "seed 0 on 1 thread, seed 1 on 1 thread" in table and table in readme.read_text()
    assert "old table" not in readme.read_text() and "old headline" not in readme.read_text()
    assert "Over 2 quickstart runs (seeds 0, 1; 1 threads" in readme.read_text()
    win_rates = [r["proxy_win_rate"] for r in sweep["runs"]]
    assert sweep["summary"]["proxy_win_rate"]["mean"] == pytest.approx(sum(win_rates) / 2)
    assert all("on >= 200 held-out prompts" in r["bars_missed"] for r in sweep["runs"])  # 8 prompts here

    again = seed_sweep.main(["--runs", "0:1", "--out", str(tmp_path / "b"), "--table", str(tmp_path / "u"),
                             "--readme", "", "--headline", "", "--", *overrides])
    first, second = (json.loads((tmp_path / side / "seed0_threads1" / "eval" / "report.json").read_text())
                     for side in ("a", "b"))
    for policy, repeat in zip(first["policies"] + first["checkpoints"], second["policies"] + second["checkpoints"]):
        assert policy["per_prompt"] == repeat["per_prompt"] and policy["samples"] == repeat["samples"]
    timed = ("folder", "wall_time_min", "stage_minutes")
    assert {k: v for k, v in again["runs"][0].items() if k not in timed} == {
        k: v for k, v in sweep["runs"][0].items() if k not in timed}

    # A run that has its report is read back, not rerun.
    monkeypatch.setattr(seed_sweep.subprocess, "run", lambda *a, **k: pytest.fail("reran a finished run"))
    reread = seed_sweep.main(["--runs", "1:1", "--out", str(tmp_path / "a"), "--table", str(tmp_path / "r"),
                              "--readme", "", "--headline", "", "--", *overrides])
    assert reread["runs"] == sweep["runs"][1:]


def test_reward_validation_splits_the_training_pairs_never_the_held_out(tiny_lm_dir, tiny_reward_dir, tmp_path):
    """examples/quickstart/reward_validation.py tunes on pairs the reward stage trains on: none of its
    validation prompts is one the stage holds out, and its two parts are exactly the stage's training pairs."""
    from examples.quickstart import reward_validation
    from rlft.config import load_config
    from rlft.data import load_splits, prompt_key
    from rlft.pipeline import PipelineConfig, wire

    out = tmp_path / "quick"
    assert main(["pipeline", f"output_dir={out}", "stages=[sft, preferences]",
                 *tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path)]) == 0
    table = reward_validation.main([str(out), "--variants", "", "train.epochs=1", "--table", str(tmp_path / "v")])
    assert list(table["variants"]) == ["", "train.epochs=1"] and (tmp_path / "v.md").is_file()

    stage = wire(load_config(PipelineConfig, out / "config.yaml"))["reward"]
    train, held_out, _ = load_splits(stage.data, ("preference",), stage.seed)
    validation_config = load_config(type(stage), out / "reward_validation" / "reward.yaml")
    fit, validation, _ = load_splits(validation_config.data, ("preference",), validation_config.seed)
    keys = lambda rows: [prompt_key(p) + json.dumps([rows[i]["chosen"], rows[i]["rejected"]])  # noqa: E731
                         for i, p in enumerate(rows["prompt"])]
    assert sorted(keys(fit) + keys(validation)) == sorted(keys(train))
    assert len(validation) > 0 and not {prompt_key(p) for p in validation["prompt"]} & {
        prompt_key(p) for p in held_out["prompt"]}
    run = table["variants"]["train.epochs=1"]["runs"][0]
    assert run["validation_pairs"] == len(validation) and run["train_pairs"] == len(fit)
