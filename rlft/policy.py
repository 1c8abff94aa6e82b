"""A policy is a LoRA adapter over a frozen base; its reference is the same weights with the adapter off.

When a stage starts from an earlier adapter (PPO from SFT), that adapter is merged into the base first,
so "adapter disabled" means the SFT model, not the raw base, and there is still one copy of the weights.
Every adapter rlft saves carries `rlft_adapter.json` naming its base and reference adapter, so eval can
rebuild policy and reference from the folder alone.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rlft import runs
from rlft.config import ConfigError, ModelConfig, from_dict
from rlft.errors import RlftError
from rlft.models import load_model, load_tokenizer

ADAPTER_INFO = "rlft_adapter.json"


def save_adapter(model, folder: str | Path, model_config: ModelConfig, reference_adapter: str | None) -> None:
    """Save the active LoRA adapter (HF format, loadable with PeftModel.from_pretrained) and its lineage."""
    folder = Path(folder)
    model.save_pretrained(folder)
    info = {"base_model": asdict(model_config), "reference_adapter": reference_adapter}
    runs.write_json(folder / ADAPTER_INFO, info)


def load_reference(model_config: ModelConfig, reference_adapter: str | None, device=None):
    """The frozen reference model: the base, with an earlier stage's adapter merged in if given."""
    base = load_model(model_config, device=device)
    if not reference_adapter:
        return base
    from peft import PeftModel

    if not (Path(reference_adapter) / "adapter_config.json").is_file():
        raise RlftError(f"reference adapter '{reference_adapter}' not found: point it at an SFT output directory")
    merged = PeftModel.from_pretrained(base, reference_adapter).merge_and_unload()
    merged.requires_grad_(False)
    return merged


def adapter_info(folder: str | Path) -> tuple[ModelConfig, str | None]:
    folder = Path(folder)
    if not folder.is_dir():
        raise RlftError(f"policy '{folder}' not found: pass an SFT output directory or a PPO checkpoint")
    if not (folder / ADAPTER_INFO).is_file():
        raise RlftError(f"'{folder}' is not an rlft adapter (no {ADAPTER_INFO}): pass an SFT output dir or PPO checkpoint")
    info = runs.read_json(folder / ADAPTER_INFO)
    try:
        model_config = from_dict(ModelConfig, info["base_model"])
    except (ConfigError, KeyError) as e:
        raise RlftError(f"'{folder}/{ADAPTER_INFO}' is damaged: {e}") from None
    return model_config, info.get("reference_adapter")


def load_policy(folder: str | Path, device=None, trainable: bool = False):
    """(model, tokenizer, base ModelConfig) for a saved adapter; `model.disable_adapter()` gives its reference."""
    from peft import PeftModel

    model_config, reference_adapter = adapter_info(folder)
    reference = load_reference(model_config, reference_adapter, device)
    model = PeftModel.from_pretrained(reference, str(folder), is_trainable=trainable)
    return model, load_tokenizer(model_config), model_config
