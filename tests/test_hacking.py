"""Reward-hacking detectors on constructed data whose answer is known by hand."""

import math

import pytest

from rlft.hacking import detectors, disagreement_rate, diversity, recommend, spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)  # monotone, not linear: still 1
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share ranks: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3); centred, cov = 2.25 + 2.25 = 4.5,
    # var_x = 4.5, var_y = 5, so rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # undefined for a constant, not 0 or NaN


def test_disagreement_rate_by_hand():
    # prompt 0: proxy and gold both prefer the policy; 1: proxy policy, gold reference (counts);
    # 2: a proxy tie (does not count); 3: proxy reference, gold policy (the other way round: does not count)
    proxy_policy, proxy_reference = [2.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]
    gold_policy, gold_reference = [0.5, 0.1, 0.0, 0.9], [0.2, 0.3, 0.9, 0.1]
    assert disagreement_rate(proxy_policy, proxy_reference, gold_policy, gold_reference) == 0.25


def test_diversity_by_hand():
    # "a b a b": unigrams a, b, a, b -> 2 unique of 4; bigrams ab, ba, ab -> 2 of 3
    measured = diversity(["a b a b"])
    assert (measured["distinct_1"], measured["distinct_2"], measured["self_bleu"]) == (0.5, pytest.approx(2 / 3), 0.0)
    collapsed = diversity(["you are so great !"] * 5)  # mode collapse: one reply for every prompt
    assert collapsed["self_bleu"] == pytest.approx(1.0) and collapsed["distinct_1"] == pytest.approx(5 / 25)
    varied = diversity(["the cat sat on the mat", "dogs bark at night loudly", "i like green tea with honey"])
    assert varied["self_bleu"] < 0.1 and varied["distinct_2"] == 1.0


def test_detectors_see_a_length_hack():
    # the policy learnt that the proxy pays for length: its score follows its length exactly, gold does not
    lengths = {"policy": [20, 25, 30, 35], "reference": [10, 9, 11, 12]}
    scores = {"proxy": {"policy": [2.0, 2.5, 3.0, 3.5], "reference": [0.1, 0.3, 0.2, 0.0]},
              "gold": {"policy": [0.1, 0.0, -0.1, -0.2], "reference": [0.3, 0.1, 0.2, 0.0]}}
    completions = {"policy": ["great great great"] * 4, "reference": ["ok", "fine thanks", "hello there", "no"]}
    found = detectors(scores, lengths, completions, proxy="proxy", gold="gold")
    assert found["length_correlation"]["proxy"]["policy"] == pytest.approx(1.0)
    assert found["length_correlation"]["gold"]["policy"] == pytest.approx(-1.0)
    assert found["length_shift"] == pytest.approx(27.5 - 10.5)
    assert found["disagreement_rate"] == 1.0  # the proxy prefers every policy reply, gold every reference one
    assert found["diversity"]["policy"]["self_bleu"] > found["diversity"]["reference"]["self_bleu"]
    assert detectors(scores, lengths, completions, proxy="proxy", gold=None)["disagreement_rate"] is None


def test_recommend_within_budget():
    points = [{"step": 0, "kl": 0.0, "gold": {"mean": 0.1}}, {"step": 5, "kl": 2.0, "gold": {"mean": 0.3}},
              {"step": 10, "kl": 5.0, "gold": {"mean": 0.5}}, {"step": 15, "kl": 9.0, "gold": {"mean": 0.4}}]
    assert recommend(points, kl_budget=6.0, by="gold")["step"] == 10
    assert recommend(points, kl_budget=3.0, by="gold")["step"] == 5
    assert recommend(points, kl_budget=0.0, by="gold")["step"] == 10  # no budget: the best overall
    assert recommend(points[1:], kl_budget=1.0, by="gold") is None


def test_recommend_skips_collapsed_checkpoints():
    points = [{"step": 0, "kl": 0.0, "gold": {"mean": 0.1}}, {"step": 10, "kl": 3.0, "gold": {"mean": 0.3}},
              {"step": 20, "kl": 5.0, "gold": {"mean": 0.6}, "collapsed": True}]
    assert recommend(points, kl_budget=6.0, by="gold")["step"] == 10  # the best, step 20, collapsed


