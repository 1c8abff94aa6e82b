"""Rendering for `rlft eval`: PNG plots, report.md, and a self-contained report.html, all from report.json's dict.

The report is built once as a list of blocks (heading, paragraph, table, image) and written twice, as
Markdown (images linked) and as HTML (images inlined as base64), so the two never say different things.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

from rlft.hacking import overoptimization_points

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt

POLICY, REFERENCE, PROXY, GOLD = "tab:blue", "tab:gray", "tab:blue", "tab:orange"
TRAINING_PANELS = [  # (title, y label, [(metric, legend label)])
    ("Reward", "score", [("objective/scores", "reward model score"), ("objective/rlhf_reward", "score - beta * KL")]),
    ("KL to the reference", "nats per sequence", [("objective/kl", "KL (mean over prompts)")]),
    ("KL coefficient", "beta", [("objective/kl_coef", "beta")]),
    ("Policy loss", "loss", [("loss/policy", "clipped surrogate")]),
    ("Value loss", "loss", [("loss/value", "clipped value loss")]),
    ("Responses", "tokens", [("response/length", "mean length")]),
]


def write_report(report: dict, out: Path) -> dict[str, str]:
    """Write the PNGs, report.md and report.html into `out`; return {what: file name}."""
    out = Path(out)
    results = report["policies"] + report["checkpoints"]
    images = {}
    if results:
        images["rewards"] = save(plot_rewards(report, results), out / "rewards.png")
        images["kl"] = save(plot_kl(results), out / "kl.png")
    if report["training"] and report["training"]["rows"]:
        images["training"] = save(plot_training(report["training"]), out / "training.png")
    if report["checkpoints"]:
        images["overoptimization"] = save(plot_overoptimization(report), out / "overoptimization.png")
    content = blocks(report, images)
    (out / "report.md").write_text(to_markdown(content))
    (out / "report.html").write_text(to_html(content, out))
    return {**images, "markdown": "report.md", "html": "report.html", "json": "report.json"}


def save(figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path.name


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_rewards(report: dict, results: list[dict]):
    """One panel per scorer: reference and policy mean score with 95% CI, win rate over each pair."""
    names = list(results[0]["rewards"])
    figure, axes = plt.subplots(1, len(names), figsize=(max(5, 1.1 * len(results) + 2.5) * len(names), 4.2),
                                squeeze=False)
    x = range(len(results))
    for ax, name in zip(axes[0], names):
        for offset, side, color in ((-0.2, "reference", REFERENCE), (0.2, "policy", POLICY)):
            stats = [r["rewards"][name][side] for r in results]
            ax.bar([i + offset for i in x], [s["mean"] for s in stats], width=0.4, color=color, label=side,
                   yerr=[s["mean"] - s["ci95"][0] for s in stats], capsize=3)
        for i, r in enumerate(results):
            ax.annotate(f"win {r['rewards'][name]['win_rate']['mean']:.0%}", (i, 1.0),
                        xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(list(x), [r["label"] for r in results], rotation=30 if len(results) > 3 else 0, ha="right"
                      if len(results) > 3 else "center")
        ax.set_ylabel("mean score (bars: 95% CI)")
        ax.set_title(role(report, name), pad=16)
        ax.legend(fontsize=8, loc="lower right")
    few = fewer_checkpoint_prompts(report)
    where = f"{report['prompts']['count']} held-out prompts" + (f" ({few} for checkpoints)" if few else "")
    figure.suptitle(f"Reward on {where}: policy vs its reference")
    figure.tight_layout()
    return figure


def plot_kl(results: list[dict]):
    """Where the exact KL sits over response tokens (shared log-spaced bins), and per-response KL both ways."""
    figure, (tokens, sequences) = plt.subplots(1, 2, figsize=(12, 4.2))
    floor = 1e-4  # smaller per-token KLs (including exact zeros) go in the first bin
    values = [[max(v, floor) for row in r["per_prompt"]["kl_exact_per_token"] for v in row] for r in results]
    top = max([floor * 10] + [max(v) for v in values if v])
    edges = [floor * (top / floor) ** (i / 40) for i in range(41)]
    for r, v in zip(results, values):
        weights = [1 / len(v)] * len(v) if v else []
        tokens.hist(v, bins=edges, weights=weights, histtype="step", linewidth=1.5,
                    label=f"{r['label']} (median {r['kl']['per_token_exact']['p50']:.2g}, "
                          f"p99 {r['kl']['per_token_exact']['p99']:.2g})")
    tokens.set_xscale("log")
    tokens.set_xlabel(f"exact KL(pi || pi_ref) at one response token (nats; < {floor:g} in the first bin)")
    tokens.set_ylabel("share of response tokens")
    tokens.set_title("Per-token KL on the policy's own samples")
    tokens.legend(fontsize=8)
    x = range(len(results))
    for offset, way, label, color in ((-0.2, "exact", "exact (full vocabulary)", POLICY),
                                      (0.2, "sampled", "sampled (k1 estimate)", GOLD)):
        stats = [r["kl"][way] for r in results]
        bars = sequences.bar([i + offset for i in x], [s["mean"] for s in stats], width=0.4, color=color, label=label,
                             yerr=[s["mean"] - s["ci95"][0] for s in stats], capsize=3)
        sequences.bar_label(bars, [f"{s['mean']:.3g}" for s in stats], fontsize=7, padding=2)
    sequences.axhline(0, color="black", linewidth=0.6)
    sequences.set_xticks(list(x), [r["label"] for r in results], rotation=30 if len(results) > 3 else 0,
                         ha="right" if len(results) > 3 else "center")
    sequences.set_ylabel("nats per response (bars: 95% CI)")
    sequences.set_title("KL drift per response, two ways")
    sequences.legend(fontsize=8)
    figure.tight_layout()
    return figure


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: readable trends from noisy per-step PPO metrics."""
    sums, out = 0.0, []
    for i, v in enumerate(values):
        sums += v - (values[i - window] if i >= window else 0.0)
        out.append(sums / min(i + 1, window))
    return out


