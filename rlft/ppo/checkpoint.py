"""Atomic PPO checkpoints: everything needed to continue a run exactly.

checkpoints/step-000010/
    policy/            the PPO adapter (PeftModel.save_pretrained + rlft_adapter.json): loadable on its own
    value_head.pt      critic head weights (gae only: the other estimators train no critic)
    critic/            the critic's LoRA adapter (ppo.critic=adapter only)
    trainer_state.pt   optimiser, scheduler, KL controller, step, process count (tensors and numbers only)
    rng_state_<rank>.json  torch / numpy / python RNG of each process
checkpoints/candidate/ the latest policy between checkpoints that its rollout measured within ppo.kl_budget
    (policy/ and critic as above, candidate.json: its step and KL): what the result falls back to first
Nothing is unpickled on load: tensors go through torch.load(weights_only=True), the RNG states are JSON,
so a crafted checkpoint (they are shared and downloaded) cannot run code.
A checkpoint is built in a hidden staging folder and renamed into place, so a crash never leaves a
half-written one: every step-N folder is complete, and resuming continues the newest, which must still hold
every file above (one lost since is refused in one line, never skipped). Only the newest `keep` hold the
resumable state; older ones keep their adapter for rlft eval's reward-vs-KL view across checkpoints.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlft.config import ModelConfig
from rlft.distributed import full_state_dict, is_sharded
from rlft.errors import RlftError
from rlft.policy import adapter_state_dict, copy_adapter, save_adapter
from rlft.ppo.model import CRITIC
from rlft.runs import read_json, reading, unsafe_checkpoint, write_json

STEP_DIR = re.compile(r"^step-(\d+)$")


def step_of(folder: Path) -> int | None:
    """N for a checkpoints/step-N folder (not the hidden .staging-step-N ones), else None."""
    match = STEP_DIR.match(Path(folder).name)
    return int(match[1]) if match else None


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint of a PPO run (checked whole: `check`), or None."""
    folder = run_dir / "checkpoints"
    found = [(step, p) for p in folder.iterdir() if (step := step_of(p)) is not None] if folder.is_dir() else []
    if not found:
        return None
    newest = max(found)[1]
    check(newest)
    return newest


FIX = "delete it to resume from the one before, or set resume=false"


def check(folder: Path) -> None:
    """Refuse, in one line and before the run writes anything, a checkpoint that cannot continue the run exactly:
    a file missing (without its RNG a process would resume on fresh random numbers), or one that does not parse
    (torn, edited, crafted to hold code): every file is read the way `load` will read it."""
    from safetensors import safe_open

    for name in ("policy/adapter_model.safetensors", "trainer_state.pt"):
        require(folder, name)
    processes = 1  # that saved it (checkpoints written before this was recorded: rank 0's RNG at least)
    for path in sorted(folder.rglob("*")):
        try:
            with reading(path, FIX):
                if path.suffix == ".safetensors":
                    with safe_open(path, framework="pt") as weights:
                        weights.keys()
                elif path.suffix == ".pt":
                    state = torch.load(path, weights_only=True, map_location="cpu")
                    if path.name == "trainer_state.pt" and isinstance(state, dict):
                        processes = state.get("processes", 1)
                elif path.suffix == ".json":
                    read_json(path, FIX)
        except pickle.UnpicklingError as e:
            raise unsafe_checkpoint(folder, e) from None
    for rank in range(processes):  # each process saves its own RNG
        require(folder, f"rng_state_{rank}.json")


def require(folder: Path, name: str) -> None:
    if not (folder / name).is_file():
        raise RlftError(f"checkpoint '{folder}' has no {name}, so it cannot continue the run exactly: {FIX}")


def rng_state() -> dict:
    """Every RNG this process draws from, as JSON-ready lists."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [kind, key.tolist(), position, has_gauss, cached_gaussian],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(accelerator, run_dir: Path, step: int, actor_critic, trainer_state: dict,
         model_config: ModelConfig, reference_adapter: str | None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (all processes call this)."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    staging = folder / f".staging-step-{step:06d}"
    weights = trained_weights(actor_critic)  # every process: a gather under FSDP
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_json(staging / f"rng_state_{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:
        write_policy(staging / "policy", actor_critic.policy, weights, model_config, reference_adapter, staging)
        torch.save(trainer_state, staging / "trainer_state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        # Older checkpoints keep their adapter (eval's reward-vs-KL view reads every step) but lose the
        # resumable state, which is most of their size.
        for old in sorted(p for p in folder.iterdir() if step_of(p) is not None)[:-keep]:
            for heavy in [old / "trainer_state.pt", *old.glob("rng_state_*.json")]:
                heavy.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def replaced(folder: Path):
    """A staging folder to write `folder`'s new contents into, renamed into its place on success: a crash
    leaves either the old folder or the new one, never a mixture."""
    staging = folder.with_name(f".staging-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old)
    else:
        os.replace(staging, folder)


CANDIDATE = "candidate"  # checkpoints/candidate/: a result candidate between two checkpoints


def candidate_folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / CANDIDATE


def save_candidate(accelerator, run_dir: Path, step: int, kl: float, kl_upper: float, actor_critic,
                   model_config: ModelConfig, reference_adapter: str | None) -> None:
    """The policy after `step` updates, which its own rollout measured at `kl`, upper bound `kl_upper` (within the
    KL budget), kept as checkpoints/candidate/ (policy/ and critic laid out as a checkpoint's, and
    candidate.json) until a later one replaces it, atomically. Should the final policy be past the budget, the
    result may fall back to this one rather than to the last checkpoint, up to save_every steps earlier.
    All processes call this (a gather under FSDP)."""
    weights = trained_weights(actor_critic)
    if accelerator.is_main_process:
        with replaced(candidate_folder(run_dir)) as staging:
            write_policy(staging / "policy", actor_critic.policy, weights, model_config, reference_adapter, staging)
            write_json(staging / "candidate.json", {"step": step, "kl": kl, "kl_upper": kl_upper})
    accelerator.wait_for_everyone()


def drop_candidate(run_dir: Path) -> None:
    """A run starting over must not ship another run's candidate."""
    shutil.rmtree(candidate_folder(run_dir), ignore_errors=True)


