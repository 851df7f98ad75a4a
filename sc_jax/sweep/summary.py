"""A sweep's summary: OUT/summary.md and OUT/summary.csv (one row per point) and
OUT/loss_curves.png (training loss against step, one line per point)."""

from __future__ import annotations

import csv
import os
from typing import Any


COLUMNS = [("steps_done", "steps done"), ("first_loss", "first loss"), ("final_loss", "final loss¹"),
           ("eval_loss", "eval loss²"), ("tokens_per_sec", "tokens/s³"), ("status", "status")]
FOOTNOTES = ("¹ mean training loss over the last 10% of logged steps (at least one).  \n"
             "² the last eval_loss record (train.eval_batches > 0), else blank.  \n"
             "³ median over logged steps that have a speed (a process's first step includes compilation and has none).")


def _fmt(key: str, v: Any, steps: int) -> str:
    if v is None:
        return ""
    if key == "steps_done":
        return f"{v}/{steps}"
    if key == "tokens_per_sec":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def write_summary(out: str, results: list[dict], grid_keys: list[str], steps: int, log_y: bool = False) -> str:
    """Writes summary.md, summary.csv and loss_curves.png in `out`; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    cols = ["point", *grid_keys, *(k for k, _ in COLUMNS)]
    with open(os.path.join(out, "summary.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow(["" if r.get(c) is None else r[c] for c in cols])
    os.replace(os.path.join(out, "summary.csv.tmp"), os.path.join(out, "summary.csv"))
    header = ["point", *grid_keys, *(h for _, h in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_fmt(c, r.get(c), steps) for c in cols) + " |")
    md = "\n".join(lines) + "\n\n" + FOOTNOTES + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Sweep summary ({len(results)} points, {steps} steps each)\n\n{md}\n"
                f"![loss curves](loss_curves.png)\n")
    plot_curves(os.path.join(out, "loss_curves.png"), results, log_y)
    return md


def plot_curves(path: str, results: list[dict], log_y: bool = False) -> None:
    """Training loss against step, one line per point (eval losses as dots in the same colour)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for r in results:
        if not r["_curve"]:
            continue
        xs, ys = zip(*r["_curve"])
        (line,) = ax.plot(xs, ys, label=r["point"], linewidth=1.2, marker="." if len(xs) < 30 else None)
        if r["_eval"]:
            ex, ey = zip(*r["_eval"])
            ax.plot(ex, ey, linestyle="none", marker="o", color=line.get_color())
        plotted += 1
    if plotted:
        ax.legend(fontsize="small", loc="best")
        if log_y:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no logged steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log)" if log_y else ""))
    ax.set_title("loss curves" + (" (dots: eval loss)" if any(r["_eval"] for r in results) else ""))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def final_line(r: dict, steps: int) -> str:
    """What a point came to, printed after it ran."""
    if r["status"].startswith("failed"):
        return f"  {r['status']}"
    parts = [f"step {r['steps_done']}/{steps}"]
    if r["first_loss"] is not None:
        parts.append(f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}")
    if r["eval_loss"] is not None:
        parts.append(f"eval loss {r['eval_loss']:.4f}")
    if r["tokens_per_sec"]:
        parts.append(f"{r['tokens_per_sec']:,.0f} tokens/s")
    return f"  {'done' if r['status'] == 'done' else 'stopped'}: " + ", ".join(parts)

