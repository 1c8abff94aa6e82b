"""What a saved model tells the world: its model card (README.md, the HF format), and pushing it to the hub.

Every stage that saves a model (sft, reward, ppo) writes a card stating the base model, the lineage
(SFT -> reward -> PPO), the resolved config and the headline metrics; with `push_to_hub` it then uploads
the folder. A push that fails (no network, no token) is one line, after everything is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rlft import hub
from rlft.config import option, require, to_dict
from rlft.errors import RlftError
from rlft.models import HUB_IDS

# Not part of a published model: training state, logs, and our own bookkeeping.
NOT_PUBLISHED = ["checkpoints/**", "tensorboard/**", "merged/**", ".*", "eval_before.json"]


@dataclass
class Publishing:
    """The hub options every model-saving stage takes, under the HF Trainer's names."""

    push_to_hub: bool = option(False, "Upload the saved model (with its tokenizer and model card) when the run ends.")
    hub_model_id: str = option("", "Hub repo to push to, e.g. you/smollm2-sft; needed with push_to_hub.")
    hub_private: bool = option(True, "Create the hub repo private.")

    def __post_init__(self):
        require(not self.push_to_hub or bool(self.hub_model_id), "hub_model_id",
                "push_to_hub needs a repo name, e.g. hub_model_id=you/my-model")


def write_model_card(folder: str | Path, *, title: str, base_model: str, lineage: list[str], config,
                     metrics: dict, tags: list[str], library: str = "peft", pipeline_tag: str = "text-generation"):
    """README.md in `folder`: metadata HF reads (base model, library, tags), then lineage, metrics, config."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = HUB_IDS.get(base_model, base_model)
    data = ModelCardData(base_model=base_model, library_name=library, tags=["rlft", *tags], pipeline_tag=pipeline_tag)
    rows = "".join(f"| {key} | {_number(value)} |\n" for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool))
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {title}\n\nTrained with rlft on the base model `{base_model}`.\n\n"
        "## Lineage\n\n"
        + " -> ".join(f"`{step}`" for step in lineage)
        + f"\n\n## Headline metrics\n\n| metric | value |\n|---|---|\n{rows}\n"
        f"## Config\n\n```yaml\n{yaml.safe_dump(to_dict(config), sort_keys=False)}```\n"
    )
    ModelCard(content).save(Path(folder) / "README.md")


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push(folder: str | Path, options: Publishing) -> None:
    """Upload `folder` to options.hub_model_id when push_to_hub is on; one line if it cannot."""
    if not options.push_to_hub:
        return

    later = f"the model is saved in '{folder}': push it later with `hf upload {options.hub_model_id} {folder}`"
    if hub.offline():
        raise RlftError(f"cannot push to the hub repo '{options.hub_model_id}': the hub is unreachable (offline); {later}")
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(options.hub_model_id, private=options.hub_private, exist_ok=True)
        upload_folder(repo_id=options.hub_model_id, folder_path=str(folder), ignore_patterns=NOT_PUBLISHED)
    except Exception as e:  # network, auth and permission errors come in many types
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RlftError(f"could not push to the hub repo '{options.hub_model_id}' ({said}); {later}") from None
