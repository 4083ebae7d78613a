"""Time to score: the default run against one with 10x the steps of every stage, 3 seeds each, and a plot of
normalized score vs wall-clock seconds (dataset generation and stage 1 included).

    python benchmark/time_to_score.py                                   # MPE: simple_spread expert
    python benchmark/time_to_score.py --script oma_sd_mamujoco.py       # HalfCheetah 2x3 expert
    python benchmark/time_to_score.py --report-only
    python benchmark/time_to_score.py --script oma_sd_mamujoco.py --report-only \
        --table-rows benchmark/results/mamujoco_hc2x3.jsonl   # plot table.py's default-command runs

Each run is a fresh process in its own empty working directory with an empty dataset directory (so dataset
generation and stage 1 are timed, nothing is reused), one after the other. Every finished run appends a line
to benchmark/results/time_to_score_<script>.jsonl; runs already there are skipped. The figure goes to
benchmark/figures/time_to_score_<script>.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE10 = {
    "oma_sd_mpe.py": [
        "--diffusion-steps",
        "100000",
        "--critic-steps",
        "100000",
        "--policy-steps",
        "50000",
        "--eval-every",
        "5000",
    ],
    "oma_sd_mamujoco.py": [
        "--diffusion-steps",
        "300000",
        "--critic-steps",
        "100000",
        "--policy-steps",
        "50000",
        "--eval-every",
        "10000",
    ],
}


@dataclass
class Cfg:
    script: str = "oma_sd_mpe.py"
    """oma_sd_mpe.py | oma_sd_mamujoco.py (run with its defaults)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of each setting"""
    settings: tuple[str, ...] = ("default", "10x")
    """which settings to run"""
    report_only: bool = False
    """only summarise and plot what is in the results file"""
    table_rows: str = ""
    """plot the default-setting rows (sequential, on the --table-quality data) of a benchmark/table.py results file
    instead, e.g. benchmark/results/mamujoco_hc2x3.jsonl (those runs found their dataset already made, so its
    generation is not in their times)"""
    table_quality: str = "expert"
    """dataset quality of the --table-rows rows to plot (the scripts' default dataset is expert)"""


def results_file(cfg: Cfg) -> str:
    return os.path.join(REPO, "benchmark", "results", f"time_to_score_{cfg.script[:-3]}.jsonl")


def finished(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["setting"], r["seed"]) for r in map(json.loads, f)}


def run(cfg: Cfg):
    path = results_file(cfg)
    for setting in cfg.settings:
        for seed in cfg.seeds:
            if (setting, seed) in finished(path):  # read again before every run: several invocations can share the file
                continue
            extra = SCALE10[cfg.script] if setting == "10x" else []
            cmd = [sys.executable, os.path.join(REPO, cfg.script), "--seed", str(seed), *extra]
            print(">>", " ".join(cmd[1:]), flush=True)
            with tempfile.TemporaryDirectory() as wd:
                env = {**os.environ, "OMSD_DATA_DIR": os.path.join(wd, "data"), "PYTHONPATH": REPO}
                r = subprocess.run(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, text=True)
                if r.returncode:
                    sys.exit(f"run failed (exit {r.returncode}): {' '.join(cmd)}")
                with open(os.path.join(wd, r.stdout.strip().splitlines()[-1].split("-> ")[-1])) as f:
                    res = json.load(f)
            row = {
                "setting": setting,
                "seed": seed,
                "command": " ".join(["python", cfg.script, "--seed", str(seed), *extra]),
                "final_return": res["final_return"],
                "final_normalized_score": res["final_normalized_score"],
                "eval_history": res["eval_history"],
                "eval_seconds": res["eval_seconds"],
                "total_seconds": res["total_seconds"],
                "stages": res["stages"],
            }
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")


def report(cfg: Cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(cfg.table_rows or results_file(cfg)) as f:
        rows = [json.loads(line) for line in f]
    if cfg.table_rows:
        rows = [
            dict(r, setting="default")
            for r in rows
            if r["decomposition"] == "sequential" and r["quality"] == cfg.table_quality
        ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, color in (("default", "C0"), ("10x", "C1")):
        rs = [r for r in rows if r["setting"] == setting]
        if not rs:
            continue
        score = np.array([r["final_normalized_score"] for r in rs], dtype=float)
        secs = np.array([r["total_seconds"] for r in rs])
        print(
            f"{setting}: normalized score {score.mean():.1f} ± {score.std():.1f}, return "
            f"{np.mean([r['final_return'] for r in rs]):.1f}, "
            f"wall-clock {secs.mean() / 60:.1f} ± {secs.std() / 60:.1f} min "
            f"(seeds {sorted(r['seed'] for r in rs)}; e.g. `{rs[0]['command']}`)"
        )
        for k, r in enumerate(rs):
            ax.plot(
                r["eval_seconds"],
                [h["normalized_score"] for h in r["eval_history"]],
                color=color,
                alpha=0.8,
                label=f"{setting} ({len(rs)} seeds)" if k == 0 else None,
            )
    if len({r["setting"] for r in rows}) > 1:
        ax.set_xscale("log")  # the 10x runs take ten times as long
    else:
        ax.set_xlim(left=0)  # the time before the first evaluation is stage 1
    ax.set_xlabel(
        "wall-clock seconds since start\n(stage 1 included; dataset generation "
        + ("not included)" if cfg.table_rows else "included)")
    )
    ax.set_ylabel("normalized score")
    ax.set_title(f"{cfg.script}: time to score, 2 CPU cores")
    ax.legend()
    out = os.path.join(REPO, "benchmark", "figures", f"time_to_score_{cfg.script[:-3]}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"figure: {out}")


if __name__ == "__main__":
    cfg = tyro.cli(Cfg)
    if not cfg.report_only:
        run(cfg)
    report(cfg)
