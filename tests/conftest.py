import os

import pytest

# One thread: tiny models gain nothing from more, and OpenMP threads that share busy cores spin-wait
# (measured: the pipeline test took 180 s at 2 threads beside other work, 11 s at 1). Never touch the hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny random Llama + word-level chat tokenizer, loadable by path."""
    return tiny.save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_lm_dir_64(tmp_path_factory):
    """Like tiny_lm_dir but 64 wide: bitsandbytes' 4-bit CPU kernels need rows of at least one 64-block."""
    return tiny.save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm_64"), hidden=64)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A saved tiny random BERT sequence classifier (one output) + the same tokenizer."""
    return tiny.save_tiny_reward_backbone(tmp_path_factory.mktemp("tiny_rm"))
