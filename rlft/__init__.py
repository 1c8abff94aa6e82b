"""rlft: KL-constrained fine-tuning of causal language models (SFT, reward model, PPO, reports)."""

__version__ = "0.1.0"
