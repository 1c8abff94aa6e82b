import os

import pytest

# One thread: tiny models gain nothing from more, and OpenMP threads that share busy cores spin-wait
# (measured: the pipeline test took 180 s at 2 threads beside other work, 11 s at 1). Never touch the hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# float32 even on a CPU with bf16 units, so what a test measures does not depend on the machine; bf16 tests ask
# for model.dtype=bfloat16 themselves.
os.environ["RLFT_CPU_BF16"] = "0"

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


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Small data files for the CLI runs of the fault and option tests: sft.jsonl, prompts.jsonl, pairs.jsonl."""
    import json

    from tests.test_reward import write_marker_pairs

    words = "hello how are you tell me about the cat dog sun rain day night".split()
    folder = tmp_path_factory.mktemp("data")
    # Distinct prompts: a hold-out takes whole prompts, and its held-out rows should be learnable, not unseen.
    rows = [(f"{prompt} {'?' * i}", reply) for i in range(1, 7) for prompt, reply in [
        ("hello how are you", "i am good , thanks !"), ("tell me a joke", "why the cat ? because the dog !"),
        ("what is the sun", "the sun is big and red"), ("do you love rain", "yes i love rain and night")]]
    (folder / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": " " + c}) + "\n" for p, c in rows))
    prompts = [{"prompt": [{"role": "user", "content": " ".join(words[i % 7: i % 7 + 3] + [words[i // 7]])}]}
               for i in range(64)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    write_marker_pairs(folder / "pairs.jsonl", 48)
    return folder