def candidate(run_dir: Path) -> tuple[int, float, float] | None:
    """(step, KL, its 95% upper bound) of the run's result candidate, or None."""
    path = candidate_folder(run_dir) / "candidate.json"
    if not path.is_file():
        return None
    info = read_json(path)
    # a candidate an rlft before the upper bound kept: its mean is the best bound it has
    return int(info["step"]), float(info["kl"]), float(info.get("kl_upper", info["kl"]))


def result_folder(run_dir: Path, step: int) -> Path:
    """Where the policy of `step` is kept: its checkpoint, or the result candidate of that step."""
    found = candidate(run_dir)
    return candidate_folder(run_dir) if found and found[0] == step else folder_of(run_dir, step)


def copy_result(run_dir: Path, step: int, folder: Path) -> None:
    """The policy adapter (and critic, if any) of `step` (a checkpoint's or the candidate's) into `folder`, as
    write_policy lays them out."""
    source = result_folder(run_dir, step)
    copy_adapter(source / "policy", folder)
    if (source / "value_head.pt").is_file():
        shutil.copy2(source / "value_head.pt", folder / "value_head.pt")
    if (source / CRITIC).is_dir():
        shutil.copytree(source / CRITIC, folder / CRITIC, dirs_exist_ok=True)


def folder_of(run_dir: Path, step: int) -> Path:
    """The checkpoint folder of `step` in a PPO run."""
    return run_dir / "checkpoints" / f"step-{step:06d}"


def load_policy(folder: Path, policy) -> None:
    """A checkpoint folder's policy adapter into the live (unsharded) policy, which must hold every tensor of it:
    peft loads non-strictly, and an adapter saved for another layout (an rlft that did not yet adapt an MoE's
    fused experts) would leave the rest at their initial values, then fail in the optimizer's state."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(folder / "policy" / "adapter_model.safetensors")
    missing = sorted(set(get_peft_model_state_dict(policy)) - set(weights))
    if missing:
        raise RlftError(f"checkpoint '{folder}' has no weights for {len(missing)} of the policy adapter's tensors "
                        f"({missing[0]}, ...): it was saved for another adapter layout (by an older rlft?), so it "
                        "cannot continue this run: set resume=false to start over")
    set_peft_model_state_dict(policy, weights)


def trained_weights(actor_critic) -> tuple[dict, dict | None]:
    """(adapter weights of the peft policy by its state_dict names, value head weights or None), whole tensors
    on the CPU. Under FSDP every process must call it: the shards are gathered."""
    adapters = adapter_state_dict(actor_critic.policy)
    head = full_state_dict(actor_critic.value_head) if actor_critic.value_head is not None else None
    return adapters, head


def write_policy(folder: Path, policy, weights: tuple[dict, dict | None], model_config: ModelConfig,
                 reference_adapter: str | None, critic_folder: Path | None = None) -> None:
    """The policy adapter in `folder`, and the critic (value_head.pt, critic/ for an adapter critic) in
    `critic_folder` (default: the same folder)."""
    adapters, head = weights
    critic_folder = critic_folder or folder
    save_adapter(policy, folder, model_config, reference_adapter, state_dict=adapters)
    if head is not None:
        torch.save(head, critic_folder / "value_head.pt")
    if CRITIC in policy.peft_config:
        policy.save_pretrained(critic_folder, selected_adapters=[CRITIC], state_dict=adapters)


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state_dict; under FSDP gathered whole and keyed by parameter name (every process calls)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                        cpu_offload=True))


def load_optimizer(model, optimizer, state: dict) -> None:
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


def load(folder: Path, process_index: int, policy, value_head) -> dict:
    """Restore adapter and head weights and this process's RNG; return the trainer state. A damaged or
    incomplete checkpoint is one line: it says to delete it (resuming from the one before) or start over."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        if value_head is not None:  # the estimator's critic, known only now
            require(folder, "value_head.pt")
        if CRITIC in policy.peft_config:
            require(folder, f"{CRITIC}/adapter_model.safetensors")
        with reading(folder, FIX):
            load_policy(folder, policy)
            if value_head is not None:
                value_head.load_state_dict(torch.load(folder / "value_head.pt", weights_only=True))
            if CRITIC in policy.peft_config:
                set_peft_model_state_dict(policy, load_file(folder / CRITIC / "adapter_model.safetensors"), CRITIC)
            rng_file = folder / f"rng_state_{process_index}.json"
            if rng_file.is_file():  # resuming on more processes than saved it (`check`): fresh RNG for new ranks
                set_rng_state(read_json(rng_file, FIX))
            return torch.load(folder / "trainer_state.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe_checkpoint(folder, e) from None
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise RlftError(f"checkpoint '{folder}' is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                        f"{FIX}") from None
