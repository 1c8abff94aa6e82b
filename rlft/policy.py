"""A policy is a LoRA adapter over a frozen base; its reference is the same weights with the adapter off.

When a stage starts from an earlier adapter (PPO from SFT), that adapter is merged into the base first,
so "adapter disabled" means the SFT model, not the raw base, and there is still one copy of the weights.
Every adapter rlft saves carries `rlft_adapter.json` naming its base and reference adapter, so eval can
rebuild policy and reference from the folder alone.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from rlft import runs
from rlft.config import ConfigError, ModelConfig, from_dict
from rlft.distributed import full_state_dict
from rlft.errors import RlftError
from rlft.models import load_model, load_tokenizer

ADAPTER_INFO = "rlft_adapter.json"
# The base model fields an adapter's record is trusted for: which weights (and how quantized), and the template its
# prompts were rendered with.
RECORDED = ("name_or_path", "revision", "dtype", "quantization", "chat_template")


def save_adapter(model, folder: str | Path, model_config: ModelConfig, reference_adapter: str | None,
                 state_dict: dict | None = None) -> None:
    """Save the active LoRA adapter (HF format, loadable with PeftModel.from_pretrained) and its lineage; a PPO
    model also holds reward and critic adapters, which are not the policy's. `state_dict`: the model's
    weights gathered whole, where they are sharded (FSDP)."""
    folder = Path(folder)
    model.save_pretrained(folder, selected_adapters=[model.active_adapter], state_dict=state_dict)
    write_adapter_info(folder, model_config, reference_adapter)


def write_adapter_info(folder: Path, model_config: ModelConfig, reference_adapter: str | None) -> None:
    """rlft_adapter.json: the base, and the reference adapter twice: its absolute path (an adapter folder copied
    elsewhere alone still finds it) and its path relative to `folder` (a run folder moved whole, with its
    reference inside, still finds it)."""
    info = {"base_model": asdict(model_config), "reference_adapter": None}
    if reference_adapter:
        info["reference_adapter"] = str(Path(reference_adapter).resolve())
        info["reference_adapter_from_here"] = os.path.relpath(Path(reference_adapter).resolve(), folder.resolve())
    runs.write_json(folder / ADAPTER_INFO, info)


def copy_adapter(source: Path, destination: Path) -> None:
    """An adapter folder copied elsewhere, its record's reference path rewritten for the new place."""
    model_config, reference_adapter = adapter_info(source)
    shutil.copytree(source, destination, dirs_exist_ok=True)
    write_adapter_info(destination, model_config, reference_adapter)


def adapter_state_dict(model) -> dict:
    """The peft model's adapter weights (LoRA and modules_to_save, e.g. a score head) by state_dict name, whole
    tensors on the CPU: gathered from the shards under FSDP, so every process must call it."""

    return full_state_dict(model, keep=lambda name: "lora_" in name or "modules_to_save" in name)


def load_reference(model_config: ModelConfig, reference_adapter: str | None, device=None, **load_kwargs):
    """The frozen reference model: the base, with an earlier stage's adapter merged in if given.

    `load_kwargs` go to load_model: a reward model loads the same weights as a sequence classifier (its
    trunk's module names are the causal LM's, so an SFT adapter merges into either)."""
    if reference_adapter:
        check_adapter_base(reference_adapter, model_config)  # before minutes of loading
    base = load_model(model_config, device=device, **load_kwargs)
    if not reference_adapter:
        return base
    from peft import PeftConfig, PeftModel

    with runs.reading(reference_adapter, "rerun the stage that saved this adapter"):
        config = PeftConfig.from_pretrained(reference_adapter)
    config.task_type = None  # a plain PeftModel: the SFT adapter merges into a classifier of the same trunk too
    try:
        with runs.reading(reference_adapter, "rerun the stage that saved this adapter"):
            merged = PeftModel.from_pretrained(base, reference_adapter, config=config).merge_and_unload()
    except RuntimeError as e:  # size mismatch: an adapter for another architecture
        raise RlftError(f"adapter '{reference_adapter}' does not fit base model '{model_config.name_or_path}' "
                        f"({str(e).strip().splitlines()[-1].strip()[:160]}): use the base it was trained on") from None
    merged.requires_grad_(False)
    return merged