def plot_training(training: dict):
    rows = training["rows"]
    figure, axes = plt.subplots(2, 3, figsize=(14, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, metrics) in zip(axes.flat, TRAINING_PANELS):
        drawn = False
        for color, (key, label) in zip(colors, metrics):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            window = max(1, len(values) // 20)
            ax.plot(steps, values, color=color, alpha=0.3 if window > 1 else 1.0, linewidth=1)
            ax.plot(steps, smooth(list(values), window), color=color, linewidth=2,
                    label=label + (f" ({window}-step mean)" if window > 1 else ""))
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.set_ylabel(ylabel)
    last = rows[-1]["step"]
    figure.suptitle(f"Training curves of {training['run']} (through step {last})")
    figure.tight_layout()
    return figure


def plot_overoptimization(report: dict):
    """Proxy and gold reward against KL and sqrt(KL) (Gao et al. 2022 plot against d = sqrt(KL))."""
    points = overoptimization_points(report)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, transform, xlabel in ((axes[0], lambda k: k, "KL(pi || pi_ref) per response (nats)"),
                                  (axes[1], math.sqrt, "sqrt(KL)")):
        x = [transform(p["kl"]) for p in points]
        lines = [errorline(ax, x, [p["proxy"] for p in points], PROXY, role(report, report["proxy"]))]
        ax.set_ylabel(f"proxy score ({report['proxy']})", color=PROXY)
        for xi, p, stats in zip(x, points, [p["proxy"] for p in points]):
            ax.annotate(str(p["step"]), (xi, stats["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        judged_ax = ax
        if report["gold"]:
            right = judged_ax = ax.twinx()  # proxy and gold have unrelated scales
            lines.append(errorline(right, x, [p["gold"] for p in points], GOLD, role(report, report["gold"])))
            right.set_ylabel(f"gold score ({report['gold']})", color=GOLD)
        if recommended := report.get("recommended"):
            judged = recommended[recommended["by"]]["mean"]
            lines.append(judged_ax.plot([transform(recommended["kl"])], [judged], marker="*", markersize=16,
                                        color="tab:green", linestyle="none",
                                        label=f"recommended: step {recommended['step']}")[0])
        ax.set_xlabel(xlabel)
        ax.set_title(f"Reward vs {xlabel.split(' per')[0]} across checkpoints")
        ax.legend(handles=lines, fontsize=8, loc="best")
    figure.suptitle("Over-optimisation: does the gold score follow the proxy as the policy drifts? (labels: step)")
    figure.tight_layout()
    return figure


def errorline(ax, x, stats, color, label):
    """Means joined by a line, the 95% CI as a band (error bars of two twin axes would tangle)."""
    ax.fill_between(x, [s["ci95"][0] for s in stats], [s["ci95"][1] for s in stats], color=color, alpha=0.15)
    return ax.plot(x, [s["mean"] for s in stats], color=color, marker="o", label=label + " (band: 95% CI)")[0]


# ---------------------------------------------------------------------------------------------------
# Content, then Markdown and HTML


def role(report: dict, name: str) -> str:
    """A scorer's name with its part in the report: "rm (proxy)"; just "proxy" when that is its name."""
    part = "proxy" if name == report["proxy"] else "gold" if name == report["gold"] else "scorer"
    return name if name == part else f"{name} ({part})"


def ci(stats: dict, digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['mean'] - stats['ci95'][0]:.{digits}f}"


def fewer_checkpoint_prompts(report: dict) -> int | None:
    """How many prompts the checkpoints were evaluated on, where that is fewer than the policies' (else None)."""
    few = report["prompts"].get("checkpoints", report["prompts"]["count"])  # reports before checkpoint_prompts
    return few if report["checkpoints"] and few < report["prompts"]["count"] else None


def checkpoint_prompts(report: dict) -> str:
    few = fewer_checkpoint_prompts(report)
    return (f" The checkpoints are evaluated on the first {few} of these prompts (eval.checkpoint_prompts), each "
            f"against its reference on the same {few}.") if few else ""


def blocks(report: dict, images: dict[str, str]) -> list[tuple]:
    """The report as ("h1"|"h2"|"p", text), ("table", header, rows) and ("image", file, caption)."""
    results = report["policies"] + report["checkpoints"]
    sampling = report["sampling"]
    content = [
        ("h1", "rlft eval: reward and KL drift"),
        ("p", (f"{report['prompts']['count']} held-out prompts from {report['prompts']['source']}; each policy "
               f"and its reference (the same model, adapter disabled) sample one response per prompt with seed "
               f"{report['seed']}, temperature {sampling['temperature']}, top_p {sampling['top_p']}, top_k "
               f"{sampling['top_k']}, at most {sampling['max_new_tokens']} new tokens. Values are mean ± the half "
               f"width of a 95% confidence interval. Proxy scorer: {report['proxy']}; gold scorer: "
               f"{report['gold'] or 'none'}." + checkpoint_prompts(report))),
        ("h2", "Rewards"),
        ("table", ["Policy", "Scorer", "Policy score", "Reference score", "Win rate vs reference"],
         [[r["label"], role(report, name), ci(s["policy"]), ci(s["reference"]),
           f"{s['win_rate']['mean']:.0%} ± {s['win_rate']['mean'] - s['win_rate']['ci95'][0]:.0%}"]
          for r in results for name, s in r["rewards"].items()]),
        ("p", "Win rate: share of prompts where the policy's response outscores the reference's; ties count half."),
        ("h2", "KL drift and responses"),
        ("table", ["Policy", "Reference", "KL exact", "KL sampled (k1)", "Per-token KL p50 / p99 / max",
                   "Length (policy / ref)", "EOS rate (policy / ref)"],
         [[r["label"], r["reference_adapter"] or f"base ({r['base_model']})", ci(r["kl"]["exact"]),
           ci(r["kl"]["sampled"]),
           " / ".join(f"{r['kl']['per_token_exact'][q]:.3f}" for q in ("p50", "p99", "max")),
           f"{r['response']['policy']['length']['mean']:.1f} / {r['response']['reference']['length']['mean']:.1f}",
           f"{r['response']['policy']['eos_rate']:.0%} / {r['response']['reference']['eos_rate']:.0%}"]
          for r in results]),
        ("p", ("KL(pi || pi_ref) in nats per response, on the policy's own samples: exact sums the full-vocabulary "
               "KL of every response token; sampled sums log pi - log pi_ref of the sampled tokens (unbiased, "
               "noisier, can be negative). The two agree in expectation; with top_p or top_k set they need not.")),
    ]
    content[2:2] = warning_blocks(report, results)
    if results:
        content += [("image", images["rewards"], "Reward per scorer: policy vs reference"),
                    ("image", images["kl"], "Per-token and per-response KL")]
    if "training" in images:
        content += [("h2", "Training curves"), ("p", f"From {report['training']['run']}/metrics.jsonl."),
                    ("image", images["training"], "PPO training curves")]
    if report["checkpoints"]:
        gold = report["gold"]
        content += [
            ("h2", "Over-optimisation across checkpoints"),
            ("table", ["Step", "KL exact", "sqrt KL", f"Proxy ({report['proxy']})", f"Gold ({gold or 'none'})"],
             [[str(p["step"]), f"{p['kl']:.3f}", f"{math.sqrt(p['kl']):.3f}", ci(p["proxy"]),
               ci(p["gold"]) if gold else "-"] for p in overoptimization_points(report)]),
            ("p", ("Step 0 is the reference. A proxy that keeps rising while gold falls is the policy exploiting "
                   "the reward model (Gao et al. 2022, 'Scaling laws for reward model overoptimization').")),
            ("image", images["overoptimization"], "Proxy and gold reward vs KL"),
        ]
    content += hacking_blocks(report, results)
    for r in report["policies"]:
        if r["samples"]:
            content += [("h2", f"Samples: {r['label']}"),
                        ("table", ["Prompt", "Reference", "Policy", "Scores (reference → policy)"],
                         [[s["prompt"], s["reference"], s["policy"],
                           "; ".join(f"{n} {v['reference']:.2f} → {v['policy']:.2f}" for n, v in s["scores"].items())]
                          for s in r["samples"]])]
    return content


def warning_blocks(report: dict, results: list[dict]) -> list[tuple]:
    """What a reader must see first: policies whose replies collapsed (rlft.hacking.collapse)."""
    collapsed = [(r["label"], warnings) for r in results
                 if (warnings := r.get("hacking", {}).get("collapse", {}).get("warnings"))]
    if not collapsed:
        return []
    return [("h2", "Warnings"),
            ("table", ["Policy", "Its replies collapsed against the reference's"],
             [[label, "; ".join(warnings)] for label, warnings in collapsed]),
            ("p", "A collapsed policy found a few replies its reward model likes; a gold judge that can be pleased "
                  "the same way (a short positive reply) shares the blind spot. No collapsed checkpoint is "
                  "recommended.")]


def recommendation(report: dict) -> str:
    """The checkpoint to ship, and how it stands against the one the PPO run kept as its result."""
    point = report["recommended"]
    if point is None:
        text = "No checkpoint fits the KL budget without collapsing."
    else:
        text = (f"Recommended checkpoint: step {point['step']}{' (the reference itself)' if point['step'] == 0 else ''}, "
                f"the best {point['by']} score ({ci(point[point['by']])}) at KL {point['kl']:.2f}, within the budget of "
                f"{report['kl_budget'] or 'no limit'} and not collapsed (starred on the over-optimisation plot).")
    kept = report.get("training_result")
    if kept is None:
        return text
    if kept.get("result_scale", 1.0) != 1.0:  # its result is none of the checkpoints evaluated here
        return text + (f" The PPO run kept step {kept['result_step']} with its update scaled by "
                       f"{kept['result_scale']:.3g} to land its KL on the target (KL {kept['result_kl']:.2f} by its "
                       f"own measurement, budget {kept['kl_budget']:g}); the checkpoints here are unscaled.")
    if point is not None and point["step"] == kept["result_step"]:
        return text + " It is the checkpoint the PPO run kept as its result."
    measured = {p["step"]: p for p in overoptimization_points(report)}.get(kept["result_step"])
    if measured is None:
        why = "that checkpoint is not among those evaluated here"
    elif report["kl_budget"] and measured["kl"] > report["kl_budget"]:
        why = f"its KL on these prompts, {measured['kl']:.2f}, is past the budget"
    elif measured.get("collapsed"):
        why = "its replies collapsed"
    else:
        why = f"another checkpoint scores higher under {point['by']}"
    return text + (f" The PPO run kept step {kept['result_step']} as its result (KL {kept['result_kl']:.2f} by its own "
                   f"measurement, budget {kept['kl_budget']:g}); this report differs because {why}.")


def correlation(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def hacking_blocks(report: dict, results: list[dict]) -> list[tuple]:
    """The reward-hacking section: length, proxy-gold disagreement, diversity, and the checkpoint to ship."""
    names = list(results[0]["rewards"]) if results else []
    content = [
        ("h2", "Reward hacking"),
        ("table", ["Policy", "Length shift (tokens)",
                   *[f"Spearman(score, length) {role(report, n)}: policy / ref" for n in names],
                   "Proxy prefers policy, gold prefers ref", "distinct-1 (policy / ref)", "distinct-2 (policy / ref)",
                   "self-BLEU (policy / ref)"],
         [[r["label"], f"{h['length_shift']:+.1f}",
           *[f"{correlation(h['length_correlation'][n]['policy'])} / {correlation(h['length_correlation'][n]['reference'])}"
             for n in names],
           "-" if h["disagreement_rate"] is None else f"{h['disagreement_rate']:.0%}",
           *[f"{h['diversity']['policy'][k]:.3f} / {h['diversity']['reference'][k]:.3f}"
             for k in ("distinct_1", "distinct_2", "self_bleu")]]
          for r in results if (h := r.get("hacking"))]),
        ("p", ("Signs of a policy pleasing its reward model rather than the task: a score that follows length "
               "(and a length that moved), prompts where the proxy and the gold judge disagree about which reply "
               "is better, and samples that lost diversity against the reference's (distinct-n falls, self-BLEU "
               "rises: mode collapse). Distinct-n: unique / all n-grams over the samples; self-BLEU: mean BLEU-4 "
               "of each sample against the others.")),
    ]
    if "recommended" in report:
        content.append(("p", recommendation(report)))
    return content


def to_markdown(content: list[tuple]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>") or " "

    lines = []
    for kind, *rest in content:
        if kind == "h1":
            lines += [f"# {rest[0]}", ""]
        elif kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows] + [""]
        elif kind == "image":
            lines += [f"![{rest[1]}]({rest[0]})", ""]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}p{line-height:1.45}"""


def to_html(content: list[tuple], folder: Path) -> str:
    """One file with every image inside it, to mail or attach as is."""
    parts = []
    for kind, *rest in content:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c)).replace(chr(10), '<br>')}</td>" for c in row)
                           + "</tr>" for row in rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "image":
            data = base64.b64encode((Path(folder) / rest[0]).read_bytes()).decode()
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">')
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>rlft eval report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
