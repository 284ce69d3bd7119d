"""runs/<run-id>/report.md: the run at a glance — summary table, curves of every stage, and
before/after replies to held-out prompts. Plots need matplotlib (`pip install -e ".[plot]"`);
without it the report is still written, with a note on how to get the pictures.

    python -m tinygrad_llm.report runs/<run-id>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# the curves worth looking at first, per stage (other numeric metrics follow, up to MAX_PANELS)
PREFERRED = {
    "pretrain": ["loss", "val_loss", "val_bpc", "grad_norm", "tokens_per_s"],
    "sft": ["loss", "val_loss", "grad_norm", "tokens_per_s", "chat_acceptable"],
    "reward": ["loss", "accuracy", "val_accuracy", "margin", "val_margin"],
    # chat_*: the chat evaluation (chat_eval.py) at each guard check, beside the RM score of those replies
    "rlhf": ["score", "kl", "chat_acceptable", "chat_rm_score", "chat_refusal", "chat_loop", "penalty", "rlhf_reward",
             "clip_frac", "approx_kl", "entropy", "value_loss", "eos_rate", "explained_var", "reply_len"],
    "rlvf": ["reward", "accuracy", "val_accuracy", "zero_var_share", "kl", "entropy", "reply_len"],
}
PAIRS = {"loss": "val_loss", "accuracy": "val_accuracy", "margin": "val_margin"}  # drawn on one panel
MAX_PANELS = 16
SKIP = {"step", "stage", "lr"}


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_stage(stage: str, rows: list[dict], out: Path) -> Path | None:
    """One PNG per stage with a panel per metric; None when matplotlib is missing or no data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in PREFERRED.get(stage, []) if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in SKIP} - set(keys))
    keys = [k for k in keys if k not in PAIRS.values() or not any(PAIRS.get(a) == k and a in keys for a in keys)]
    keys = keys[:MAX_PANELS]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for k, style in ((key, "-"), (PAIRS.get(key), "o-")):
            if k and any(k in r for r in rows):
                xs, ys = _series(rows, k)
                ax.plot(xs, ys, style, ms=3, label=k)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if PAIRS.get(key) and any(PAIRS[key] in r for r in rows):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{stage}")
    fig.tight_layout()
    path = out / f"{stage}_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_report(run_dir) -> str:
    """Write run_dir/report.md (+ PNGs); returns a one-line message for the console."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")) if (run_dir / "summary.json").exists() else {}
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    lines = [f"# MyLLM run `{run_dir.name}`", "", "| stage | time | headline |", "|---|---|---|"]
    for stage, fig in summary.items():
        if isinstance(fig, dict):
            lines.append(f"| {stage} | {fig.get('time_s', 0):.0f}s | {_md_escape(fig.get('headline', ''))} |")
    short = [f"{stage} {fig['length']:,} of {fig['full_length']:,}" for stage, fig in summary.items()
             if isinstance(fig, dict) and "length" in fig and fig["length"] != fig["full_length"]]
    if short:
        lines += ["", f"Shortened to end within the time budget (`--budget-min`, tinygrad_llm/budget.py): "
                      f"{', '.join(short)} (steps, episodes or iterations); `--budget-min 0` runs the full schedule."]
    plotted = False
    for stage in summary:
        stage_rows = [r for r in rows if r.get("stage") == stage]
        lines += ["", f"## {stage}", ""]
        figures = {k: v for k, v in summary[stage].items() if isinstance(v, (int, float, str)) and k != "headline"}
        if figures:
            lines.append(", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in figures.items()))
            lines.append("")
        png = plot_stage(stage, stage_rows, run_dir) if stage_rows else None
        if png:
            plotted = True
            lines += [f"![{stage} curves]({png.name})", ""]
        samples = summary[stage].get("samples") or []
        if samples:
            lines += ["| prompt | before | after |", "|---|---|---|"]
            lines += [f"| {_md_escape(s.get('prompt', ''))} | {_md_escape(s.get('before', ''))} | "
                      f"{_md_escape(s.get('after', ''))} |" for s in samples]
    if not plotted and rows:
        lines += ["", "_Plots need matplotlib: `pip install -e \".[plot]\"`, then "
                  f"`python -m tinygrad_llm.report {run_dir}`._"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    note = "" if plotted or not rows else " (no plots: pip install -e \".[plot]\" for them)"
    return f"report: {run_dir / 'report.md'}{note}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tinygrad_llm.report runs/<run-id>", file=sys.stderr)
        sys.exit(2)
    print(write_report(sys.argv[1]))
