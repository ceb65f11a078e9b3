"""The report of a paired comparison (``launch/compare.py``): statistics per arm and eval split, each arm's paired
difference from the first, and the files that show them (JSON, Markdown, two PNG plots)."""

from __future__ import annotations

import os
from typing import Dict, List

from htr_dist.experiment import mean_std, paired_difference
from htr_dist.io_utils import atomic_path, atomic_write_json, atomic_write_text

METRICS = ("cer", "wer")


def summarize(arms: list, seeds: List[int], evals: List[str], runs: List[dict]) -> dict:
    """``runs`` (one dict per arm and seed, with ``scores[split][metric]`` and ``minutes``) into the report: per arm
    the mean +- std of each metric per split and of the minutes, and for every arm after the first its difference
    from the first arm, paired by seed."""
    by = {(r["arm"], r["seed"]): r for r in runs}

    def values(arm: str, split: str, metric: str) -> List[float]:
        return [by[(arm, s)]["scores"][split][metric] for s in seeds]

    results = {}
    for arm in arms:
        res = {split: {m: mean_std(values(arm.name, split, m)) for m in METRICS} for split in evals}
        res["minutes"] = mean_std([by[(arm.name, s)]["minutes"] for s in seeds])
        results[arm.name] = res
    base = arms[0].name
    paired = {arm.name: {split: {m: paired_difference(values(base, split, m), values(arm.name, split, m))
                                 for m in METRICS} for split in evals} for arm in arms[1:]}
    return {"arms": [{"name": a.name, "overrides": a.overrides} for a in arms], "baseline": base, "seeds": seeds,
            "eval": evals, "results": results, "paired": paired, "runs": runs}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(report: dict) -> str:
    evals, base, seeds = report["eval"], report["baseline"], report["seeds"]
    lines = [f"Config `{report.get('config', '?')}` {' '.join(report.get('overrides', []))}".rstrip()
             + f", seeds {', '.join(map(str, seeds))}; mean +- std over the seeds, in %.", ""]
    head = ["arm", "overrides"] + [f"{s} {m.upper()}" for m in METRICS for s in evals] + ["minutes/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in report["arms"]:
        res = report["results"][arm["name"]]
        cells = [arm["name"], " ".join(f"`{o}`" for o in arm["overrides"]) or "-"]
        cells += [f"{_pct(res[s][m]['mean'])} +- {_pct(res[s][m]['std'])}" for m in METRICS for s in evals]
        cells.append(f"{res['minutes']['mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if report["paired"]:
        lines += ["", f"Difference from `{base}`, paired by seed (CER points; negative = fewer errors than `{base}`), "
                  f"with its 95% confidence interval over {len(seeds)} seed(s):", "",
                  "| arm | split | CER diff | 95% CI | relative | CI excludes 0 |", "|---|---|---|---|---|---|"]
        for name, per_split in report["paired"].items():
            for split in evals:
                d = per_split[split]["cer"]
                ci = f"[{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]" if d["ci95"] else "n/a (one seed)"
                rel = f"{100 * d['relative']:+.1f}%" if d["relative"] is not None else "n/a"
                lines.append(f"| {name} | {split} | {100 * d['mean']:+.2f} | {ci} | {rel} | "
                             f"{'yes' if d['excludes_zero'] else 'no'} |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay ``fig`` out, write it to ``path`` whole or not at all (the format from the extension), and free it."""
    fig.tight_layout()
    with atomic_path(path, os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp)
    pyplot().close(fig)


def plot_curves(report: dict, path: str) -> None:
    """Val CER against step: per validation split a panel, per arm the mean over seeds and a min-max band."""
    plt = pyplot()
    splits = sorted({s for r in report["runs"] for s in r["curves"]})
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.5 * max(1, len(splits)), 4), dpi=110, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for i, arm in enumerate(a["name"] for a in report["arms"]):
            per_step: Dict[int, list] = {}
            for r in report["runs"]:
                if r["arm"] == arm:
                    for _, step, cer in r["curves"].get(split, []):
                        per_step.setdefault(step, []).append(100 * cer)
            steps = sorted(per_step)
            if not steps:
                continue
            mean = [sum(per_step[s]) / len(per_step[s]) for s in steps]
            ax.plot(steps, mean, marker="o", markersize=3, color=f"C{i % 10}", label=arm)
            ax.fill_between(steps, [min(per_step[s]) for s in steps], [max(per_step[s]) for s in steps],
                            color=f"C{i % 10}", alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} CER (%)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_scores(report: dict, path: str) -> None:
    """Test CER per eval split and arm: a bar at the mean, a dot per seed."""
    plt = pyplot()
    evals, arms = report["eval"], [a["name"] for a in report["arms"]]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(evals) * len(arms) ** 0.5, 4), dpi=110)
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(evals))]
        ax.bar(xs, [100 * report["results"][arm][s]["cer"]["mean"] for s in evals], width, color=f"C{i % 10}",
               alpha=0.6, label=arm)
        for x, split in zip(xs, evals):
            pts = [100 * r["scores"][split]["cer"] for r in report["runs"] if r["arm"] == arm]
            ax.plot([x] * len(pts), pts, "o", color="black", markersize=3)
    ax.set_xticks(range(len(evals)))
    ax.set_xticklabels(evals)
    ax.set_ylabel("CER (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(report: dict, out: str) -> Dict[str, str]:
    """compare.json, compare.md, val_cer.png and cer.png in ``out``; returns their paths."""
    paths = {k: os.path.join(out, name) for k, name in
             (("json", "compare.json"), ("md", "compare.md"), ("curves", "val_cer.png"), ("scores", "cer.png"))}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], markdown(report))
    plot_curves(report, paths["curves"])
    plot_scores(report, paths["scores"])
    return paths
