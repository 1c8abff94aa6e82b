"""Rule judges: function scorers (kind: function, path: reward_models.judges:<name>) that need no training.

They label preference pairs offline (`rlft preferences`, the built-in `chatterbot-sentiment` data) and
serve as ground truth when checking what a learned reward model picked up.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        from rlft.errors import RlftError

        raise RlftError("the sentiment judge needs the package: pip install vaderSentiment") from None
    return SentimentIntensityAnalyzer()


def sentiment(prompts: list, completions: list[str]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1]; the prompt is ignored.

    VADER (Hutto & Gilbert 2014) is a lexicon with rules for negation and intensifiers: "not good" < 0.
    """
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]
