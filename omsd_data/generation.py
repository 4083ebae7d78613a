"""What the dataset generators of both env families (`omsd_data/mpe_data.py`, `omsd_data/mamujoco_data.py`) and their
behaviour trainers share: picking the behaviour snapshots of a training run, loading them, running rollout
chunks on worker processes with a progress line, making a dataset once and caching it, dataset cards."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from omsd_data.dataset import (
    TMP_ANY,
    TMP_OLD,
    DatasetError,
    check_writable,
    load_dataset,
    remove_stale_temporaries,
    write_locked,
)
from omsd_utils.files import LockFile, lock_path

N_CHUNKS = 16  # work split of a dataset: fixed, so that the file does not depend on the number of workers


def select_snapshots(snapshots: list, medium_fraction: float, max_replay: int) -> tuple[dict, dict, dict]:
    """OMAR's qualities from a training run's snapshots [(step, actor state dict, eval return), ...]:
    random = step 0; expert = the best; medium = the first reaching `medium_fraction` of the way from random
    to expert; replay_<k> = up to `max_replay` snapshots evenly spread from the start to medium.
    Returns (policies, their training steps, their eval returns)."""
    rets = np.array([s[2] for s in snapshots])
    i_exp = int(np.flatnonzero(rets >= rets.max() - 1e-9)[-1])
    r_rand, r_exp = rets[0], rets[i_exp]
    i_med = int(np.flatnonzero(rets[: i_exp + 1] >= r_rand + medium_fraction * (r_exp - r_rand))[0])
    replay = np.unique(np.linspace(0, i_med, min(max_replay, i_med + 1)).round().astype(int))
    policies = {"random": snapshots[0][1], "medium": snapshots[i_med][1], "expert": snapshots[i_exp][1]}
    for k, j in enumerate(replay):
        policies[f"replay_{k}"] = snapshots[j][1]
    steps = {
        "random": 0,
        "medium": snapshots[i_med][0],
        "expert": snapshots[i_exp][0],
        "replay": [snapshots[j][0] for j in replay],
    }
    returns = {"random": float(r_rand), "medium": float(rets[i_med]), "expert": float(r_exp)}
    return policies, steps, returns


def load_behaviour_file(path: str, retrain: str) -> tuple[dict, dict]:
    """(policies, info) of a committed behaviour checkpoint; `retrain` is the command that remakes it."""
    if not os.path.isfile(path):
        raise DatasetError(
            f"behaviour checkpoint {path} is missing; restore it from git or retrain it with `{retrain}`"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # our own file, plain tensors
    return ckpt["policies"], json.loads(ckpt["info_json"])


def behaviour_tag(paths: list[str]) -> str:
    """8 hex digits of the sha256 of the behaviour checkpoints a dataset is made from, for its default file name:
    a retrained checkpoint gives new files instead of silently reusing data made by the old one."""
    h = hashlib.sha256()
    for p in paths:
        if os.path.isfile(p):  # a missing one is reported, with the command that remakes it, when generating
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:8]


def snapshot_info(info: dict, key: str) -> dict:
    """Training step and evaluation return of snapshot `key` ('expert', 'replay_3', ...) of a checkpoint."""
    step = info["steps"]["replay"][int(key.split("_")[1])] if key.startswith("replay_") else info["steps"][key]
    return {"training_step": step, "eval_return": {int(s): r for s, r in info["curve"]}[step]}


def package_versions(packages: tuple[str, ...]) -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("numpy", "torch", "pettingzoo", "gymnasium", *packages)}


def run_chunks(fn, jobs: list, workers: int, label: str, total: int, verbose: bool) -> list:
    """fn(job) for every job, on `workers` processes, results in job order, with a progress line."""
    t0, done, parts, last = time.time(), 0, [], 0.0
    ctx = mp.get_context("fork") if workers > 1 else None
    pool = ctx.Pool(workers) if ctx else None
    try:
        for part in pool.imap(fn, jobs) if pool else map(fn, jobs):
            parts.append(part)
            done += len(part["obs_0"])
            tty = sys.stderr.isatty()
            if verbose and time.time() - last > (0.5 if tty else 10.0):  # as the training stages' progress lines
                last = time.time()
                print(
                    f"{chr(13) if tty else ''}[{label}] {done:>9,d}/{total:,d} transitions  "
                    f"{done / max(time.time() - t0, 1e-9):,.0f}/s",
                    end="" if tty else "\n",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if pool:
            pool.close()
            pool.join()
    if verbose:
        print(
            f"{chr(10) if sys.stderr.isatty() else ''}[{label}] {done:,d} transitions in {time.time() - t0:.0f} s",
            file=sys.stderr,
        )
    return parts


def reference_returns(info: dict, checkpoint: str) -> dict:
    """A generated dataset's normalisation constants (stored in its metadata as "normalization", the key that
    published datasets use for theirs): the evaluation returns of the random and expert snapshots of the behaviour
    checkpoint `checkpoint`, whose info is `info`; like D4RL's and Minari's ref_min_score / ref_max_score."""
    return {
        "random": float(info["eval_return"]["random"]),
        "expert": float(info["eval_return"]["expert"]),
        "source": f"evaluation returns of the random and expert snapshots of {checkpoint} (evaluated on env version "
        f"{info.get('env_version')})",
    }


def dataset_metadata(family: str, task: str, env_version: str, quality: str, seed: int, **rest) -> dict:
    """The metadata every generated dataset carries: family, task, env version, quality, generation seed, and the
    family's own fields `rest` (agent names, collection noise, behaviour policies, returns, normalisation...)."""
    return {"env_family": family, "task": task, "env_version": env_version, "quality": quality, "generation_seed": seed,
            **rest}  # fmt: skip


