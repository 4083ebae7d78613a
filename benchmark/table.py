"""OMSD sequential vs independent on the generated datasets: runs a table's grid (task x quality x
decomposition x seed) as submitit jobs, then writes the table, rliable statistics and figures from the rows.

    python benchmark/table.py --family mpe --out runs/tables/mpe           # the whole MPE table, 2 runs at a time
    python benchmark/table.py --family mpe --out runs/tables/mpe --launcher slurm --slurm-partition cpu
    python benchmark/table.py --family mpe --out runs/tables/mpe --decompositions bc  # + a BC column
    python benchmark/table.py --report-only --out benchmark/results/spread   # the spread table from its rows
    python benchmark/table.py --family mamujoco --report-only --out runs/tables/mamujoco

Every finished run appends one row to <out>/<family>.jsonl (or <out>/<results>). Running the same command
again skips the cells whose command is already in that directory's <family>*.jsonl (or --results) file, and
nothing else: a fresh --out re-runs the whole table. A job that was killed or preempted continues where it
stopped when it runs again, through the scripts' own checkpoints (same command -> same run); Ctrl-C or `kill` of
this command stops its local jobs with it. Each cell's command
is printed in the table. docs/results.md, "Re-running a table", has the command of every table.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import submitit
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from omsd_utils.files import append_row  # noqa: E402

SCRIPTS = {"mpe": "oma_sd_mpe", "mamujoco": "oma_sd_mamujoco"}
LAUNCHERS = ("local", "slurm")
RESULTS_DIR = os.path.join(REPO, "benchmark", "results")
FIGURES_DIR = os.path.join(REPO, "benchmark", "figures")
DECOMPOSITIONS = ("sequential", "independent")
# a row per cell that is not OMSD: behaviour cloning on the same data (benchmark/bc_reference.py)
BASELINES = ("bc",)
# the datasets whose joint actions have several modes, where the paper expects sequential to beat independent
MULTIMODAL = ("mixture", "multimodal-2", "multimodal-3", "multimodal-3-soft")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local default (2 min) would stop every run; a week means never


@dataclass
class Cfg:
    family: str = "mpe"
    """mpe (oma_sd_mpe.py) | mamujoco (oma_sd_mamujoco.py)"""
    tasks: Annotated[tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: all of the family's)")] = ()
    """--env-id values to run"""
    qualities: Annotated[
        tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: the family's standard ones)")
    ] = ()
    """dataset qualities to run"""
    decompositions: tuple[str, ...] = DECOMPOSITIONS
    """OMSD's sequential and independent, and bc: behaviour cloning on the cell's data with the same actors,
    steps and evaluation (benchmark/bc_reference.py; --extra applies to it too)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds of every cell (settings are chosen on seed 0, so the tables use others)"""
    extra: str = ""
    """extra flags passed to the script for every run, as one string (shell quoting works),
    e.g. --extra='--weighting alpha_over_sigma'"""
    out: str = ""
    """results directory: the grid appends its rows here and skips the cells already here; figures go to
    <out>/figures. Needed to run a grid; --report-only defaults to benchmark/results (figures to benchmark/figures)"""
    results: str = ""
    """file in --out this grid appends to (default <family>.jsonl); the report reads every <family>*.jsonl there,
    so an ablation with its own file (e.g. ablation_z_baseline_mpe.jsonl) stays out of the table"""
    report_only: bool = False
    """only write the tables and figures from the results directory's rows"""
    launcher: str = "local"
    """local: jobs are subprocesses of this command, --parallel at a time | slurm: one job array on a cluster"""
    parallel: int = 2
    """local launcher: runs at the same time (with more than one, each has one torch thread; --extra='--threads N')"""
    slurm_partition: str = ""
    """SLURM partition (default: the cluster's)"""
    slurm_time: int = 240
    """SLURM time limit per job in minutes; a job that runs out is requeued and continues from its checkpoints"""
    slurm_cpus: int = 1
    """CPUs per SLURM job (a job's script uses all of them)"""
    slurm_mem_gb: int = 8
    """memory per SLURM job in GB"""
    slurm_array_parallelism: int = 32
    """SLURM jobs of the array running at the same time"""
    workdir: str = REPO
    """directory the runs start in: runs/ and the stage-1 cache runs/cache are created there (default the repo
    root, so every table shares one stage-1 cache)"""
    reps: int = 10000
    """bootstrap replicates of the confidence intervals"""


