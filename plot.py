"""Draw a run's curves from its metrics.jsonl into one PNG: training and validation loss against tokens,
then the learning rate and the throughput, with resumes and skipped steps marked.

    python plot.py EXPERIMENT_DIR [--output FILE]      (default: EXPERIMENT_DIR/metrics.png)

Needs matplotlib (pip install matplotlib); train.py does not.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line cut short by a crash: train.py drops it on resume
            pass
    return lines


def token_axis(train: list[dict]):
    """x of a line, in millions of tokens seen: the training lines count them, across resumes that changed the
    batch; the other lines (validation, resumes, skipped steps) sit between the training lines around their step."""
    steps, seen = [0] + [line["step"] for line in train], [0] + [line["tokens"] for line in train]
    return lambda line: (line["tokens"] if "tokens" in line else float(np.interp(line["step"], steps, seen))) / 1e6


def plot(exp: Path, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    lines = read(exp / "metrics.jsonl")
    train = [line for line in lines if "loss" in line]
    if not train:
        raise ValueError(f"{exp / 'metrics.jsonl'} has no training line yet")
    tokens = token_axis(train)

    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(3, 1, figsize=(9, 9), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1, 1]})
    ax_loss.plot([tokens(l) for l in train], [l["loss"] for l in train], label="training loss", color="tab:blue")
    val = [line for line in lines if "val_loss" in line]
    if val:
        ax_loss.plot([tokens(l) for l in val], [l["val_loss"] for l in val], "o-", label="validation loss",
                     color="tab:orange", markersize=4)
    for line in lines:
        if line.get("resumed"):
            for ax in (ax_loss, ax_lr, ax_speed):
                ax.axvline(tokens(line), color="gray", linestyle="--", linewidth=0.8)
            ax_loss.annotate(f"resumed at {line['step']}", (tokens(line), 1), xycoords=("data", "axes fraction"),
                             rotation=90, va="top", ha="right", fontsize=8, color="gray")
    skipped = [line for line in lines if "skipped" in line]
    if skipped:
        low = min(l["loss"] for l in train)
        ax_loss.plot([tokens(l) for l in skipped], [low] * len(skipped), "x", color="tab:red",
                     label=f"skipped steps ({len(skipped)})")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{exp.name}: {train[-1]['step']} steps, {train[-1]['tokens'] / 1e6:,.1f}M tokens")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([tokens(l) for l in train], [l["lr"] for l in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    ax_speed.plot([tokens(l) for l in train], [l["tokens_per_s"] / 1e3 for l in train], color="tab:purple")
    ax_speed.set_ylabel("k tokens/s")
    ax_speed.set_ylim(bottom=0)  # from zero, so that noise does not look like a slowdown
    ax_speed.set_xlabel("tokens seen (millions)")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir", type=Path, help="a run.experiment_dir with a metrics.jsonl")
    parser.add_argument("--output", type=Path, help="the PNG to write (default: EXPERIMENT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    try:
        out = plot(args.experiment_dir, args.output or args.experiment_dir / "metrics.png")
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: a line of values that are not numbers
        print(f"error: {args.experiment_dir}: can't plot its metrics.jsonl ({e})", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