def ensure_generated(path, generate, spec, env_version, task, quality, n_transitions, seed, workers, reference):
    """`ensure` for a generated dataset: made by generate(task, quality, n_transitions, seed, workers) if `path` does
    not exist, and used only if its metadata name this task, quality, env version, size and generation seed."""
    want = {"task": task, "quality": quality, "env_version": env_version, "n_transitions": n_transitions,
            "generation_seed": seed}  # fmt: skip
    make = lambda: generate(task, quality, n_transitions, seed, workers)  # noqa: E731
    return ensure(path, make, spec, want, reference)


def ensure(path: str, make, expect: dict, want: dict | None = None, normalization=None) -> tuple[dict, dict, str]:
    """Load the dataset at `path`, making it first with make() -> (arrays, metadata) if it does not exist.
    Processes making the same file take turns (a lock file beside it): the second waits for the first and
    loads its file. `want`: metadata values the file must have (task, quality, env version, size, seed); an
    existing file with other values is refused, never used in their place. `normalization()`: the reference
    returns of a file made before datasets stored them (its name pins the behaviour checkpoint they come from)."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a directory, not a dataset file; remove it or choose another path")
    if not os.path.exists(path) or any(
        re.fullmatch(TMP_ANY, f) or re.fullmatch(TMP_OLD, f) for f in _names(os.path.dirname(path))
    ):
        check_writable(path)  # before minutes of rollouts
        lock = LockFile(lock_path(path))
        lock.acquire(
            on_wait=lambda pid: print(
                f"waiting for process {pid or '(unknown)'}, which is making {path}", file=sys.stderr, flush=True
            )
        )
        try:
            remove_stale_temporaries(path)
            if not os.path.exists(path):
                arrays, meta = make()
                write_locked(path, arrays, meta)
                print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)", file=sys.stderr)
        finally:
            lock.release()
    arrays, meta = load_dataset(path, expect=expect)
    for k, v in (want or {}).items():
        if meta.get(k) != v:
            raise DatasetError(
                f"{path} exists but holds another dataset ({k} {meta.get(k)!r}, not {v!r}); delete it "
                f"to make the requested one, or choose another path"
            )
    if normalization is not None and "normalization" not in meta:
        meta["normalization"] = normalization()
    return arrays, meta, path


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory or ".")
    except OSError:
        return []


def check_metadata(path: str, meta: dict, tasks: tuple, qualities: tuple, env_version: str):
    """For a project-format file given by path: DatasetError if its metadata names another env version than
    this code's, or disagrees with its file name when that has the generators' form
    `<task>-<quality>-<env version>[-b<tag>]-n<transitions>-s<seed>.npz` (tag: a checkpoint hash or `ctrl<version>`)."""
    if "env_version" in meta and meta["env_version"] != env_version:
        raise DatasetError(
            f"{path} was made on env version {meta['env_version']!r}, but this code's env is "
            f"{env_version!r}; use data made on this version (drop --dataset-path to generate it)"
        )
    alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=len, reverse=True))
    m = re.fullmatch(
        rf"(?P<task>{alt(tasks)})-(?P<quality>{alt(qualities)})-{re.escape(env_version)}(?:-b(?:[0-9a-f]{{8}}|ctrl\d+))?"
        rf"-n(?P<n_transitions>\d+)-s(?P<generation_seed>\d+)\.npz",
        os.path.basename(path),
    )
    if m is None:
        return
    for k, v in m.groupdict().items():
        v = int(v) if k in ("n_transitions", "generation_seed") else v
        if k in meta and meta[k] != v:
            raise DatasetError(
                f"{path}: the file name says {k} {v!r} but its metadata says {meta[k]!r}; the file was "
                f"renamed or replaced, delete it or give it a name that matches its content"
            )


def card_rows(paths: list[str]) -> list[str]:
    """Markdown dataset cards of the given dataset files."""
    rows = [
        "| task | quality | transitions | episodes | return mean ± std | min / max "
        "| behaviour policies (training step: eval return) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in paths:
        _, m = load_dataset(p)
        r = m["episode_return"]
        snaps = m["behaviour"].get("snapshots", {})
        # eval returns are the snapshots' as trained (a role-permuted copy has its own, not measured here)
        pols = ", ".join(
            f"{name} ({snaps[name]['training_step']:,}"
            + ("" if "@" in name else f": {snaps[name]['eval_return']:.1f}")
            + ")"
            if name in snaps
            else name
            for name, _ in m["behaviour"]["policies"]
        )
        rows.append(
            f"| {m['task']} | {m['quality']} | {m['n_transitions']:,} | {m['n_episodes']:,} | "
            f"{r['mean']:.1f} ± {r['std']:.1f} | {r['min']:.1f} / {r['max']:.1f} | {pols} |"
        )
    return rows


@dataclass
class Args:
    task: str = ""
    """the task / env id (listed above), or `all`"""
    quality: str = "expert"
    """a dataset quality (listed above), or `all`"""
    n_transitions: int = 0
    """transitions per dataset"""
    seed: int = 0
    """generation seed (env seeds and action noise)"""
    workers: int = 2
    """processes used for rollouts (the output does not depend on it)"""
    out: str = ""
    """output path (default $OMSD_DATA_DIR or datasets/, then <family>/<task>-<quality>-<env version>[-b<behaviour
    checkpoints tag>]-n<N>-s<seed>.npz); only for one dataset"""
    card: bool = False
    """print the dataset cards (markdown) of the datasets made with these settings instead"""


def cli(
    doc: str,
    tasks: tuple,
    qualities: tuple,
    default_task: str,
    default_n: int,
    default_path,
    ensure_dataset,
    task_qualities=None,
):
    """The command line of a family's generator: make (or print the cards of) the selected datasets.
    task_qualities(task): the qualities `--quality all` means for that task (default: all of `qualities`)."""
    import tyro

    args = tyro.cli(Args, default=Args(task=default_task, n_transitions=default_n), description=doc)
    try:
        for name, value, allowed in (("task", args.task, tasks), ("quality", args.quality, qualities)):
            if value != "all" and value not in allowed:
                raise DatasetError(f"unknown --{name} {value!r}; choose one of {', '.join(allowed)} or all")
        selected = [
            (t, q)
            for t in (tasks if args.task == "all" else (args.task,))
            for q in (
                (task_qualities(t) if task_qualities else qualities) if args.quality == "all" else (args.quality,)
            )
        ]
        if args.out and len(selected) > 1:
            raise DatasetError("--out names one file; give one --task and one --quality with it")
        if not 0 <= args.seed < 2**32:
            raise DatasetError(f"--seed must be an integer in 0..{2**32 - 1}, got {args.seed}")
        if args.n_transitions <= 0:
            raise DatasetError(f"--n-transitions must be a positive integer, got {args.n_transitions}")
        if args.workers <= 0:
            raise DatasetError(f"--workers must be a positive integer, got {args.workers}")
        paths = [args.out or default_path(t, q, args.n_transitions, args.seed) for t, q in selected]
        if args.card:
            print("\n".join(card_rows([p for p in paths if os.path.exists(p)])))
            return
        for (t, q), path in zip(selected, paths):
            existed = os.path.exists(path)
            ensure_dataset(t, q, args.n_transitions, args.seed, path, args.workers)
            if existed:
                print(f"{path} already holds this dataset; nothing to do", file=sys.stderr)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