def fail(msg: str):
    """Bad input: one line, exit 2, as the scripts do."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def family_lists(family: str):
    """(tasks, standard qualities, every quality in table order) of a family, from the dataset modules."""
    if family == "mpe":
        from envs.mpe import TASKS
        from omsd_data.mpe_data import CONTROLLED, QUALITIES

        return TASKS, QUALITIES, QUALITIES + tuple(CONTROLLED)
    from envs.mamujoco import ENV_IDS
    from omsd_data.mamujoco_data import QUALITIES

    return ENV_IDS, QUALITIES, QUALITIES


def task_qualities(family: str, task: str):
    if family == "mpe":
        from omsd_data.mpe_data import task_qualities

        return task_qualities(task)
    return family_lists(family)[1]


def command(family, task, quality, dec, seed, extra):
    """The cell's command line; also its identity in the results files."""
    if dec == "bc":
        head = ["python", "benchmark/bc_reference.py", "--family", family, "--env-id", task, "--dataset", quality]
        return shlex.join([*head, "--seed", str(seed), *shlex.split(extra)])
    flags = ["--env-id", task, "--dataset", quality, "--decomposition", dec, "--seed", str(seed)]
    return shlex.join(["python", f"{SCRIPTS[family]}.py", *flags, *shlex.split(extra)])


def settings(command: str) -> tuple:
    """A cell's command without its seed: the settings every seed of the cell must share."""
    words = shlex.split(command)
    return tuple(w for i, w in enumerate(words) if w != "--seed" and (i == 0 or words[i - 1] != "--seed"))


def check_same_settings(cfg, out):
    """Refuse a grid whose cells already have rows in `out` made with another command (other --extra): their seeds
    would be averaged into one cell of the table. (Rows of the same command made by other code are not detected.)"""
    rows = load_rows(out, cfg.family, cfg.results)
    have = {(r["task"], r["quality"], r["decomposition"]): settings(r["command"]) for r in rows}
    for dec in cfg.decompositions:
        for task in cfg.tasks or family_lists(cfg.family)[0]:
            for quality in cfg.qualities or family_lists(cfg.family)[1]:
                mine = settings(command(cfg.family, task, quality, dec, 0, cfg.extra))
                theirs = have.get((task, quality, dec))
                if theirs is not None and theirs != mine:
                    fail(
                        f"{out} holds rows of {task} {quality} {dec} made with other settings "
                        f"({shlex.join(theirs)}); give another --out for these"
                    )


def load_rows(out, family, also=""):
    """Rows of every <family>*.jsonl in the directory `out`, plus those of the file `also` (an ablation's)."""
    rows = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if (name.startswith(family) or name == also) and name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return rows


class Cell(submitit.helpers.Checkpointable):
    """One run of the grid, as a submitit job: runs the script's main(cli_args(...)) in the job's own
    process and returns the result row. Checkpointable, so when SLURM preempts the job or its time runs out,
    submitit requeues this same call; the script, given the same command, continues from its own checkpoints
    (the stage in progress is saved every --checkpoint-every steps)."""

    def __init__(self, family, task, quality, dec, seed, cmd, workdir, threads: int = 0):
        self.family, self.task, self.quality, self.dec, self.seed = family, task, quality, dec, seed
        self.command, self.workdir, self.threads = cmd, workdir, threads

    def script_argv(self) -> list[str]:
        """The command's flags of the family's script (BC takes them too, after its --family). Local jobs share the
        cores: each gets `--threads 1` ahead of the command's own flags (which win; --threads is not part of a run's
        identity, so the row's command stays as printed)."""
        head = ["--threads", str(self.threads)] if self.threads else []
        return head + shlex.split(self.command)[4 if self.dec == "bc" else 2 :]

    def __call__(self) -> dict:
        os.chdir(self.workdir)
        sys.path.insert(0, REPO)
        if self.dec == "bc":
            res = bc_module().run(self.family, self.script_argv())
        else:
            om = importlib.import_module(SCRIPTS[self.family])
            res = om.main(om.cli_args(self.script_argv()))
        return {
            "command": self.command,
            "task": self.task,
            "quality": self.quality,
            "decomposition": self.dec,
            "seed": self.seed,
            "beta": res["beta"],
            "final_return": res["final_return"],
            "final_eval_episodes": res.get("final_eval_episodes"),
            "final_normalized_score": res["final_normalized_score"],
            "normalization": res.get("normalization"),
            "final_paper_normalized_score": res.get("final_paper_normalized_score"),
            "eval_history": res["eval_history"],
            "eval_seconds": res["eval_seconds"],
            "total_seconds": res["total_seconds"],
            "stages": res["stages"],
            "diagnostics": res.get("diagnostics"),
        }


