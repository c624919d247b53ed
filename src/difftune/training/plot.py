"""The loss plot written at the end of a run."""

from __future__ import annotations

from pathlib import Path

from difftune.events import read_events


def plot_loss(events_path: Path, out_path: Path) -> Path | None:
    """Plot training loss (and its moving average) by step from events.jsonl; None if no steps ran."""
    progress = read_events(events_path, "progress")
    if not progress:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {int(e["step"]): float(e["loss"]) for e in progress}  # a resumed run overwrites its steps
    steps = sorted(by_step)
    losses = [by_step[s] for s in steps]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
