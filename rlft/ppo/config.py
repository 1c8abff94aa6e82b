"""`rlft ppo` configuration: one dataclass tree whose defaults are the tuned values (configs/ppo.yaml adds nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlft.config import DataConfig, LoraConfig, ModelConfig, option, require, require_seed, section
from rlft.generation import SamplingConfig
from rlft.hacking import COLLAPSE_LIMITS
from rlft.publish import Publishing
from reward_models.scorers import ScorerConfig


# Keys a rerun may change and still resume its checkpoint: how long it runs, how often it logs and saves, how
# long a scorer may take.
RESUMABLE_CHANGES = ("output_dir", "resume", "save_every", "sample_every", "ppo.steps", "ppo.forward_batch_size",
                     "ppo.max_kl", "ppo.kl_budget", "ppo.max_result_scale", "ppo.max_sampler_gap",
                     "ppo.gather_for_generation",
                     "reward.*.timeout")


@dataclass
class PPOLoraConfig(LoraConfig):
    dropout: float = option(0.0, "Dropout on the LoRA input; 0 so rollout and update log-probs come from one function.")


@dataclass
class PPOHyperparameters:
    steps: int = option(20, "PPO steps; each is one rollout (generate, score) and one update.")
    rollout_batch_size: int = option(16, "Completions per step per process (rollout_batch_size / num_generations "
                                     "prompts).")
    num_generations: int = option(1, "Completions sampled per prompt, kept together as a group (>= 2 for grpo/rloo).")
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = option(
        "gae", "gae: PPO with a critic (value head); grpo: group-normalised scores; rloo: leave-one-out baseline; "
        "reinforce_pp: REINFORCE++, batch-normalised returns. All but gae train no critic.")
    critic: Literal["head", "adapter"] = option(
        "head", "gae's critic: head (a linear value head on the policy's detached hidden state, no extra pass) or "
        "adapter (its own LoRA adapter and value head on the same base, one more forward pass; started from the "
        "reward adapter when the reward is kind: adapter).")
    critic_learning_rate: float = option(0.0, "Learning rate of the adapter critic (0: learning_rate).")
    scale_by_std: bool = option(True, "grpo: divide by the group's std (false: Dr. GRPO's centring only).")
    kl_in: Literal["reward", "loss"] = option(
        "reward", "Where beta * KL goes: in the per-token reward (k1 estimate, PPO's way) or in the loss "
        "(k3 estimate of the current policy against the reference, GRPO's way).")
    loss_aggregation: Literal["token_mean", "sequence_mean"] = option(
        "token_mean", "Policy loss over a mini-batch: every token weighs the same, or every sequence.")
    mini_batch_size: int = option(8, "Rollout rows per optimiser step (whole groups: a multiple of num_generations).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per mini-batch (mini_batch_size must divide evenly).")
    ppo_epochs: int = option(2, "Passes over each rollout.")
    forward_batch_size: int = option(16, "Rows per no-grad forward pass when computing log-probs and values (the "
                                     "update's first mini-batch takes its own forward, with autograd, instead).")
    optim: str = option("adamw_torch", "Optimizer, by HF Trainer name: adamw_torch, adamw_8bit, paged_adamw_8bit, ...")
    learning_rate: float = option(7e-4, "AdamW learning rate for the adapter and value head (2e-4 left KL at 0.1 nats "
                                  "after 7 quickstart steps).")
    weight_decay: float = option(0.01, "Decoupled weight decay on the adapter and value head (pulls LoRA towards "
                                 "the reference).")
    lr_schedule: Literal["constant", "linear"] = option("constant", "linear: decay to 0 over `steps`.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this.")
    clip_range: float = option(0.2, "PPO ratio clip epsilon (below 1 and, unless clip_range_high, above).")
    clip_range_high: float = option(
        0.0, "Upper ratio clip epsilon where it differs (DAPO's clip-higher: 0.28 with clip_range 0.2 lets unlikely "
        "tokens gain more per update, against entropy collapse); 0: clip_range.")
    mask_truncated_completions: bool = option(
        False, "Leave replies cut at sampling.max_new_tokens out of every loss (DAPO's overlong filtering); "
        "response/clipped_ratio logs their share.")
    clip_range_value: float = option(0.2, "Value clip around the rollout's values.")
    value_loss_coef: float = option(0.1, "Weight of the value loss (the value head shares the trunk).")
    entropy_coef: float = option(
        0.03, "Entropy bonus weight (0: entropy is only logged). Against collapse onto a few replies the reward model "
        "likes: at 0 the quickstart's PPO answered most prompts with 'Yes' at its target KL (benchmarks/kl_control.py).")
    entropy_cap: Literal["none", "reference"] = option(
        "none", "reference: the entropy bonus acts only where the policy's entropy is at or below the reference's "
        "at the same position (against collapse, without pushing replies to more randomness than the reference's).")
    gamma: float = option(1.0, "Discount factor for GAE.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_advantages: bool = option(True, "Normalise advantages per rollout.")
    whiten_rewards: bool = option(False, "Normalise per-token rewards per rollout (keeps their mean).")
    score_clip: float = option(0.0, "Clip scores to [-score_clip, score_clip] (0: off).")
    missing_eos_penalty: float = option(
        0.5, "Subtract this from the score of a completion without EOS (0: off). 1.0, a whole std of the normalised "
        "reward, taught the quickstart 'end early' until replies shrank to a quarter of SFT's; 0 let them ramble "
        "unended (chosen on validation prompts: examples/quickstart/results/kl_control.md).")
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = option(
        "k1", "Per-token KL estimator of the penalty (k1: its return has the gradient of the sequence KL, unbiased); "
        "objective/kl_sampled logs its sum per response. The controller steers, and objective/kl logs, the exact KL "
        "over the whole vocabulary.")
    kl_coef: float = option(0.1, "Initial beta, the per-token KL penalty weight.")
    kl_control: Literal["pi", "adaptive", "fixed"] = option(
        "pi", "How beta follows target_kl: pi (proportional-integral on log beta, no windup: reaches and holds "
        "the target in a short run), adaptive (Ziegler et al. 2019's integral controller), fixed (beta = kl_coef).")
    kl_coef_min: float = option(
        0.0, "pi: beta never falls below this (0: as low as kl_coef / e while the KL is under target). At that "
        "floor the quickstart's policy, once it found a one-word reply both judges liked, went to it for most "
        "prompts within the KL target.")
    target_kl: float = option(6.0, "Target KL per sequence (nats) for the pi and adaptive controllers (TRL's old PPO "
                              "default too; held at 3, the quickstart's policy barely moved the gold judge).")
    kl_horizon: int = option(16, "Controller horizon in samples: the integral moves by up to 0.2 * samples / horizon "
                             "per step (16: one step's rollout).")
    max_update_kl: float = option(
        0.05, "Trust region of one update: its remaining mini-batches and epochs are skipped once the KL per token "
        "between the rollout's policy and the updated one (policy/approxkl, measured on each mini-batch before its "
        "optimiser step) exceeds this (0: off; the early stop of cleanrl and Stable-Baselines3). Without it single "
        "updates moved the quickstart's KL by several nats (benchmarks/kl_control.py).")
    kl_budget: float = option(
        0.0, "The most KL per sequence (nats, exact) the policy PPO saves as its result may have: the latest policy "
        "within it (a checkpoint, or the one kept between checkpoints), said in one line (0: 1.25 x target_kl; 1e9: "
        "none). Measured on the rollout that follows each policy, and for the last step on more prompts, and read as "
        "the 95% upper bound of that mean: a policy is within the budget when its bound is.")
    max_result_scale: float = option(
        0.0, "Scale the final policy's update (its LoRA B matrices) by the factor in (0, this] whose exact KL on the "
        "final measurement's prompts lands on target_kl, its bound within kl_budget and its replies not collapsed "
        "(rlft/ppo/scale.py: under 1 interpolates towards the reference, over 1 extrapolates the update; a few "
        "sampling passes over 64 prompts). 1: only scaled down; 0: off (the trained policy, or a checkpoint it "
        "falls back to).")
    collapse_signals: list[str] = option(
        list(COLLAPSE_LIMITS), "Which signals count the policy's replies as collapsed, against the reference's "
        f"(the result is then an earlier checkpoint; rlft.hacking.COLLAPSE_LIMITS): {', '.join(COLLAPSE_LIMITS)}. "
        "A task whose right replies are short and alike (arithmetic answers) keeps only top_reply_share.")
    max_kl: float = option(100.0, "Abort when the mean KL per sequence exceeds this: the policy has run away.")
    sampler_correction_cap: float = option(
        0.0, "Truncated importance sampling: weight each token's policy loss by min(pi / pi_sampler, this), "
        "correcting for the sampler's distribution differing from the one PPO recomputes (bf16 decoding rounds "
        "differently from a bf16 forward: sampler/logprob_gap_kl measures it); 0: off, 2 as in Yao et al. 2025.")
    max_sampler_gap: float = option(
        0.2, "Stop when the sampler's log-probs of its own tokens differ from the trainer's recomputed ones by more "
        "than this (mean |difference| per token, nats): the rollout was not sampled from the policy PPO trains "
        "(measured: ~1e-5 in float32, 0.04-0.06 in bf16 on SmolLM2).")
    gather_for_generation: bool = option(
        False, "Under FSDP (configs/accelerate/fsdp.yaml): gather the whole policy for generate() and free it after "
        "(no collective per decoding step: faster, but every process holds the whole base while it samples); "
        "false: one decoder layer at a time.")

    @property
    def prompts_per_rollout(self) -> int:
        """Distinct prompts a process draws per step: each is sampled num_generations times."""
        return self.rollout_batch_size // self.num_generations

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward/backward of the update: a mini-batch over gradient_accumulation_steps."""
        return self.mini_batch_size // self.gradient_accumulation_steps

    @property
    def uses_critic(self) -> bool:
        """Only GAE needs values: the other estimators baseline against the group or the batch."""
        return self.advantage_estimator == "gae"

    def __post_init__(self):
        for key in ("steps", "rollout_batch_size", "num_generations", "mini_batch_size", "gradient_accumulation_steps",
                    "ppo_epochs", "forward_batch_size", "kl_horizon"):
            require(getattr(self, key) > 0, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.advantage_estimator not in ("grpo", "rloo") or self.num_generations >= 2, "num_generations",
                f"{self.advantage_estimator} compares completions of one prompt: set num_generations >= 2")
        require(self.mini_batch_size % self.num_generations == 0, "mini_batch_size",
                f"must be a multiple of num_generations={self.num_generations}, so groups stay whole")
        require(self.rollout_batch_size % self.mini_batch_size == 0, "mini_batch_size",
                f"must divide rollout_batch_size={self.rollout_batch_size}")
        require(self.mini_batch_size % self.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
                f"must divide mini_batch_size={self.mini_batch_size}")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.critic_learning_rate >= 0, "critic_learning_rate", "must be >= 0 (0: learning_rate)")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.kl_coef_min >= 0, "kl_coef_min", "must be >= 0")
        require(self.target_kl > 0, "target_kl", "must be > 0")
        require(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma must be in (0, 1], lam in [0, 1]")
        require(self.clip_range > 0 and self.clip_range_value > 0, "clip_range", "clip ranges must be > 0")
        require(self.clip_range_high >= 0, "clip_range_high", "must be >= 0 (0: clip_range)")
        # torch scales gradients by max_norm / norm: a negative norm flips every gradient, 0 freezes the policy
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        for key in ("weight_decay", "value_loss_coef", "entropy_coef", "score_clip", "missing_eos_penalty"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)} (a negative weight would "
                    "reward what it is meant to penalise)")
        require(self.max_kl > 0, "max_kl", "must be > 0")
        require(self.max_update_kl >= 0, "max_update_kl", "must be >= 0 (0: off)")
        require(self.kl_budget >= 0, "kl_budget", "must be >= 0 (0: 1.25 x target_kl)")
        require(self.max_result_scale == 0 or self.max_result_scale >= 1, "max_result_scale",
                "must be 0 (off) or >= 1 (1: only scaled down)")
        unknown = [signal for signal in self.collapse_signals if signal not in COLLAPSE_LIMITS]
        require(not unknown, "collapse_signals", f"unknown signal(s) {unknown}; choose from {list(COLLAPSE_LIMITS)}")
        require(self.max_sampler_gap > 0, "max_sampler_gap", "must be > 0")
        require(self.sampler_correction_cap == 0 or self.sampler_correction_cap >= 1, "sampler_correction_cap",
                "must be 0 (off) or >= 1: a cap below 1 would down-weight even the tokens both sides agree on")
        if self.kl_budget == 0:  # derived once here, so the saved config states the budget the run kept
            self.kl_budget = 1.25 * self.target_kl


