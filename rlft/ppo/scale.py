"""The result's step along the line through the reference and the trained policy.

A LoRA policy on a reference made of the same base weights is W + s B A; with B scaled by a factor it is
W + factor s B A: 0 is the reference, 1 the trained policy, between them an interpolation towards the initial
weights (WARP's LiTI, Ramé et al. 2024, which trades reward for KL near the frontier), past 1 an extrapolation
along the same update (ExPO, Zheng et al. 2024). PPO measures the exact KL of a few factors on the final
measurement's prompts and ships the one that lands on ppo.target_kl: a run whose controller held beta at its
floor and ended under the target, or whose last update jumped past it, is brought onto it without another
update and without falling back to a checkpoint many steps away.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, NamedTuple

LANDED = 0.1  # within 10% of the target is on it: the measurement's own spread on 64 replies is about that
TRIES = 4  # factors measured at most beyond the trained policy's (each is a sampling pass over its prompts)


class Landing(NamedTuple):
    """The factor shipped and what it measured, with every factor tried: {factor: measured}."""

    factor: float
    measured: object
    tried: dict


def next_factor(tried: dict[float, float], target: float, max_factor: float) -> float:
    """The factor whose KL should be `target`, from those measured ({factor: KL}, the trained policy's 1.0 among
    them): KL grows as factor^p (p = 2 near the reference, where the KL is quadratic in the step), p fitted in
    log-log through the two factors measured nearest the target once there are two; in (0, max_factor]."""
    usable = sorted((f for f, kl in tried.items() if f > 0 and 0 < kl < math.inf),
                    key=lambda f: abs(math.log(tried[f] / target)))
    near = usable[0]
    power = 2.0
    if len(usable) > 1 and abs(math.log(usable[1] / near)) > 1e-6:
        other = usable[1]
        power = min(max(math.log(tried[other] / tried[near]) / math.log(other / near), 0.5), 4.0)
    return min(near * (target / tried[near]) ** (1 / power), max_factor)


def land_on_target(measure: Callable[[float], object], trained, target: float, budget: float,
                   max_factor: float) -> Landing:
    """The factor to ship: measure(factor) measures the policy at that factor (a Measured: kl, upper, signals);
    `trained` is the trained policy's own (factor 1). Stops once a factor lands within LANDED of the target, its
    bound within the budget and its replies not collapsed. A factor whose replies collapsed caps the ones after
    it at 10% under it, or halfway between it and the largest factor that held where that is higher (so the
    cap never falls under a factor known to hold). Of those measured, ships the one acceptable (bound within
    the budget, not collapsed) nearest the target, else the trained policy (factor 1, for the checkpoint
    fallbacks that follow). The bound
    of the factor shipped is read on the sample that chose it among at most TRIES + 1: slightly optimistic,
    which the budget's margin over the target (1.25x by default) absorbs."""
    measured = {1.0: trained}
    if not 0 < trained.kl < math.inf:  # a policy that never moved has no direction to scale
        return Landing(1.0, trained, measured)
    for _ in range(TRIES):
        if any(acceptable(m, budget) and abs(m.kl / target - 1) <= LANDED for m in measured.values()):
            break
        ceiling = min((f for f, m in measured.items() if m.signals["collapsed"]), default=math.inf)
        below = max((f for f, m in measured.items() if f < ceiling and not m.signals["collapsed"]), default=0.0)
        cap = 0.9 * ceiling if 0.9 * ceiling >= below else (below + ceiling) / 2
        factor = round(min(next_factor({f: m.kl for f, m in measured.items()}, target, max_factor), cap), 4)
        if factor in measured or factor <= 0:  # the cap reached, or the fit repeating itself
            break
        measured[factor] = measure(factor)
    good = [f for f, m in measured.items() if acceptable(m, budget)]
    factor = min(good, key=lambda f: abs(math.log(max(measured[f].kl, 1e-9) / target))) if good else 1.0
    return Landing(factor, measured[factor], measured)


def acceptable(measured, budget: float) -> bool:
    """A policy PPO may ship: its KL's 95% bound within the budget and its replies not collapsed."""
    return measured.upper <= budget and not measured.signals["collapsed"]


def scalable(policy, adapter: str) -> bool:
    """Whether the adapter is plain LoRA everywhere (its update is scaling * B A and nothing else): not DoRA,
    whose magnitudes are not on the line, nor (IA)3, nor trained biases or whole modules."""
    from peft import LoraConfig  # peft is heavy

    config = policy.peft_config[adapter]
    return (isinstance(config, LoraConfig) and not config.use_dora and config.bias == "none"
            and not config.modules_to_save)


@contextmanager
def scaled(policy, adapter: str, factor: float):
    """The policy with `adapter`'s update W + s B A scaled to W + factor s B A, for the duration; exact afterwards
    (the scalings are restored, not divided back)."""
    from peft.tuners.lora import LoraLayer  # peft is heavy

    layers = [m for m in policy.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
    saved = [layer.scaling[adapter] for layer in layers]
    for layer in layers:
        layer.scaling[adapter] = layer.scaling[adapter] * factor
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling[adapter] = scaling


def scaled_weights(weights: dict, adapter: str, factor: float) -> dict:
    """Adapter weights by state_dict name with `adapter`'s B matrices times `factor`: saved, they load as the
    scaled policy with no trace of the factor (a plain peft adapter)."""
    if factor == 1.0:
        return weights

    def is_b(name: str) -> bool:  # a Linear's B module, or an Embedding's B parameter
        return f".lora_B.{adapter}." in name or name.endswith(f".lora_embedding_B.{adapter}")
    return {name: tensor * factor if is_b(name) else tensor for name, tensor in weights.items()}
