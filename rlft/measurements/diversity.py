"""Diversity of a set of generations: distinct-n and self-BLEU, as an `evaluate` measurement.

rlft loads it with `evaluate.load(<this file>)`: the hub's modules are unreachable offline, and neither
of these ships with `evaluate` itself. Mode collapse (a policy that found one reply the reward model
loves) shows as distinct-n falling and self-BLEU rising against the reference's samples.
- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"):
  unique n-grams / all n-grams over every generation.
- self-BLEU (Zhu et al. 2018, Texygen): mean BLEU-4 of each generation against all the others as
  references, with NLTK's smoothing method 1 as Texygen uses.
"""

import datasets
import evaluate

_DESCRIPTION = "distinct-1, distinct-2 and self-BLEU-4 of a list of texts (whitespace tokens, lower-cased)."
_KWARGS_DESCRIPTION = """
Args:
    data (list of str): generations, one per prompt.
Returns:
    distinct_1, distinct_2 (float in [0, 1], higher is more diverse; 0 when there are no n-grams),
    self_bleu (float in [0, 1], lower is more diverse; 0 with fewer than two non-empty texts).
"""


class Diversity(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement", description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"data": datasets.Value("string")}),
        )

    def _compute(self, data):
        texts = [text.lower().split() for text in data]
        result = {f"distinct_{n}": distinct(texts, n) for n in (1, 2)}
        result["self_bleu"] = self_bleu(texts)
        return result


def distinct(texts: list[list[str]], n: int) -> float:
    grams = [tuple(words[i : i + n]) for words in texts for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: list[list[str]]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    texts = [words for words in texts if words]
    if len(texts) < 2:
        return 0.0
    smoothing = SmoothingFunction().method1
    scores = [sentence_bleu(texts[:i] + texts[i + 1 :], hypothesis, smoothing_function=smoothing)
              for i, hypothesis in enumerate(texts)]
    return sum(scores) / len(scores)
