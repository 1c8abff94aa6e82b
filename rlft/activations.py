"""What a model's decoder layer keeps for its backward, per token: measured by running it on fake tensors.

A count by hand (Korthikanti et al. 2022's 34 bytes per token and hidden unit) misses what a real forward keeps
beyond the textbook layer: peft's float32 copy of every adapted linear's input (and dropout's), the RMSNorm's
float32 upcast, rotary embeddings' copies, a GQA model's repeated keys and values, an MoE's routing. Instead the
planned model (every module, the adapters as training adds them, no weights) runs one short forward with
autograd on torch's FakeTensorMode, which computes shapes and dtypes but no numbers and allocates nothing; a
dispatch mode adds up the bytes of every tensor the ops create and subtracts them as they are freed. What is
still alive after the last decoder layer, less what was alive before the first, is what the layers keep for the
backward.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

PROBE_TOKENS = 64  # tokens of the one row the forward runs: the per-token figure is the same at any length


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by ops inside it and still alive (`live`). Storages made before it
    (weights, inputs: `ignore`) are not counted, nor views of them."""

    def __init__(self):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.live = 0

    def ignore(self, tensors) -> None:
        for tensor in tensors:
            self.sizes[tensor.untyped_storage()] = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self.sizes:
                    self.sizes[storage] = size = storage.nbytes()
                    weakref.finalize(storage, self._freed, size)
                    self.live += size
        return out


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of repeated blocks: its longest ModuleList (Llama's model.layers, BERT's encoder.layer)."""
    return max((module for module in model.modules() if isinstance(module, torch.nn.ModuleList)), key=len)


def bytes_per_token_layer(model, dtype: torch.dtype, upcast_unquantized: bool = False) -> float:
    """Bytes one decoder layer of `model` keeps for the backward per token of a training forward.

    model: a model built on the meta device (rlft.models.empty_model), with any adapters as training adds them;
    it is moved onto fake CPU tensors in place. dtype: the base's compute dtype (adapters stay float32, as peft
    keeps them; a model trained in full is all `dtype`). upcast_unquantized: a QLoRA base (peft's
    prepare_model_for_kbit_training makes every weight bitsandbytes does not quantize float32: norms, embeddings,
    the head; the quantized linears compute in `dtype`).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    adapted = not all(parameter.requires_grad for parameter in model.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with fake:
        model.to_empty(device="cpu")
        for module in model.modules():
            quantized = isinstance(module, torch.nn.Linear) and module is not head
            for name, parameter in module.named_parameters(recurse=False):
                if adapted and parameter.requires_grad:  # an adapter's: float32, as peft keeps it
                    continue
                upcast = upcast_unquantized and not (quantized and name == "weight")
                parameter.data = parameter.data.to(torch.float32 if upcast else dtype)
        return kept_per_token_layer(model, torch.zeros(1, PROBE_TOKENS, dtype=torch.long))


def kept_per_token_layer(model, input_ids: torch.Tensor) -> float:
    """Bytes per token and layer alive after a training forward of `input_ids` (rows, tokens) through the model's
    decoder layers, less what was alive before the first: what the layers keep for the backward. Real or fake
    tensors alike (a test runs both)."""
    layers = decoder_layers(model)
    live = LiveBytes()
    # A padded first position, as in batched training rows: attention then takes a padded batch's path (an
    # all-ones mask lets SDPA skip it, and share a GQA model's key and value heads without repeating them)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 0] = 0
    marks = {}  # live bytes before the first layer and after the last

    def before(module, args):  # hooks return None: a value would replace the layer's input or output
        marks.setdefault("before", live.live)

    def after(module, args, output):
        marks["after"] = live.live

    live.ignore([*model.parameters(), *model.buffers(), input_ids, attention_mask])
    first, last = layers[0].register_forward_pre_hook(before), layers[-1].register_forward_hook(after)
    was_training = model.training
    model.train()
    try:
        with live, torch.enable_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        first.remove()
        last.remove()
        model.train(was_training)
    return (marks["after"] - marks["before"]) / (len(layers) * input_ids.numel())
