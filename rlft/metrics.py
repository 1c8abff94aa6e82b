"""Per-step training metrics: written to metrics.jsonl and TensorBoard while PPO runs, read back by resume and eval.

One JSON object per line, `{"step": N, "objective/kl": ..., ...}`, under the same names as in TensorBoard
and the report.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlft.ppo.rollout import Rollout

log = logging.getLogger(__name__)
METRICS_JSONL = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl, one row per step in step order ([] if none). A run still training may have a
    partial last line, and a killed one a partial line in the middle: both are skipped; a repeated step
    keeps its last row."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not complete JSON (a run still writing?): skipped", path, number)
            continue
        if isinstance(row, dict) and "step" in row:
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


@contextmanager
def timed(times: dict[str, float], name: str):
    """Add the wall seconds the block takes to times["time/<name>"]."""
    started = time.perf_counter()
    yield
    times[f"time/{name}"] = times.get(f"time/{name}", 0.0) + time.perf_counter() - started


def _cell(text: str, width: int) -> str:
    """Text fit for one cell of a Markdown table."""
    return text[:width].replace("|", "/").replace("\n", " ")


class MetricsLogger:
    """Per-step metrics to metrics.jsonl and TensorBoard (main process only); samples to samples.jsonl."""

    def __init__(self, out: Path, start_step: int, active: bool):
        self.active, self.out, self.history = active, out, []
        self.writer = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        jsonl = out / METRICS_JSONL
        if jsonl.is_file():  # a resumed run rewrites the steps after its checkpoint
            self.history = [entry for entry in read_metrics(out) if entry["step"] <= start_step]
            jsonl.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        entry = {"step": step, **metrics}
        self.history.append(entry)
        with open(self.out / METRICS_JSONL, "a") as f:
            f.write(json.dumps(entry) + "\n")
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def samples(self, step: int, rollout: Rollout, count: int = 4) -> None:
        if not self.active:
            return
        rows = [{"step": step, "prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
                 "completion": completion, "score": round(float(score), 4)}
                for prompt, completion, score in zip(rollout.prompts, rollout.completions, rollout.scores)][:count]
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        table = "| prompt | completion | score |\n|---|---|---|\n" + "".join(
            f"| {_cell(r['prompt'], 80)} | {_cell(r['completion'], 160)} | {r['score']} |\n" for r in rows)
        self.writer.add_text("samples", table, step)
        for row in rows:
            log.info("step %d sample: %r -> %r (score %.3f)", step, row["prompt"][:60], row["completion"][:100],
                     row["score"])

    def summary(self) -> dict:
        """First and last steps' headline figures, and the run's mean throughput and time split."""
        if not self.history:
            return {}
        first, last = self.history[0], self.history[-1]
        keys = ("objective/scores", "objective/kl", "objective/kl_coef", "response/length", "response/eos_rate")
        summary = {"steps": last["step"]}
        summary.update({f"first/{k}": first.get(k) for k in keys})
        summary.update({f"last/{k}": last.get(k) for k in keys})
        for key in ("perf/samples_per_s", "perf/tokens_per_s", "time/generate", "time/score", "time/forward",
                    "time/update", "time/step"):
            values = [entry[key] for entry in self.history if key in entry]
            summary[f"mean/{key}"] = sum(values) / len(values) if values else None
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
