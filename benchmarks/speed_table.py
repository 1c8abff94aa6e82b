"""Write the speed table of benchmarks/README.md from the results in benchmarks/results/ (no benchmark runs here).

    python benchmarks/speed_table.py           # after ppo_step.py, decode.py and sft_dtype.py wrote their JSON

Reads ppo_step_gae.json (16 completions x 32 tokens), ppo_step_64x64.json when there is one, decode.json,
decode_natural.json and sft_dtype.json, and writes one table between the `<!-- speed -->` markers of
benchmarks/README.md, each row naming the file it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlft.results import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

MARKERS = ("<!-- speed: figures from benchmarks/results/*.json -->", "<!-- /speed -->")


def ppo_row(name: str) -> str:
    report = json.loads((RESULTS / name).read_text())
    settings, rlft, trl = report["settings"], report["results"]["rlft"], report["results"]["trl"]
    peers = ", ".join(f"{dtype} {value:.2f}" for dtype, value in report.get("trl_by_dtype", {}).items())
    return (f"| PPO step, {settings['completions']} completions x {settings['max_new_tokens']} tokens "
            f"(`{name}`) | rlft {rlft['dtype']} {rlft['completions_per_s']:.2f} completions/s, peak RSS "
            f"{rlft['peak_rss_mib']:.0f} MiB | TRL GRPOTrainer at its fastest, {trl['dtype']}: "
            f"{trl['completions_per_s']:.2f} ({peers}), {trl['peak_rss_mib']:.0f} MiB | "
            f"**{report['ratios']['completions_per_s']:.2f}x** completions/s, "
            f"{report['ratios']['peak_rss_mib']:.2f}x peak RSS |")


def decode_rows() -> list[str]:
    report = json.loads((RESULTS / "decode.json").read_text())
    rows = []
    for batch in sorted({run["rows"] for run in report["runs"].values()}):
        runs = {name.rsplit("_", 1)[0]: run for name, run in report["runs"].items() if run["rows"] == batch}
        fastest = max((name for name in runs if name != "rlft" and not name.startswith("rlft_")),
                      key=lambda name: runs[name]["tokens_per_s"])
        rlft = runs["rlft"]["tokens_per_s"]
        rows.append(f"| Decode, {batch} rows x {report['new_tokens']} tokens (`decode.json`) | rlft's sampler "
                    f"{rlft:.0f} tokens/s | fastest outside rlft (`{fastest}`): "
                    f"{runs[fastest]['tokens_per_s']:.0f} | **{rlft / runs[fastest]['tokens_per_s']:.0%}** of it |")
    return rows


def natural_decode_rows() -> list[str]:
    """Sampling to EOS (decode.py --natural): rlft against HF generate and against keeping ended rows in."""
    report = json.loads((RESULTS / "decode_natural.json").read_text())
    rows = []
    for batch in sorted({run["rows"] for run in report["runs"].values()}):
        runs = {name.rsplit("_", 1)[0]: run["tokens_per_s"] for name, run in report["runs"].items()
                if run["rows"] == batch}
        rows.append(f"| Decode to EOS, {batch} rows, the quickstart's SFT model (`decode_natural.json`) | rlft's "
                    f"sampler {runs['rlft']:.0f} tokens/s | HF generate, merged weights {runs['hf_merged']:.0f}; "
                    f"rlft keeping ended rows in {runs['rlft_full_batch']:.0f} | **{runs['rlft'] / runs['hf_merged']:.2f}x** "
                    f"HF, {runs['rlft'] / runs['rlft_full_batch']:.2f}x the full batch |")
    return rows


def sft_row() -> str:
    report = json.loads((RESULTS / "sft_dtype.json").read_text())
    fp32, bf16 = report["float32"], report["bfloat16"]
    return (f"| SFT, `configs/sft.yaml` ({bf16['steps']} steps, `sft_dtype.json`) | bfloat16 "
            f"{bf16['train_time_s']:.0f} s, eval loss {bf16['eval_loss_after']:.3f} | float32 "
            f"{fp32['train_time_s']:.0f} s, eval loss {fp32['eval_loss_after']:.3f} | "
            f"**{report['bf16_train_speedup']:.2f}x**, eval loss {report['bf16_eval_loss_minus_fp32']:+.4f} |")


def main() -> None:
    machine = json.loads((RESULTS / "ppo_step_gae.json").read_text())["machine"]
    rows = [ppo_row(name) for name in ("ppo_step_gae.json", "ppo_step_64x64.json") if (RESULTS / name).is_file()]
    rows += [*decode_rows(), *natural_decode_rows(), sft_row()]
    text = "\n".join([
        f"On {machine['cpu']} ({machine['cores']} cores, bf16 instructions: "
        f"{', '.join(machine['bf16_instructions']) or 'none'}), one benchmark at a time; each file in "
        "`benchmarks/results/` holds its command, settings and versions. Written by benchmarks/speed_table.py.",
        "", "| What | rlft | Peer | Ratio |", "|---|---|---|---|", *rows]) + "\n"
    write_between_markers(ROOT / "benchmarks" / "README.md", MARKERS, text)
    print(text)


if __name__ == "__main__":
    main()
