"""Rule judges: function scorers (kind: function, path: reward_models.judges:<name>) that need no training.

They label preference pairs offline (`rlft preferences`, the built-in `chatterbot-sentiment` data) and
serve as ground truth when checking what a learned reward model picked up.
"""

from __future__ import annotations

from functools import lru_cache

from rlft.errors import RlftError


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:

        raise RlftError("the sentiment judge needs the package: pip install vaderSentiment") from None
    return SentimentIntensityAnalyzer()


def sentiment(prompts: list, completions: list[str]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1]; the prompt is ignored.

    VADER (Hutto & Gilbert 2014) is a lexicon with rules for negation and intensifiers: "not good" < 0.
    """
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]


def pick_pair(prompt, candidates: list[str], scores: list[float], min_gap: float) -> dict | None:
    """A preference row of the judge's best and worst candidate, or None on a tie or a gap under min_gap."""
    best = max(range(len(candidates)), key=scores.__getitem__)
    worst = min(range(len(candidates)), key=scores.__getitem__)
    gap = scores[best] - scores[worst]
    if gap <= 0 or gap < min_gap or candidates[best] == candidates[worst]:
        return None
    return preference_row(prompt, candidates[best], candidates[worst], scores[best], scores[worst])


def every_pair(prompt, candidates: list[str], scores: list[float], min_gap: float) -> list[dict]:
    """A row for each two distinct candidates the judge separates by at least min_gap (InstructGPT's
    K-choose-2 comparisons): up to K(K-1)/2 rows per prompt instead of one, from the same samples."""
    scored = sorted(dict(zip(candidates, scores)).items(), key=lambda item: -item[1])  # a repeated text counts once
    return [preference_row(prompt, better, worse, high, low)
            for i, (better, high) in enumerate(scored) for worse, low in scored[i + 1:]
            if high - low > 0 and high - low >= min_gap]


def preference_row(prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict:
    if isinstance(prompt, list):  # conversational: the completions become assistant turns
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected}
