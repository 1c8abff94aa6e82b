"""Tiny offline models for tests: a word-level chat tokenizer and randomly initialised Llama / BERT models.

Everything is built in-process from configs, saved to a folder, and then loaded by path exactly as a
user's model would be, so the CLI stages run on them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "system user assistant you are a helpful bot hello hi how what is the of to and in it i my your "
    "yes no good bad great happy sad love hate cat dog sun rain day night today tomorrow please thanks "
    "tell me about story joke why because can do not very much more less one two three four five "
    "red blue green big small fast slow up down left right . , ? !"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer():
    """Word-level tokenizer over a small vocabulary, with a ChatML-like template; pad != eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.add_special_tokens(SPECIAL)  # matched whole, before pre-tokenization
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_causal_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
        # HF's default 0.02 gives a 32-wide model near-uniform logits that no LoRA can sharpen
        # (the tied head is frozen); 0.2 lets a toy policy actually learn within a test.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def save_tiny_causal_lm(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    folder = Path(folder)
    tokenizer = build_tokenizer()
    build_causal_lm(tokenizer, seed, hidden).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_sequence_classifier(tokenizer, seed: int = 0, hidden: int = 32):
    """A tiny BERT with one output: a reward model backbone."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(config)


def save_tiny_reward_backbone(folder: Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tokenizer = build_tokenizer()
    build_sequence_classifier(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
