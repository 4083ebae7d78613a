"""Samples per second of every stage of a training script, this checkout against another commit, in one run:

    python benchmark/speed.py --baseline REV           # oma_sd_mpe.py here vs REV at 1 thread and at all cores
    python benchmark/speed.py --baseline HEAD~3 --threads 1 --repeats 3
    python benchmark/speed.py --baseline REV --script oma_sd_mamujoco.py --extra="--env-id Hopper-3x1"
    python benchmark/speed.py --baseline REV --new-extra="--no-diffusion-bf16"   # a flag only this checkout has

Each commit's own script is run as a user would run it (`git archive` of the commit into a temporary directory;
this checkout's working tree as it is), on the same generated dataset (made once, outside the timings), with a
short budget of every stage, the actors started at random and no diagnostics. Each stage's samples/s come from
the run's own results.json (`stages.<stage>.steps_per_s` times the stage's batch size): stage 1a (behaviour models),
stage 1b (critic), stage 2 (actors, with its evaluations). Runs alternate between the two commits so that a change of
the machine's load hits both; the table gives the median over --repeats and the ratio new / baseline, at each
thread count and (a row "1 → all") with each commit at its own default --threads.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = (("diffusion", "diffusion_batch_size", "stage 1a: behaviour models"),
          ("critic", "critic_batch_size", "stage 1b: critic"),
          ("policy", "policy_batch_size", "stage 2: actors"))  # fmt: skip


@dataclass
class Cfg:
    baseline: str
    """the commit to compare with (anything `git archive` takes)"""
    script: str = "oma_sd_mpe.py"
    """oma_sd_mpe.py | oma_sd_mamujoco.py"""
    threads: tuple[int, ...] = (1, 0)
    """thread counts to measure (0: every core this process may use)"""
    baseline_default: int = 1
    """the baseline's default --threads: with it and 0 measured, a row compares the two defaults"""
    repeats: int = 1
    """runs per commit and thread count (the median is reported)"""
    steps: tuple[int, int, int] = (2000, 2000, 1000)
    """steps of stages 1a, 1b and 2 per run"""
    extra: str = ""
    """further flags of both runs, e.g. --env-id Hopper-3x1"""
    new_extra: str = ""
    """further flags of this checkout's runs only"""


def checkout(rev: str, into: str) -> str:
    """The tree of commit `rev` in `into` (the script and the packages it imports)."""
    os.makedirs(into)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"error: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def run(tree: str, cfg: Cfg, threads: int, work: str, data: str) -> dict:
    """One short run of the script of `tree`; returns {stage: samples/s}."""
    s1a, s1b, s2 = cfg.steps
    extra = cfg.extra + (" " + cfg.new_extra if tree == REPO else "")
    flags = (f"--threads {threads} --diffusion-steps {s1a} --critic-steps {s1b} --policy-steps {s2} --eval-every {s2} "
             f"--actor-init random --no-diagnostics --cache-dir {work}/cache --exp-name speed")  # fmt: skip
    cmd = [sys.executable, os.path.join(tree, cfg.script), *flags.split(), *shlex.split(extra)]
    env = {**os.environ, "OMSD_DATA_DIR": data, "PYTHONPATH": tree}
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    with open(os.path.join(work, r.stdout.strip().splitlines()[-1].split("-> ")[-1])) as f:
        res = json.load(f)
    subprocess.run(["rm", "-rf", os.path.join(work, "cache"), os.path.join(work, "runs")], check=True)
    return {k: res["stages"][k]["steps_per_s"] * res["args"][b] for k, b, _ in STAGES}


def main(cfg: Cfg):
    cores = len(os.sched_getaffinity(0))
    label = lambda threads: f"all ({cores})" if threads == 0 else str(threads)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": checkout(cfg.baseline, os.path.join(tmp, "baseline")), "new": REPO}
        data, work = os.path.join(tmp, "data"), os.path.join(tmp, "work")
        os.makedirs(work)
        print(f"making the dataset once ({cfg.script} {cfg.extra})", file=sys.stderr, flush=True)
        run(trees["new"], Cfg(**{**vars(cfg), "steps": (1, 1, 1)}), 1, work, data)
        rows = {}
        for threads in cfg.threads:
            got = {name: [] for name in trees}
            for rep in range(cfg.repeats):
                for name, tree in trees.items():  # alternate: a change of the machine's load hits both
                    print(f"{name}, threads {label(threads)}, run {rep + 1}", file=sys.stderr, flush=True)
                    got[name].append(run(tree, cfg, threads, work, data))
                    print("  " + ", ".join(f"{k} {v:,.0f}" for k, v in got[name][-1].items()), file=sys.stderr)
            rows[threads] = {n: {k: float(np.median([g[k] for g in v])) for k, _, _ in STAGES} for n, v in got.items()}
    print(f"{cfg.script} {cfg.extra}: samples/s, median of {cfg.repeats} run(s); baseline {cfg.baseline}, new = "
          f"this checkout {cfg.new_extra}; steps {cfg.steps}; {cores} cores allowed\n")  # fmt: skip
    print("| stage | threads | baseline | new | new / baseline |\n|---|---|---|---|---|")
    for k, _, name in STAGES:
        for threads, r in rows.items():
            b, n = r["baseline"][k], r["new"][k]
            print(f"| {name} | {label(threads)} | {b:,.0f} | {n:,.0f} | {n / b:.2f}× |")
        if 0 in rows and cfg.baseline_default in rows:  # each commit at its default --threads
            b, n = rows[cfg.baseline_default]["baseline"][k], rows[0]["new"][k]
            print(f"| {name} | {label(cfg.baseline_default)} → {label(0)} | {b:,.0f} | {n:,.0f} | {n / b:.2f}× |")


if __name__ == "__main__":
    main(tyro.cli(Cfg))