def test_collapse_fires_on_one_reply_and_stays_silent_on_real_replies():
    """Real chatterbot replies against other real replies: no warning. A policy answering 'Yes.' to nearly
    everything: every signal fires (shorter, fewer distinct words, one dominant reply)."""
    from rlft.data import chatterbot_pairs
    from rlft.hacking import collapse

    replies = [row["completion"] if isinstance(row["completion"], str) else row["completion"][-1]["content"]
               for row in chatterbot_pairs()[:128]]
    reference, healthy = replies[:64], replies[64:]

    def lengths(texts):
        return [len(text.split()) + 1 for text in texts]  # words and the EOS, as a token count would go
    quiet = collapse({"policy": healthy, "reference": reference}, {"policy": lengths(healthy), "reference": lengths(reference)})
    assert quiet["warnings"] == [], quiet
    # one short reply: shorter, and one reply dominates (distinct-1 barely moves: few words, few repeats)
    yes = ["Yes."] * 56 + healthy[:8]
    short = collapse({"policy": yes, "reference": reference}, {"policy": lengths(yes), "reference": lengths(reference)})
    assert short["top_reply_share"] == 56 / 64
    assert [w.split(" ")[0] for w in short["warnings"]] == ["replies", "one"], short
    assert "one reply is 88% of the samples ('Yes.'" in short["warnings"][1]
    assert short["warnings"][0].startswith("replies shrank to 0.3")
    # one long reply: as long as the reference's, but few distinct words, every reply a copy of the others
    same = ["I am very happy to help you with that today, thank you!"] * 56 + healthy[:8]
    long = collapse({"policy": same, "reference": reference}, {"policy": lengths(same), "reference": lengths(reference)})
    assert [w.split(" ")[0] for w in long["warnings"]] == ["distinct-1", "self-BLEU", "one"], long


def test_collapse_counts_only_the_signals_a_task_names():
    """Arithmetic answers against the base's rambling: short, alike replies that differ per problem. Every
    signal counted, they read as collapse (shorter, fewer distinct words); counting only one reply dominating
    (the verifiable quickstart's ppo.collapse_signals) they do not, while one answer to every problem still does."""
    import random

    from rlft.hacking import collapse

    from rlft.data import chatterbot_pairs

    rng = random.Random(0)
    answers = [f"{a} + {b} = {a + b}" for a, b in ((rng.randint(1, 30), rng.randint(1, 30)) for _ in range(64))]
    # the base's replies: real sentences, many distinct words (the verifiable run's base had 0.28 vs its 0.11)
    rambling = [row["completion"] if isinstance(row["completion"], str) else row["completion"][-1]["content"]
                for row in chatterbot_pairs()[:64]]

    def lengths(texts):
        return [len(text.split()) + 1 for text in texts]

    def sides(policy):
        return {"policy": policy, "reference": rambling}, {"policy": lengths(policy), "reference": lengths(rambling)}
    every = collapse(*sides(answers))
    assert "distinct-1" in [w.split(" ")[0] for w in every["warnings"]], every
    assert collapse(*sides(answers), signals_counted=["top_reply_share"])["warnings"] == []
    one = collapse(*sides(["24"] * 48 + answers[:16]), signals_counted=["top_reply_share"])
    assert [w.split(" ")[0] for w in one["warnings"]] == ["one"] and one["top_reply_share"] == 48 / 64


def test_collapse_signals_are_checked_by_name():
    from rlft.config import ConfigValueError
    from rlft.evaluate import EvalConfig
    from rlft.ppo.config import PPOHyperparameters

    with pytest.raises(ConfigValueError, match=r"collapse_signals.*unknown signal\(s\) \['top_reply'\]"):
        PPOHyperparameters(collapse_signals=["top_reply"])
    with pytest.raises(ConfigValueError, match=r"collapse_signals.*unknown signal"):
        EvalConfig(collapse_signals=["length"])