def bc_module():
    """benchmark/bc_reference.py as a module (benchmark/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bc_reference", os.path.join(REPO, "benchmark", "bc_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_executor(cfg: Cfg, folder: str):
    ex = submitit.AutoExecutor(folder=folder, cluster=cfg.launcher)
    if cfg.launcher == "local":
        ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    else:
        ex.update_parameters(
            name=f"omsd-{cfg.family}",
            timeout_min=cfg.slurm_time,
            cpus_per_task=cfg.slurm_cpus,
            mem_gb=cfg.slurm_mem_gb,
            slurm_array_parallelism=cfg.slurm_array_parallelism,
            **({"slurm_partition": cfg.slurm_partition} if cfg.slurm_partition else {}),
        )
    return ex


def reattach(cfg: Cfg, folder: str, known: dict, cell: Cell):
    """The job an earlier invocation submitted for a cell, when it can still deliver the row: it finished while
    no parent collected it, or it is still queued or running on SLURM. None: submit the cell again."""
    if cell.command not in known:
        return None
    job_class = submitit.SlurmJob if cfg.launcher == "slurm" else submitit.LocalJob
    job = job_class(folder=folder, job_id=known[cell.command])
    if job.paths.result_pickle.exists():
        try:  # a failed attempt, or (local job ids are process ids) another cell's result: run it again
            return job if job.result()["command"] == cell.command else None
        except Exception:
            return None
    if cfg.launcher == "slurm" and job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED"):
        return job
    return None


def job_error(e: Exception) -> str:
    """The script's error: the last line of the job's traceback, which submitit's FailedJobError text holds
    between two dashed lines (an UncompletedJobError, e.g. of a killed job, is one message)."""
    parts = str(e).split("-" * 22)
    return (parts[-2] if len(parts) >= 3 else str(e)).strip().splitlines()[-1]


# while a job is being submitted, SIGINT/SIGTERM wait: its process exists before the grid holds it in `running`,
# and an interrupt in between would leave it running (submitit's jobs ignore SIGTERM; only cancel() stops them)
SUBMITTING = {"now": False, "interrupted": False}


def interrupt(signum, frame):
    """SIGTERM as Ctrl-C: the grid cancels its local jobs (they would hold their runs' locks) and exits 130."""
    if SUBMITTING["now"]:
        SUBMITTING["interrupted"] = True
        return
    raise KeyboardInterrupt


def submit_quietly(executor, cell: Cell, log: str):
    """executor.submit(cell) with the local job's controller writing its stderr to `log`, not to this terminal:
    when the grid is stopped, the controller's KeyboardInterrupt traceback goes there (the run's to its own log)."""
    saved = os.dup(2)
    try:
        with open(log, "a") as f:
            os.dup2(f.fileno(), 2)
            return executor.submit(cell)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_grid(cfg: Cfg, out: str):
    """Run the grid's cells that are not yet in `out` as submitit jobs and append each finished job's row to the
    results file. Only this parent writes rows, from job.result(), so a row exists only for a run that finished;
    the job ids go to <out>/submitit/jobs.jsonl, so that a later invocation can collect a job it left behind."""
    tasks, standard, _ = family_lists(cfg.family)
    results_file = os.path.join(out, cfg.results or f"{cfg.family}.jsonl")
    check_same_settings(cfg, out)
    lock = open(results_file, "a")  # held until this command exits: a second grid would run the same cells again
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another benchmark/table.py is running into {results_file}; wait for it, or use another --out")
    # Decomposition outermost: while fewer run at a time than one decomposition has cells, the runs in progress
    # differ in seed or dataset and never train the same critic (stage 1b, which both decompositions share); the
    # independent runs find theirs cached.
    cells, local_threads = [], 1 if cfg.launcher == "local" and cfg.parallel > 1 else 0  # 0: the script's default
    for dec in cfg.decompositions:
        for task in cfg.tasks or tasks:
            for quality in cfg.qualities or standard:
                for seed in cfg.seeds:
                    cmd = command(cfg.family, task, quality, dec, seed, cfg.extra)
                    cells.append(Cell(cfg.family, task, quality, dec, seed, cmd, cfg.workdir, local_threads))
    rows = load_rows(out, cfg.family, cfg.results)
    done = {r["command"] for r in rows}
    n_grid = len(cells)
    cells = [c for c in cells if c.command not in done]
    print(f"{n_grid - len(cells)} of the grid's {n_grid} runs are already in {out}; {len(cells)} to run", flush=True)
    if not cells:
        return

    folder = os.path.join(out, "submitit")
    os.makedirs(folder, exist_ok=True)
    jobs_file = os.path.join(folder, "jobs.jsonl")
    known = {}
    if os.path.exists(jobs_file):
        with open(jobs_file) as f:
            known = {j["command"]: j["job_id"] for j in map(json.loads, f)}
    executor = make_executor(cfg, folder)
    running, todo = [], []
    for cell in cells:
        job = reattach(cfg, folder, known, cell)
        if job is not None:
            print(f"<< {cell.command} (job {job.job_id} of an earlier invocation)", flush=True)
            running.append((job, cell))
        else:
            todo.append(cell)

    def submitted(jobs_cells):
        for job, cell in jobs_cells:
            append_row(jobs_file, {"command": cell.command, "job_id": job.job_id})
            print(f">> {cell.command} (job {job.job_id}, log {job.paths.stderr})", flush=True)
        running.extend(jobs_cells)

    if cfg.launcher == "slurm" and todo:  # one array; SLURM keeps --slurm-array-parallelism of it running
        with executor.batch():
            jobs = [executor.submit(cell) for cell in todo]
        submitted(list(zip(jobs, todo)))
        todo = []
    failed = []
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the local jobs too, as Ctrl-C does
    signal.signal(signal.SIGINT, interrupt)
    try:
        while todo or running:
            while todo and len(running) < cfg.parallel:
                cell = todo.pop(0)
                SUBMITTING["now"] = True
                try:
                    submitted([(submit_quietly(executor, cell, os.path.join(folder, "controllers.log")), cell)])
                finally:
                    SUBMITTING["now"] = False
                if SUBMITTING["interrupted"]:
                    raise KeyboardInterrupt
            for job, cell in [jc for jc in running if jc[0].done()]:
                running.remove((job, cell))
                try:
                    row = job.result()
                except Exception as e:
                    failed.append(cell.command)
                    print(f"failed: {cell.command}: {job_error(e)} (log {job.paths.stderr})", flush=True)
                    continue
                append_row(results_file, row)
                score = row["final_normalized_score"]
                print(
                    f"ok: {cell.command}: final return {row['final_return']:.2f}"
                    + (f", normalized {score:.1f}" if score is not None else ""),
                    flush=True,
                )
            if running:
                time.sleep(1 if cfg.launcher == "local" else 30)
    except KeyboardInterrupt:
        if cfg.launcher == "local":
            for job, _ in running:  # the runs stop at once; running the grid again continues each from its checkpoint
                job.cancel(check=False)
        print(
            f"\ninterrupted with {len(running) + len(todo)} cells unfinished; run the same command again to "
            f"continue (killed runs resume from their checkpoints)",
            file=sys.stderr,
        )
        sys.exit(130)
    if failed:
        print(
            f"{len(failed)} cells failed; their logs are named above. Running the same command again retries "
            f"them (from their checkpoints)",
            file=sys.stderr,
        )
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- statistics


def cells_of(rows):
    """Rows grouped by (task, quality, decomposition)."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["quality"], r["decomposition"])].append(r)
    return cells


def score_matrices(rows, qualities=None, methods=DECOMPOSITIONS):
    """Normalised final scores as rliable wants them: {method: (seeds x cells) array}, with the cells (task, quality)
    that all `methods` (decompositions or "bc") have and the seeds that every one of those cells has, so the
    matrices hold the same runs. The paper's constants where a row has that score (rows made before they recorded
    it were normalised with them), else the row's own. Rows without a normalised score are left out. Returns
    (matrices, cells, seeds), or (None, [], []) when no cell has all methods."""
    score = defaultdict(dict)
    for r in rows:
        s = r.get("final_paper_normalized_score")
        s = r.get("final_normalized_score") if s is None else s
        if s is not None and r["decomposition"] in methods:
            score[(r["task"], r["quality"], r["decomposition"])].setdefault(r["seed"], s)
    keys = sorted({(t, q) for t, q, _ in score if qualities is None or q in qualities})
    keys = [k for k in keys if all((*k, d) in score for d in methods)]
    seeds = sorted(set.intersection(*[set(score[(*k, d)]) for k in keys for d in methods])) if keys else []
    if not seeds:
        return None, [], []
    return {d: np.array([[score[(*k, d)][s] for k in keys] for s in seeds]) for d in methods}, keys, seeds


def probability_of_improvement(x, y):
    """P(X > Y) + P(X = Y) / 2 for each task (column), averaged over tasks: rliable's
    metrics.probability_of_improvement (the Mann-Whitney U statistic over n_x n_y), vectorised, because rliable's
    calls scipy once per task and replicate and takes minutes for 10,000 bootstrap replicates."""
    gt = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    eq = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return np.mean(gt + 0.5 * eq)


def aggregate(rows, reps=10000, qualities=None, seed=0):
    """IQM and mean of the normalised scores per decomposition and the probability that sequential improves on
    independent, each with a 95 % stratified bootstrap interval (rliable: seeds resampled within each cell), and the
    probability that sequential improves on behaviour cloning over the cells that have both ("bc", None if none).
    Returns None when no cell has both decompositions."""
    from rliable import library as rly
    from rliable import metrics

    m, keys, seeds = score_matrices(rows, qualities)
    if m is None:
        return None
    np.random.seed(seed)  # rliable's resampling draws from numpy's global generator
    point, interval = rly.get_interval_estimates(
        m, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]), reps=reps
    )
    np.random.seed(seed)
    poi, poi_ci = rly.get_interval_estimates(
        {"poi": [m["sequential"], m["independent"]]}, probability_of_improvement, reps=reps
    )
    bc = None
    mb, bc_cells, bc_seeds = score_matrices(rows, qualities, ("sequential", "bc"))
    if mb is not None:
        np.random.seed(seed)
        p, ci = rly.get_interval_estimates({"poi": [mb["sequential"], mb["bc"]]}, probability_of_improvement, reps=reps)
        bc = {
            "cells": bc_cells,
            "seeds": bc_seeds,
            "poi": float(p["poi"]),
            "poi_ci": [float(v) for v in np.ravel(ci["poi"])],
        }
    return {
        "cells": keys,
        "seeds": seeds,
        "matrices": m,
        "point": point,
        "interval": interval,
        "poi": float(poi["poi"]),
        "poi_ci": [float(v) for v in np.ravel(poi_ci["poi"])],
        "bc": bc,
    }


def fmt_ci(x, ci, digits=1):
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def mean_std(x):
    """mean ± sample std (ddof=1); one seed has no spread to show."""
    return f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"


def run_minutes(secs: list, runs: int) -> str:
    """Wall-clock minutes of a cell's runs, fewest–most, and how many of its `runs` rows record them ("–": none).
    Stage 1 trained or read from the cache, and other jobs sharing the cores, make most of the spread."""
    if not secs:
        return "–"
    lo, hi = f"{min(secs) / 60:.1f}", f"{max(secs) / 60:.1f}"
    return (lo if lo == hi else f"{lo}–{hi}") + ("" if len(secs) == runs else f" ({len(secs)} of {runs} runs)")


def report(family, out, figures, reps):
    """Print the per-cell table and the aggregate statistics of every <family>*.jsonl in `out`, and draw the
    learning curves, interval estimates and performance profile into `figures`: everything from the rows, so a
    results directory alone rebuilds its tables and figures."""
    rows = load_rows(out, family)
    if not rows:
        fail(f"no rows in {out}/{family}*.jsonl; run the grid first, or give --out the directory that has them")
    tasks, _, qualities = family_lists(family)
    cells = cells_of(rows)
    for key, cell in cells.items():  # a cell's seeds are averaged: they must share their settings
        kinds = sorted({settings(r["command"]) for r in cell})
        if len(kinds) > 1:
            fail(f"{out}: the rows of {' '.join(key)} were made with different settings ({shlex.join(kinds[0])} / "
                 f"{shlex.join(kinds[1])}); keep each setting's rows in a directory of their own")  # fmt: skip

    def order(k):
        return (
            tasks.index(k[0]) if k[0] in tasks else len(tasks),
            k[0],
            qualities.index(k[1]) if k[1] in qualities else len(qualities),
            k[1],
        )

    methods = DECOMPOSITIONS + tuple(b for b in BASELINES if any(k[2] == b for k in cells))
    bc_col = "| behaviour cloning: return (normalized), mean ± std (ddof=1) " if "bc" in methods else ""
    lines = [
        f"Final return, normalized score in brackets: mean ± std over seeds (sample std, ddof=1), from {out}",
        "",
        "| task | dataset | β | OMSD sequential: return (normalized), mean ± std (ddof=1) "
        f"| independent: return (normalized), mean ± std (ddof=1) {bc_col}| seeds "
        "| minutes per OMSD run (fewest–most) | command (seed 1) |",
        "|---|---|---|---|---|---|" + "---|" * len(methods),
    ]
    for task, quality in sorted({(t, q) for t, q, _ in cells}, key=order):
        col, n, beta, cmd, secs, omsd_runs = [], [], "", "", [], 0
        for dec in methods:
            rs = cells.get((task, quality, dec), [])
            if not rs:
                col.append("–")
                continue
            if dec in DECOMPOSITIONS:
                secs += [r["total_seconds"] for r in rs if r.get("total_seconds") is not None]
                omsd_runs += len(rs)
            ret = mean_std(np.array([r["final_return"] for r in rs]))
            nor = [r["final_normalized_score"] for r in rs if r["final_normalized_score"] is not None]
            pap = [r["final_paper_normalized_score"] for r in rs if r.get("final_paper_normalized_score") is not None]
            pap = f"; paper's constants {mean_std(np.array(pap))}" if len(pap) == len(rs) else ""
            col.append(f"{ret} ({mean_std(np.array(nor))}{pap})" if nor else ret)
            n.append(len(rs))
            beta = rs[0]["beta"] if dec in DECOMPOSITIONS else beta
            first = sorted(rs, key=lambda r: r["seed"])[0]["command"]  # OMSD's, else BC's (columns in this order)
            cmd = cmd or first.replace(" --decomposition sequential", "")
        minutes = run_minutes(secs, omsd_runs)
        lines.append(
            f"| {task} | {quality} | {beta} | {' | '.join(col)} | {'/'.join(map(str, n))} | {minutes} | `{cmd}` |"
        )
    refs = {}  # what the normalized scores are normalised with, per task (rows of older runs may not say)
    for r in rows:
        ref = r.get("normalization")
        refs.setdefault(r["task"], set()).add((ref["random"], ref["expert"], ref["source"]) if ref else None)
    if any(k is not None for ks in refs.values() for k in ks):
        lines += [
            "",
            "Normalized with each dataset's reference returns, 100 (R - R_random) / (R_expert - R_random) (\"paper's "
            "constants\": also with the paper's, where the reference returns are within 15 % of them):",
        ]
        for task in sorted(refs, key=lambda t: order((t, ""))):
            for lo, hi, src in sorted(refs[task] - {None}):
                lines.append(f"- {task}: R_random {lo:.1f}, R_expert {hi:.1f} ({src})")
            if None in refs[task]:
                lines.append(
                    f"- {task}: some rows do not record their constants (made before rows did; the MPE ones then "
                    "used the paper's constants, the MaMuJoCo ones the behaviour returns)"
                )

    agg = aggregate(rows, reps)
    if agg is None:
        lines += ["", "No cell has both decompositions: no aggregate statistics."]
    else:
        multi = aggregate(rows, reps, qualities=MULTIMODAL)
        lines += [
            "",
            f"Normalized score over {len(agg['cells'])} cells x {len(agg['seeds'])} seeds (seeds "
            f"{', '.join(map(str, agg['seeds']))}), 95 % stratified bootstrap intervals (rliable, {reps} "
            f"replicates):",
            "",
            "| decomposition | IQM | mean |",
            "|---|---|---|",
        ]
        for dec in DECOMPOSITIONS:
            p, ci = agg["point"][dec], agg["interval"][dec]
            lines.append(f"| {dec} | {fmt_ci(p[0], ci[:, 0])} | {fmt_ci(p[1], ci[:, 1])} |")

        def vs_bc(a):  # P(sequential > BC) on the cells that have BC rows too
            b = a and a["bc"]
            return f"{fmt_ci(b['poi'], b['poi_ci'], 2)} ({len(b['cells'])} cells)" if b else "no BC rows"

        lines += [
            "",
            "| cells | P(sequential > independent) | P(sequential > behaviour cloning) |",
            "|---|---|---|",
            f"| all ({len(agg['cells'])}) | {fmt_ci(agg['poi'], agg['poi_ci'], 2)} | {vs_bc(agg)} |",
        ]
        found = [q for q in MULTIMODAL if multi and any(k[1] == q for k in multi["cells"])]  # name only those run
        name = f"multimodal data: {', '.join(found or MULTIMODAL)}"
        lines.append(
            f"| {name} ({len(multi['cells'])}) | {fmt_ci(multi['poi'], multi['poi_ci'], 2)} | {vs_bc(multi)} |"
            if multi
            else f"| {name} | no such cells | |"
        )
    lines += ["", protocol(rows)]
    path = os.path.join(out, f"{family}_marl_eval.json")  # for marl-eval's plots and other tools
    with open(path, "w") as f:
        json.dump(marl_eval_json(rows, family), f)
    lines += ["", f"marl-eval's raw-data format: {path}"]
    print("\n".join(lines))
    os.makedirs(figures, exist_ok=True)
    curves(cells, family, figures, order)
    if agg is not None:
        rliable_figures(agg, family, figures, reps)


def protocol(rows) -> str:
    """The evaluation protocol of the rows, in the terms of Formanek et al. (2024): budget, policy, seeds, episodes."""
    seeds = sorted({r["seed"] for r in rows})
    episodes = defaultdict(int)
    for r in rows:
        episodes[r.get("final_eval_episodes")] += 1
    said = [f"{e} episodes ({k} rows)" for e, k in sorted((e, k) for e, k in episodes.items() if e is not None)]
    if None in episodes:
        said.append(
            f"not recorded ({episodes[None]} rows made before rows recorded it, at the scripts' default then: 10)"
        )
    return (
        f"Protocol: each run trains for its script's fixed budget and reports its final policy (no best-of); "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); final evaluation over {'; '.join(said)}; "
        "evaluation episodes are env seeds seed + 100 + e, the same however many run together."
    )


def marl_eval_json(rows, family: str) -> dict:
    """The rows in marl-eval's raw-data format (instadeepai/marl-eval, README "Data Structure for Raw Experiment
    data"): environment -> task -> algorithm -> run -> step_k {step_count, metric: [one value per evaluation
    episode]} and absolute_metrics (the final evaluation). Task = <env-id>_<quality>; algorithm = omsd_sequential,
    omsd_independent or bc; run = run_<seed>. Metrics: return and normalized_score (with the row's own constants);
    an evaluation whose row records no per-episode returns contributes its mean as one value."""

    def metrics(h, ref):
        returns = [float(x) for x in h.get("episode_returns") or [h["return"]] if x is not None]
        norm = [100.0 * (x - ref["random"]) / (ref["expert"] - ref["random"]) for x in returns] if ref else []
        return {"return": returns, **({"normalized_score": norm} if ref else {})}

    out = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["quality"], r["decomposition"], r["seed"])):
        algo = r["decomposition"] if r["decomposition"] in BASELINES else f"omsd_{r['decomposition']}"
        history, ref = r["eval_history"], r.get("normalization")
        run = {f"step_{k}": {"step_count": int(h["step"]), **metrics(h, ref)} for k, h in enumerate(history)}
        run["absolute_metrics"] = metrics(history[-1], ref)
        task = out.setdefault(family, {}).setdefault(f"{r['task']}_{r['quality']}", {})
        task.setdefault(algo, {})[f"run_{r['seed']}"] = run
    return out


def rliable_figures(agg, family, figures, reps):
    """The interval-estimate figure (IQM and mean with their intervals) and the performance profile (fraction
    of runs above each normalised score, with bootstrap bands), drawn by rliable's plot_utils."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import plot_utils

    colors = {"sequential": "C0", "independent": "C1"}
    fig, _ = plot_utils.plot_interval_estimates(
        agg["point"],
        agg["interval"],
        metric_names=["IQM", "Mean"],
        algorithms=list(DECOMPOSITIONS),
        colors=colors,
        xlabel="normalized score",
        subfigure_width=3.4,
        row_height=0.9,
        xlabel_y_coordinate=-0.32,
    )
    fig.suptitle(
        f"{family}: {len(agg['cells'])} cells x {len(agg['seeds'])} seeds, 95 % intervals", fontsize=11, y=1.12
    )
    path = os.path.join(figures, f"{family}_interval_estimates.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("wrote", path)

    scores = np.concatenate([m.ravel() for m in agg["matrices"].values()])
    taus = np.linspace(scores.min() - 1, scores.max() + 1, 101)
    np.random.seed(0)
    profiles, cis = rly.create_performance_profile(agg["matrices"], taus, reps=min(reps, 2000))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    plot_utils.plot_performance_profiles(
        profiles,
        taus,
        performance_profile_cis=cis,
        colors=colors,
        ax=ax,
        xlabel=r"normalized score $\tau$",
        ylabel=r"fraction of runs > $\tau$",
        labelsize="medium",
        ticklabelsize="small",
    )
    ax.legend([plt.Line2D([], [], color=colors[d]) for d in DECOMPOSITIONS], DECOMPOSITIONS, fontsize=8)
    ax.set_title(f"{family}: performance profile", fontsize=10)
    path = os.path.join(figures, f"{family}_performance_profile.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("wrote", path)


def curves(cells, family, figures, order):
    """Learning curves per cell: mean over seeds with a ± std band (ddof=1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k[:2] for k in cells}, key=order)
    tasks = list(dict.fromkeys(t for t, _ in keys))
    qualities = sorted({q for _, q in keys}, key=lambda q: order((tasks[0], q)))
    size = (3.2 * len(qualities), 2.6 * len(tasks))
    fig, axes = plt.subplots(len(tasks), len(qualities), figsize=size, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for task, quality in keys:
        r, c = tasks.index(task), qualities.index(quality)
        ax = axes[r][c]
        ax.set_visible(True)
        for dec, color in (("sequential", "C0"), ("independent", "C1"), ("bc", "C2")):
            rs = cells.get((task, quality, dec), [])
            steps = [h["step"] for h in rs[0]["eval_history"]] if rs else []
            rs = [x for x in rs if [h["step"] for h in x["eval_history"]] == steps]  # one evaluation schedule
            if not rs or rs[0]["eval_history"][0]["normalized_score"] is None:
                continue
            ys = np.array([[h["normalized_score"] for h in x["eval_history"]] for x in rs])
            ax.plot(steps, ys.mean(0), color=color, label=f"{dec} ({len(rs)} seeds)")
            if len(rs) > 1:
                sd = ys.std(0, ddof=1)
                ax.fill_between(steps, ys.mean(0) - sd, ys.mean(0) + sd, color=color, alpha=0.2)
        ax.set_title(f"{task} {quality}", fontsize=9)
        ax.set_xlabel("policy steps", fontsize=8)
        ax.tick_params(labelsize=7)
        if c == 0:
            ax.set_ylabel("normalized score", fontsize=8)
        if (task, quality) == keys[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(figures, f"{family}_learning_curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print("wrote", path)


GRID_FLAGS = ("--env-id", "--env_id", "--dataset", "--decomposition", "--seed", "--eval-from", "--eval_from")


def check_grid(cfg: Cfg):
    """Every bad setting of a grid, before any directory is made or job started: tasks, qualities, seeds, and
    --extra (the flags the grid sets itself are refused; the values are checked by the script itself)."""
    tasks, standard, _ = family_lists(cfg.family)
    unknown = [t for t in cfg.tasks if t not in tasks]
    if unknown:
        fail(f"unknown task {unknown[0]!r} for --family {cfg.family}; choose from {', '.join(tasks)}")
    for task in cfg.tasks or tasks:
        allowed = task_qualities(cfg.family, task)
        for quality in cfg.qualities or standard:
            if quality not in allowed:
                fail(f"unknown quality {quality!r} for {task}; choose from {', '.join(allowed)}")
    if not cfg.seeds or any(not 0 <= s < 2**32 for s in cfg.seeds) or len(set(cfg.seeds)) < len(cfg.seeds):
        fail(f"--seeds must be distinct integers in 0..{2**32 - 1}, got {' '.join(map(str, cfg.seeds))}")
    words = shlex.split(cfg.extra)
    grid = [w for w in words if w.split("=")[0] in GRID_FLAGS]
    if grid:
        fail(f"--extra sets {grid[0].split('=')[0]}, which the grid sets for every cell; use --tasks, --qualities, "
             f"--decompositions or --seeds instead")  # fmt: skip
    sys.path.insert(0, REPO)
    om = importlib.import_module(SCRIPTS[cfg.family])
    argv = ["--env-id", (cfg.tasks or tasks)[0], "--dataset", (cfg.qualities or standard)[0], *words]
    try:  # the script's own checks of every value (its error line, exit 2, on a bad one)
        args = om.resolve_args(om.cli_args(argv))
    except Exception as e:  # RunError / DatasetError: one line
        fail(f"--extra {cfg.extra!r}: {e}")
    if "bc" in cfg.decompositions and (args.eval_from or args.capture_video):
        fail("--extra: behaviour cloning (--decompositions bc) takes no --eval-from or --capture-video")


def main(cfg: Cfg):
    if cfg.family not in SCRIPTS:
        fail(f"--family must be one of {', '.join(SCRIPTS)}, got {cfg.family!r}")
    if cfg.launcher not in LAUNCHERS:
        fail(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {cfg.launcher!r}")
    if not cfg.decompositions or any(d not in DECOMPOSITIONS + BASELINES for d in cfg.decompositions):
        choices = ", ".join(DECOMPOSITIONS + BASELINES)
        fail(f"--decompositions must be among {choices}, got {' '.join(cfg.decompositions)}")
    try:
        shlex.split(cfg.extra)
    except ValueError as e:
        fail(f"--extra {cfg.extra!r}: {e}")
    if cfg.parallel < 1 or cfg.reps < 1:
        fail("--parallel and --reps must be at least 1")
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        fail(f"--out {cfg.out} is a file; give a directory (it is created if missing)")
    if not cfg.report_only and not cfg.out:
        fail(
            "give --out DIR, the directory the grid writes its rows to (a fresh one re-runs the whole table; "
            "benchmark/results holds the committed rows)"
        )
    out = os.path.abspath(cfg.out or RESULTS_DIR)
    if cfg.launcher == "slurm" and not cfg.report_only and shutil.which("srun") is None:
        fail("--launcher slurm needs SLURM's srun on PATH; run on the cluster's login node, or use --launcher local")
    if cfg.report_only and not os.path.isdir(out):
        fail(f"--out {cfg.out} does not exist")
    figures = FIGURES_DIR if out == RESULTS_DIR else os.path.join(out, "figures")
    if not cfg.report_only:
        check_grid(cfg)
        if not os.path.isdir(cfg.workdir):
            fail(f"--workdir {cfg.workdir} is not a directory")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            fail(f"cannot create --out {cfg.out}: {e.strerror}")
        cfg.workdir = os.path.abspath(cfg.workdir)
        run_grid(cfg, out)
    report(cfg.family, out, figures, cfg.reps)


if __name__ == "__main__":
    main(tyro.cli(Cfg))
