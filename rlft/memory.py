"""Memory of one process of a run, as arithmetic: parameter counts, shapes, rows and tokens in, bytes out.

`rlft plan` (rlft/plan.py) reads the numbers off the model built on the meta device and off the stage's config;
here they become bytes, part by part, so that a test can check every part by hand. A run's peak is what it
always holds plus the larger of two passing phases that never overlap: the forward passes (a training step's
gradients, activations and logits; eval's KL pass) and generation (the KV cache, the adapter merged into a copy
of its layers).

What the layers keep for the backward is measured, not counted: rlft.activations runs the planned model on fake
tensors. The constants a measurement of peak RSS tunes (benchmarks/plan_memory.py) are the first block below,
and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

MIB = 2**20

# --- Estimates, to be calibrated against measured peaks -----------------------------------------------------
RUNTIME_MIB = {"cpu": 700, "cuda": 600}
# The process before any model: on a CPU the resident Python, torch, transformers, datasets and tokenizers; on a
# GPU the CUDA context, kernels and cuBLAS workspace.
FSDP_GATHERED_LAYERS = 2  # FSDP2 holds the layer it computes whole, and prefetches the next
DISTRIBUTED_MIB = {"cpu": 400, "cuda": 0}
# Each process of a multi-process run on top of RUNTIME_MIB: torch.distributed's process group and the heap its
# load-then-shard leaves behind (a 2-process FSDP PPO on SmolLM2; on a GPU unmeasured).
CPU_DEQUANTIZED_SLACK = 0.5
# A fraction of the activations: on a CPU, bitsandbytes dequantizes each 4-bit linear's weight to a float32
# tensor for its matmul and frees it; interleaved with the activations a training forward keeps, those
# transients fragment glibc's heap, and peak RSS exceeded the live activations by half (SFT QLoRA on SmolLM2).

# --- Facts --------------------------------------------------------------------------------------------------
NF4_BITS = 4.127  # 4-bit NormalFloat with double quantisation: 0.127 bits of constants per weight (QLoRA, sec. 2)
INT8_BITS = 8.0  # LLM.int8(): a byte per weight (one float32 scale per row on top, left out)
QUANTIZED_BITS = {"4bit": NF4_BITS, "8bit": INT8_BITS}
FLOAT32 = 4  # adapters and value heads (peft and rlft keep them float32), their gradients, and the loss's logits
# transformers' causal-LM loss holds the logits upcast to float32, their log-softmax for the backward, and then its
# gradient: three float32 copies of rows x tokens x vocab at its peak.
CAUSAL_LM_LOSS_LOGIT_COPIES = 3


def weight_bytes(parameters: int, quantizable: int, dtype_bytes: int, quantization: str = "none",
                 kbit_training: bool = False) -> float:
    """A base's weights: bitsandbytes stores the `quantizable` ones (linear layers but the output head) at 4.127
    or 8 bits, the rest (embeddings, norms, the head) keep the dtype's `dtype_bytes`, or float32 under an adapter
    training on the quantized base (`kbit_training`: peft's prepare_model_for_kbit_training upcasts them).
    Unquantized, every weight has `dtype_bytes`."""
    if quantization == "none":
        return parameters * dtype_bytes
    rest = FLOAT32 if kbit_training else dtype_bytes
    return quantizable * QUANTIZED_BITS[quantization] / 8 + (parameters - quantizable) * rest


def optimizer_state_bytes(optim: str) -> float:
    """Bytes of optimiser state per trained parameter, by HF Trainer optimizer name. Adam's kind keeps two states
    (exp_avg, exp_avg_sq), Lion, Adagrad and RMSprop one, SGD (no momentum: the Trainer's default) and Adafactor
    (a factored second moment: rows + columns, ~0 per parameter) none; each float32, or a byte in bitsandbytes'
    8-bit optimisers (block-wise quantised states). Paged ones hold as much, where the driver may evict it."""
    name = optim.lower()
    if "sgd" in name or "adafactor" in name:
        states = 0
    elif any(word in name for word in ("lion", "adagrad", "rmsprop")):
        states = 1
    else:
        states = 2
    return states * (1 if "8bit" in name else FLOAT32)


def activation_bytes(rows: int, tokens: int, layers: int, per_token_layer: float, hidden: int, dtype_bytes: int,
                     checkpointing: bool = False) -> float:
    """What one forward with autograd keeps for its backward: rows x tokens x layers x `per_token_layer` bytes
    (what a layer keeps per token, measured by rlft.activations). With gradient checkpointing each layer keeps
    its input alone (hidden x `dtype_bytes` per token), and one layer at a time holds its full set again while
    it is recomputed."""
    if checkpointing:
        return rows * tokens * (layers * hidden * dtype_bytes + per_token_layer)
    return rows * tokens * layers * per_token_layer


def logit_bytes(rows: int, tokens: int, vocab: int, copies: int = 1) -> float:
    """Logits the loss reads, upcast to float32: rows x tokens x vocab x 4 bytes, `copies` times."""
    return rows * tokens * vocab * FLOAT32 * copies


def kv_cache_bytes(rows: int, tokens: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> float:
    """Keys and values of every layer while decoding: rows x tokens (prompt + response) x layers x kv_heads x
    head_dim x 2 (a key and a value) x `dtype_bytes`."""
    return rows * tokens * layers * kv_heads * head_dim * 2 * dtype_bytes


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes, read off its meta-device build (rlft.plan.shape_of)."""
    parameters: int  # every parameter; a tied embedding once
    quantizable: int  # weights of the linear layers bitsandbytes converts: all but the output head
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Workload:
    """One process of one stage, in numbers: what `parts` turns into bytes."""
    model: ModelShape
    dtype_bytes: int  # the base's dtype: 2 (bfloat16, float16) or 4 (float32)
    quantization: str = "none"  # none, 4bit, 8bit (bitsandbytes)
    adapter: int = 0  # adapter parameters held, float32: LoRA, a critic's value head or adapter, a score head
    trains: bool = False  # the adapter trains: gradients and optimiser state
    full_finetune: bool = False  # every weight trains (a reward model without LoRA), in its own dtype
    optim: str = "adamw_torch"
    rows: int = 0  # rows per forward/backward with autograd (one micro-batch)
    tokens: int = 0  # tokens per such row
    per_token_layer: float = 0.0  # bytes a layer keeps for the backward per token (rlft.activations measures it)
    passes: int = 1  # trunk passes with autograd per micro-batch (2 with PPO's adapter critic)
    gradient_checkpointing: bool = False
    logit_rows: int = 0  # rows x tokens of float32 logits the loss holds, logit_copies times
    logit_tokens: int = 0
    logit_copies: int = 1
    generate_rows: int = 0  # rows decoded together
    generate_tokens: int = 0  # their prompt + new tokens
    merged: int = 0  # base weights copied while the adapter is merged into them for sampling
    packed: int = 0  # base weights copied for sampling, prepacked for oneDNN (beyond the merged ones, packed too)
    others: tuple[tuple[str, str, float], ...] = ()  # (key, label, bytes) of other models held: a reward model
    processes: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["cpu", "cuda"] = "cpu"


class Part(NamedTuple):
    key: str  # runtime, weights, adapter, optimizer, gradients, ddp_buckets, activations, logits, kv_cache, ...
    label: str
    bytes: float
    phase: Literal["always", "forward", "generate"]


def parts(w: Workload) -> list[Part]:
    """Each part of one process's memory. FSDP shards the weights, adapters, gradients and optimiser state
    `processes` ways and gathers a couple of layers whole at a time; DDP holds a full copy in every process,
    and its gradient buckets a second copy of the gradients."""
    def share(size: float) -> float:
        return size / w.processes if w.strategy == "fsdp" else size

    m = w.model
    weights = weight_bytes(m.parameters, m.quantizable, w.dtype_bytes, w.quantization,
                           kbit_training=w.trains and not w.full_finetune)
    stored = {"none": f"{8 * w.dtype_bytes}-bit", "4bit": "4-bit NF4", "8bit": "8-bit"}[w.quantization]
    found = [Part("runtime", "runtime: interpreter, libraries" + (", CUDA context" if w.device == "cuda" else ""),
                  RUNTIME_MIB[w.device] * MIB, "always"),
             Part("weights", f"base weights, {amount(m.parameters)} at {stored}", share(weights), "always")]
    if w.adapter:
        found.append(Part("adapter", f"adapters, {amount(w.adapter)} float32", share(w.adapter * FLOAT32), "always"))
    trained = m.parameters if w.full_finetune else w.adapter if w.trains else 0
    if trained:
        gradients = trained * (w.dtype_bytes if w.full_finetune else FLOAT32)
        found.append(Part("optimizer", f"optimizer state, {w.optim}: {optimizer_state_bytes(w.optim):g} B/parameter",
                          share(trained * optimizer_state_bytes(w.optim)), "always"))
        found.append(Part("gradients", f"gradients of {amount(trained)} parameters", share(gradients), "forward"))
        if w.processes > 1 and w.strategy == "ddp":
            found.append(Part("ddp_buckets", "DDP gradient buckets (a second copy)", gradients, "forward"))
    if w.rows:
        how = "checkpointed" if w.gradient_checkpointing else f"{w.per_token_layer / 1024:,.1f} KiB per token-layer"
        passes = f" x {w.passes} passes" if w.passes > 1 else ""
        activations = w.passes * activation_bytes(w.rows, w.tokens, m.layers, w.per_token_layer, m.hidden,
                                                  w.dtype_bytes, w.gradient_checkpointing)
        found.append(Part("activations", f"activations, {w.rows} rows x {w.tokens} tokens, {how}{passes}",
                          activations, "forward"))
        if w.quantization != "none" and w.device == "cpu":
            found.append(Part("dequantized_slack", "heap fragmented by weights dequantized per matmul (CPU)",
                              CPU_DEQUANTIZED_SLACK * activations, "forward"))
    if w.logit_rows:
        copies = f" x {w.logit_copies}" if w.logit_copies > 1 else ""
        found.append(Part("logits", f"logits, {w.logit_rows} rows x {w.logit_tokens} tokens x {m.vocab} vocab{copies}",
                          logit_bytes(w.logit_rows, w.logit_tokens, m.vocab, w.logit_copies), "forward"))
    if w.generate_rows:
        found.append(Part("kv_cache", f"KV cache, {w.generate_rows} rows x {w.generate_tokens} tokens",
                          kv_cache_bytes(w.generate_rows, w.generate_tokens, m.layers, m.kv_heads, m.head_dim,
                                         w.dtype_bytes), "generate"))
    if w.merged:
        found.append(Part("merged", "adapter merged into a copy of its layers", w.merged * w.dtype_bytes, "generate"))
    if w.packed:
        found.append(Part("packed", "other weights prepacked for oneDNN while sampling", w.packed * w.dtype_bytes,
                          "generate"))
    if w.strategy == "fsdp" and w.processes > 1:
        found.append(Part("fsdp_gathered", f"FSDP: {FSDP_GATHERED_LAYERS} layers gathered whole",
                          FSDP_GATHERED_LAYERS * weights / m.layers, "always"))
    if w.processes > 1:
        found.append(Part("distributed", "torch.distributed process group", DISTRIBUTED_MIB[w.device] * MIB, "always"))
    found += [Part(key, label, size, "always") for key, label, size in w.others]
    return found


def amount(parameters: float) -> str:
    """A parameter count for a label: 6.74B, 4.88M, or 577."""
    if parameters >= 1e9:
        return f"{parameters / 1e9:,.2f}B"
    return f"{parameters / 1e6:,.2f}M" if parameters >= 1e5 else f"{parameters:,.0f}"


def peak(found: list[Part]) -> float:
    """Bytes at the peak: what is always held plus the larger of the forward and generation phases."""
    always = sum(p.bytes for p in found if p.phase == "always")
    return always + max(sum(p.bytes for p in found if p.phase == phase) for phase in ("forward", "generate"))
