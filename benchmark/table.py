"""OMSD sequential vs independent on the generated datasets: runs a grid, then writes the results table and a
learning-curve figure from the runs' results.json files.

    python benchmark/table.py --tasks simple_spread --qualities expert mixture --seeds 1 2 3
    python benchmark/table.py --report-only          # table + figure from benchmark/results/mpe*.jsonl
    python benchmark/table.py --family mamujoco --tasks HalfCheetah-2x3 --qualities expert medium

Every finished run appends one line to benchmark/results/<family>.jsonl (or --results), so an interrupted grid
keeps what it did; a cell already in any <family>*.jsonl (or in --results) is skipped, checked again before
each cell. Each cell's command is printed in the table.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SCRIPTS = {"mpe": "oma_sd_mpe", "mamujoco": "oma_sd_mamujoco"}

RESULTS_DIR = os.path.join(REPO, "benchmark", "results")


@dataclass
class Cfg:
    family: str = "mpe"
    """mpe (oma_sd_mpe.py) | mamujoco (oma_sd_mamujoco.py)"""
    tasks: tuple[str, ...] = ()
    """--env-id values to run (default: all of the family's)"""
    qualities: tuple[str, ...] = ()
    """dataset qualities to run (default: all of the family's)"""
    decompositions: tuple[str, ...] = ("sequential", "independent")
    seeds: tuple[int, ...] = (1, 2, 3)
    extra: str = ""
    """extra flags passed to the script for every run, as one string, e.g. --extra='--weighting alpha_over_sigma'"""
    report_only: bool = False
    """only write the table and the figure from the results files"""
    results: str = ""
    """file (in benchmark/results/) this grid appends to (default <family>.jsonl); the report reads every
    <family>*.jsonl there, so grids running in parallel can use their own files"""


def command(family, task, quality, dec, seed, extra):
    return " ".join([f"python {SCRIPTS[family]}.py", "--env-id", task, "--dataset", quality, "--decomposition", dec,
                     "--seed", str(seed), *extra.split()])


def load_rows(family, also=""):
    """Rows of every <family>*.jsonl in benchmark/results/, plus those of the file `also` (an ablation's)."""
    rows = []
    for name in sorted(os.listdir(RESULTS_DIR)) if os.path.isdir(RESULTS_DIR) else []:
        if (name.startswith(family) or name == also) and name.endswith(".jsonl"):
            with open(os.path.join(RESULTS_DIR, name)) as f:
                rows += [json.loads(line) for line in f]
    return rows


def run_grid(cfg: Cfg, om):
    os.chdir(REPO)
    for task in cfg.tasks or (om.TASKS if cfg.family == "mpe" else om.ENV_IDS):
        for quality in cfg.qualities or om.QUALITIES:
            for seed in cfg.seeds:
                for dec in cfg.decompositions:
                    cmd = command(cfg.family, task, quality, dec, seed, cfg.extra)
                    # read again before every cell: a grid running in parallel may have finished it meanwhile
                    if cmd in {r["command"] for r in load_rows(cfg.family, cfg.results)}:
                        continue
                    print(">>", cmd, flush=True)
                    args = tyro.cli(om.Args, args=cmd.split()[2:])
                    try:
                        res = om.main(args)
                    except (om.RunError, om.DatasetError) as e:
                        sys.exit(f"error: {e}")
                    row = {"command": cmd, "task": task, "quality": quality, "decomposition": dec, "seed": seed,
                           "beta": res["beta"], "final_return": res["final_return"],
                           "final_normalized_score": res["final_normalized_score"], "eval_history": res["eval_history"],
                           "eval_seconds": res["eval_seconds"], "total_seconds": res["total_seconds"],
                           "stages": res["stages"]}
                    os.makedirs(RESULTS_DIR, exist_ok=True)
                    with open(os.path.join(RESULTS_DIR, cfg.results or f"{cfg.family}.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")


def report(family, om):
    rows = load_rows(family)
    cells = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["quality"], r["decomposition"])].append(r)
    lines = ["| task | dataset | β | OMSD sequential: return (normalized) | independent: return (normalized) | seeds | command (seed 1) |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(t, q) for t, q, _ in cells}, key=lambda k: (k[0], om.QUALITIES.index(k[1])))
    for task, quality in keys:
        out, n, beta, cmd = [], [], "", ""
        for dec in ("sequential", "independent"):
            rs = cells.get((task, quality, dec), [])
            if not rs:
                out.append("–")
                continue
            ret = np.array([r["final_return"] for r in rs])
            nor = np.array([r["final_normalized_score"] for r in rs])
            out.append(f"{ret.mean():.1f} ± {ret.std():.1f} ({nor.mean():.1f} ± {nor.std():.1f})")
            n.append(len(rs))
            beta = rs[0]["beta"]
            cmd = cmd or sorted(rs, key=lambda r: r["seed"])[0]["command"].replace(" --decomposition sequential", "")
        lines.append(f"| {task} | {quality} | {beta} | {out[0]} | {out[1]} | {'/'.join(map(str, n))} | `{cmd}` |")
    print("\n".join(lines))
    curves(cells, family, om)


def curves(cells, family, om):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in (om.TASKS if family == "mpe" else om.ENV_IDS) if any(k[0] == t for k in cells)]
    qualities = [q for q in om.QUALITIES if any(k[1] == q for k in cells)]
    fig, axes = plt.subplots(len(tasks), len(qualities), figsize=(3.2 * len(qualities), 2.6 * len(tasks)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for (r, task), (c, quality) in ((rt, cq) for rt in enumerate(tasks) for cq in enumerate(qualities)):
        ax = axes[r][c]
        if not any(k[:2] == (task, quality) for k in cells):
            continue
        ax.set_visible(True)
        for dec, color in (("sequential", "C0"), ("independent", "C1")):
            rs = cells.get((task, quality, dec), [])
            if not rs:
                continue
            steps = [h["step"] for h in rs[0]["eval_history"]]
            ys = np.array([[h["normalized_score"] for h in r["eval_history"]] for r in rs])
            ax.plot(steps, ys.mean(0), color=color, label=f"{dec} ({len(rs)} seeds)")
            ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
        ax.set_title(f"{task} {quality}", fontsize=9)
        ax.set_xlabel("policy steps", fontsize=8)
        ax.tick_params(labelsize=7)
        if c == 0:
            ax.set_ylabel("normalized score", fontsize=8)
        if (r, c) == (0, 0):
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(REPO, "benchmark", "figures", f"{family}_learning_curves.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=80)
    print("wrote", out)


if __name__ == "__main__":
    cfg = tyro.cli(Cfg)
    if cfg.family not in SCRIPTS:
        sys.exit(f"error: --family must be one of {', '.join(SCRIPTS)}, got {cfg.family!r}")
    om = __import__(SCRIPTS[cfg.family])
    if not cfg.report_only:
        run_grid(cfg, om)
    report(cfg.family, om)