def check_adapter_base(folder: str | Path, model_config: ModelConfig) -> None:
    """Refuse an adapter that records another base: merged into the wrong weights, it is a wrong reference."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise RlftError(f"adapter '{folder}' not found (no adapter_config.json): point it at an SFT output directory")
    if not (folder / ADAPTER_INFO).is_file():
        return  # a plain peft adapter: only its shapes can be checked, when it loads
    trained_on, _ = adapter_info(folder)
    if (trained_on.name_or_path, trained_on.revision) != (model_config.name_or_path, model_config.revision):
        revision = f" (revision {trained_on.revision})" if trained_on.revision else ""
        raise RlftError(
            f"adapter '{folder}' was trained on base model '{trained_on.name_or_path}'{revision}, not "
            f"'{model_config.name_or_path}': set model.name_or_path={trained_on.name_or_path}, or use an adapter "
            "trained on this base"
        )


def adapter_info(folder: str | Path, trust_remote_code: bool = False) -> tuple[ModelConfig, str | None]:
    """The base ModelConfig and reference adapter an adapter folder records.

    `trust_remote_code` comes from the caller's (the user's) config, never from the file: a downloaded
    folder must not be able to switch on code execution.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RlftError(f"policy '{folder}' not found: pass an SFT output directory or a PPO checkpoint")
    if not (folder / ADAPTER_INFO).is_file():
        raise RlftError(f"'{folder}' is not an rlft adapter (no {ADAPTER_INFO}): pass an SFT output dir or PPO checkpoint")
    try:
        info = runs.read_json(folder / ADAPTER_INFO)
        # Only what names the weights and how prompts were rendered; the rest (attention kernel, checkpointing,
        # remote code) is the user's to choose, never a downloaded file's.
        recorded = {key: info["base_model"][key] for key in RECORDED if key in info["base_model"]}
        model_config = from_dict(ModelConfig, recorded)
        reference, from_here = info.get("reference_adapter"), info.get("reference_adapter_from_here")
        if not all(path is None or isinstance(path, str) for path in (reference, from_here)):
            raise TypeError("reference_adapter is not a path")
    except (ConfigError, KeyError, TypeError, ValueError, RlftError) as e:
        raise RlftError(f"'{folder}/{ADAPTER_INFO}' is damaged ({str(e).splitlines()[0][:160]}): rerun the stage that "
                        "saved this adapter") from None
    if from_here and (folder / from_here).is_dir():  # the run folder moved whole: the reference moved with it
        # absolute, whichever way the folder was named: one reference is one path (eval shares its samples by it)
        reference = str((folder / from_here).resolve())
    return replace(model_config, trust_remote_code=trust_remote_code), reference


def load_policy(folder: str | Path, device=None, trainable: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer, base ModelConfig) for a saved adapter; `model.disable_adapter()` gives its reference."""
    from peft import PeftModel

    model_config, reference_adapter = adapter_info(folder, trust_remote_code)
    reference = load_reference(model_config, reference_adapter, device)
    with runs.reading(folder, "rerun the stage that saved this adapter"):
        model = PeftModel.from_pretrained(reference, str(folder), is_trainable=trainable)
    return model, load_tokenizer(model_config), model_config


@contextmanager
def active_adapter(model, name: str | None):
    """Run the peft `model` with adapter `name` alone switched on (None: every adapter off, the reference).

    Switches the flags peft's forward reads and nothing else: peft's own set_adapter / disable_adapter also
    set requires_grad, freezing every adapter but one, and PPO trains two (policy and critic).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer in layers:
        if name is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter, layer._disable_adapters = [name], False
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled
