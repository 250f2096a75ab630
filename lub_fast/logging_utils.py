"""Run-directory logs of the training loop: ``metrics.jsonl``, TensorBoard, and ``loss.png``.

``metrics.jsonl`` holds one JSON object per line: training records
``{"split": "train", "step": ..., "loss": ..., "lr": ..., "tokens_per_s": ..., <objective metrics>}``
and evaluation records ``{"split": "eval", "step": ..., <eval metrics>}``. On resume the file is cut
back to the records at or before the resumed step (and a line half-written by a killed process is
dropped), so the file always describes one consistent history. TensorBoard event files go to
``run_dir/tensorboard`` when the ``tensorboard`` package is installed. ``plot_metrics`` draws the
loss and every objective metric (e.g. masked-token accuracy), train and eval, with matplotlib's
Agg backend.
"""

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Fields of training records that are bookkeeping, not curves to plot.
_NOT_PLOTTED = {
    "split",
    "step",
    "micro_step",
    "samples",
    "tokens",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "loss_scale",
    "skipped_steps",
}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file; an unparsable line (a killed writer's last line)
    is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``resume_step``: cut the existing file back to records with ``step <= resume_step`` (``None``
    for a fresh run, which starts a new file).
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(_finite(record)) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and key not in ("split", "step"):
                    self._tensorboard.add_scalar(f"{split}/{key}", value, record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _finite(record: dict) -> dict:
    """JSON has no NaN/Infinity: write non-finite floats as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _tensorboard_writer(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # purge_step drops events newer than the resumed step that a killed run had written.
    return SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Plot ``loss`` and every objective metric of ``metrics_path`` (train lines, eval markers)
    into ``png_path``; ``None`` (with a log message) when matplotlib is missing or nothing was
    logged."""
    try:
        # The object-oriented API: no pyplot state and no process-wide backend, so a caller's own
        # matplotlib setup is untouched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written to %s", png_path)
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    keys = ["loss"] + sorted(
        {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - _NOT_PLOTTED
        - {"loss"}
        - {k for r in records for k in r if k.startswith("num_")}
    )
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    fig = Figure(figsize=(4.5 * len(keys), 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label="train", linewidth=1)
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label="eval", markersize=4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    return png_path
