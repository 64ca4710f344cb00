# Copyright 2026 The transformers-vgr authors.
# Licensed under the Apache License, Version 2.0.
"""The reinforcement-learning proof on the paper-tables task: a weak SFT checkpoint of its VGR row, GRPO from it
(`examples/train_grpo.py`), both scored through lmms-eval (`tables evaluate`), and here the curves and the table.

    python -m transformers_vgr.reference.rl_proof plot --log outputs/rl/grpo/training_log.json \\
        --output results/rl/curves.png
    python -m transformers_vgr.reference.rl_proof report --before outputs/rl/eval/sft/summary.json \\
        --after outputs/rl/eval/grpo/summary.json --results results/rl
    # several GRPO runs from one start, each named
    python -m transformers_vgr.reference.rl_proof report --before START.json --after accuracy=A.json cost=C.json \\
        --log accuracy=A/training_log.json cost=C/training_log.json --results results/rl/from-vgr

docs/reinforcement-learning.md has the whole sequence of commands and what they measured.
"""

import argparse
import json
from pathlib import Path

from ..cli import HelpFormatter


# The table's columns: (summary key, heading, format).
COLUMNS = [
    ("accuracy", "accuracy", "{:.1%}"),
    ("accuracy_one_region", "one region", "{:.1%}"),
    ("accuracy_two_region", "two regions", "{:.1%}"),
    ("accuracy_blurred", "blurred image", "{:.1%}"),
    ("text_box_mean_iou", "IoU, written box", "{:.3f}"),
    ("replays_per_answer", "replays / answer", "{:.2f}"),
    ("replayed_tokens_per_answer", "replayed tokens / answer", "{:.1f}"),
]
SMOOTHING = 10  # logged steps in the moving average drawn over the raw curves


def logged_steps(log: dict) -> list[dict]:
    """The training steps of a `training_log.json` (`examples/train_grpo.py`), each with its reward columns."""
    return [entry for entry in log["logs"] if "reward" in entry and "step" in entry]


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to `window - 1` before it."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot(log_file: Path, output: Path, held_out: dict[int, float] | None = None) -> Path:
    """A PNG of the rollouts' reward and each reward function's mean against step (raw and a moving average), with
    held-out accuracies (`{step: accuracy}`) as points beside the accuracy reward when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = logged_steps(json.loads(Path(log_file).read_text()))
    if not steps:
        raise ValueError(f"{log_file} has no logged training step with a reward")
    series = ["reward"] + sorted({key for entry in steps for key in entry if key.startswith("rewards/")})
    figure, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for axis, name in zip(axes[0], series):
        points = [(entry["step"], entry[name]) for entry in steps if entry.get(name) is not None]
        x, y = [step for step, _ in points], [value for _, value in points]
        axis.plot(x, y, color="0.75", linewidth=0.8, label="per step")
        axis.plot(x, moving_average(y, SMOOTHING), color="C0", linewidth=1.8, label=f"mean of {SMOOTHING} steps")
        if name == "rewards/accuracy_reward" and held_out:
            axis.plot(list(held_out), list(held_out.values()), "o", color="C3", label="held-out accuracy")
        axis.set_title(name.removeprefix("rewards/"))
        axis.set_xlabel("GRPO step")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


AFTER = "after GRPO"  # the name of a run given without one


def report(before: Path, after: Path | dict[str, Path], results: Path,
           log_file: Path | dict[str, Path] | None = None) -> str:
    """`results/rl.{json,md}`: the SFT start and the GRPO policies (`after`: one summary, or one per run by name)
    scored the same way, and each run's size (`log_file`: its training_log.json, likewise)."""
    runs = after if isinstance(after, dict) else {AFTER: after}
    logs = log_file if isinstance(log_file, dict) else ({} if log_file is None else {AFTER: log_file})
    start = json.loads(Path(before).read_text())
    rows = {"SFT start": start, **{name: json.loads(Path(path).read_text()) for name, path in runs.items()}}
    summary = {"rows": rows}
    for name, path in logs.items():
        log = json.loads(Path(path).read_text())
        summary.setdefault("grpo", {})[name] = {"steps": log["steps"], "minutes": log["train_runtime_seconds"] / 60}
    lines = ["| model | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(form.format(row[key]) for key, _, form in COLUMNS) + " |")
    lines.append("")
    for name in runs:
        change = rows[name]["accuracy"] - start["accuracy"]
        tokens = rows[name]["replayed_tokens_per_answer"], start["replayed_tokens_per_answer"]
        lines.append(f"{name}: held-out accuracy changed by {change * 100:+.1f} points; replayed tokens per answer "
                     f"{tokens[0]:.1f} against {tokens[1]:.1f}.")
    table = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / "rl.json").write_text(json.dumps(summary, indent=1))
    (results / "rl.md").write_text(table)
    return table


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("plot", help="reward curves of a GRPO run", formatter_class=HelpFormatter)
    curves.add_argument("--log", type=Path, required=True, help="the run's training_log.json")
    curves.add_argument("--output", type=Path, required=True, help="the PNG to write")
    curves.add_argument("--held-out", nargs="*", default=[], metavar="STEP=SUMMARY",
                        help="held-out accuracies to draw as points: a step and a `tables evaluate` summary.json")
    table = commands.add_parser("report", help="before / after table", formatter_class=HelpFormatter)
    table.add_argument("--before", type=Path, required=True, help="`tables evaluate`'s summary.json of the SFT start")
    table.add_argument("--after", nargs="+", required=True, metavar="[NAME=]SUMMARY",
                       help="the same for the GRPO policy, or for each of several runs by name")
    table.add_argument("--log", nargs="*", default=[], metavar="[NAME=]LOG",
                       help="each GRPO run's training_log.json (its steps and minutes), named as in --after")
    table.add_argument("--results", type=Path, required=True, help="where rl.json and rl.md go")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "plot":
        held_out = {}
        for point in args.held_out:
            step, _, summary = point.partition("=")
            if not summary:
                raise ValueError(f"--held-out takes STEP=SUMMARY, got {point!r}")
            held_out[int(step)] = json.loads(Path(summary).read_text())["accuracy"]
        print(plot(args.log, args.output, held_out))
    else:
        print(report(args.before, named_paths(args.after), args.results, named_paths(args.log)))


def named_paths(values: list[str]) -> dict[str, Path]:
    """`NAME=PATH` arguments by name; a bare `PATH` is the one run's (`AFTER`)."""
    named = {}
    for value in values:
        name, _, path = value.rpartition("=")
        named[name or AFTER] = Path(path)
    return named


if __name__ == "__main__":
    main()