@dataclass
class PPOConfig(Publishing):
    output_dir: str = option("runs/ppo", "Run directory: adapter, checkpoints, metrics.jsonl, TensorBoard.")
    seed: int = option(0, "Seed for prompt order, sampling and initialisation.")
    resume: bool = option(True, "Continue from the last checkpoint in output_dir if there is one.")
    sft_adapter: str = option(
        "runs/sft", "SFT adapter folder to start from; it is merged into the base, so it is also the reference "
        "(empty: the base model itself).",
    )
    save_every: int = option(5, "Checkpoint every this many steps (and at the end).")
    sample_every: int = option(5, "Log a table of sample completions every this many steps.")
    model: ModelConfig = section(ModelConfig, "The frozen base.")
    lora: PPOLoraConfig = section(PPOLoraConfig, "The PPO adapter (the policy).")
    data: DataConfig = section(DataConfig, "Prompts: a `prompt` column (string or messages) or `messages`.")
    sampling: SamplingConfig = section(SamplingConfig, "Rollout sampling.")
    reward: list[ScorerConfig] = option(
        [ScorerConfig(name="proxy", kind="model", path="runs/reward", normalize=True)],
        "Scorers summed (with weights) into the score of a completion; by default rlft reward's model, "
        "normalised so the SFT policy scores mean 0, std 1.",
    )
    ppo: PPOHyperparameters = section(PPOHyperparameters, "PPO optimisation.")

    def __post_init__(self):
        super().__post_init__()
        require(self.sampling.top_p == 1.0 and self.sampling.top_k == 0, "sampling.top_p",
                "PPO's log-probs are those of softmax(logits / temperature) over the whole vocabulary; top_p < 1 "
                "or top_k > 0 would sample from another distribution: leave both off (top_p=1, top_k=0)")
        require(self.lora.bias == "none", "lora.bias",
                "PPO trains the adapter only: biases are base weights, so training them would move the reference "
                "(the adapter switched off) as well; use bias: none")
        require(self.save_every > 0, "save_every", "must be >= 1")
        require_seed(self.seed)
        require(self.sample_every > 0, "sample_every", "must be >= 1")
