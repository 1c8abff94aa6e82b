"""rlft.activations: what a layer keeps for its backward, counted by hand on a toy and equal on fake and real
tensors for a Llama with LoRA."""

import copy

import torch
from torch import nn

from rlft.activations import bytes_per_token_layer, kept_per_token_layer
from rlft.config import LoraConfig, ModelConfig
from rlft.models import add_lora
from tests import tiny


class LinearStack(nn.Module):
    """An embedding and `layers` trainable d x d linears: each linear keeps its input for its weight's gradient."""

    def __init__(self, d: int = 8, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.sum()


def test_a_stack_of_linears_keeps_one_input_per_layer():
    # Alive before the first layer: the embedding's output (it is the first linear's input). After the last:
    # the first two linears' outputs (kept as the next ones' inputs) and the last one's output. So 3 new
    # tensors of d float32 per token over 3 layers: d x 4 = 32 bytes per token and layer.
    with torch.device("meta"):
        model = LinearStack(d=8, layers=3)
    assert bytes_per_token_layer(model, torch.float32) == 8 * 4
    with torch.device("meta"):
        model = LinearStack(d=8, layers=3)
    assert bytes_per_token_layer(model, torch.bfloat16) == 8 * 2  # trained in full: every weight bfloat16


def test_fake_tensors_count_what_a_real_forward_keeps():
    tokenizer = tiny.build_tokenizer()
    real = add_lora(tiny.build_causal_lm(tokenizer, hidden=64).to(torch.bfloat16), ModelConfig(),
                    LoraConfig(r=4, dropout=0.1))
    meta = copy.deepcopy(real).to("meta")
    input_ids = torch.randint(0, len(tokenizer), (1, 64))
    kept = kept_per_token_layer(real, input_ids)
    # peft's float32 copy of each adapted linear's input alone is more than the bfloat16 layer keeps of its own
    assert kept > 4 * (6 * 64 + 128)
    assert bytes_per_token_layer(meta, torch.bfloat16) == kept
