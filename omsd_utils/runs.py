"""What both training scripts (`oma_sd_mpe.py`, `oma_sd_mamujoco.py`) share outside the algorithm: checks of
the settings they have in common, progress lines, the stage-1 cache and the checkpoints of the stage in
progress (resume), the run directory with its marker and locks, atomic writes that fail with one line, and
timings that span every process of a resumed run."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

from omsd_utils.files import LockFile, describe_write_error, lock_path, remove_stale, unwritable_dir

SEED_RANGE = 2**32  # numpy's seeds are 0 .. 2**32 - 1


class RunError(Exception):
    """Bad input or a failed run; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Settings both scripts have
# ---------------------------------------------------------------------------------------------
# the option values both scripts accept (each script adds its own)
CHOICES = {
    "decomposition": ("sequential", "independent"),
    "weighting": ("sigma2", "one", "alpha_over_sigma"),
}
POSITIVE = (
    "diffusion_steps",
    "critic_steps",
    "policy_steps",
    "eval_every",
    "eval_episodes",
    "periodic_eval_episodes",
    "dataset_transitions",
    "diffusion_batch_size",
    "critic_batch_size",
    "policy_batch_size",
    "diffusion_hidden",
    "critic_hidden",
    "actor_hidden",
    "checkpoint_every",
    "sample_steps",
    "init_steps",
    "init_states",
)


def data_beta(beta, beta_of, dataset: str, recorded) -> float:
    """beta of a --dataset-path run: --beta where given, else beta_of(quality) of the quality the data record (the
    project's files, OMAR's and MADiff's directories, OMIGA's file names), else of --dataset. Prints which and why."""
    if beta is not None:
        why = "given"
    elif recorded is not None and beta_of(recorded) is not None:
        beta, why = beta_of(recorded), f"the default of {recorded} data, the quality the data record"
    else:
        beta = beta_of(dataset) or 0.05
        why = (
            f"the default of --dataset {dataset} (the data record no quality with a default: give --dataset or --beta)"
        )
    print(f"beta {beta}: {why}", file=sys.stderr)
    return beta


def check_args(args, choices: dict | None = None, positive: tuple = (), n_agents: int | None = None):
    """Reject bad settings before anything is written: the options with a fixed set of values (CHOICES and the
    script's `choices`), beta, the counts that must be positive (POSITIVE and the script's `positive`), the
    diffusion time range of the actor loss, then `check_common_args`."""
    for k, allowed in {**CHOICES, **(choices or {})}.items():
        if getattr(args, k) not in allowed:
            raise RunError(f"--{k.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(args, k)!r}")
    if args.beta is not None and not args.beta > 0:  # None: a --dataset-path run's, set once its data are read
        raise RunError(f"--beta must be > 0 (small beta = strong behaviour constraint), got {args.beta}")
    for k in POSITIVE + tuple(positive):
        if getattr(args, k) <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)}")
    check_common_args(args, n_agents)
    if not args.eval_from:  # the run directory and the cache can be written (before any data are made)
        check_dirs(args.cache_dir)


def fill_unset(args, defaults: dict):
    """Set the settings of `args` left at None to `defaults`' values (a script's per-env defaults)."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def parse_cli(args_cls, env_defaults, argv: list[str] | None = None):
    """A script's Args from the command line (default: sys.argv), their defaults `env_defaults(Args(env_id=...,
    dataset=...))` of the --env-id and --dataset given, so that --help shows the values a run uses."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--env-id", "--env_id", default=args_cls.env_id)
    pre.add_argument("--dataset", default=args_cls.dataset)
    pre.add_argument("--dataset-path", "--dataset_path", default="")  # its beta is set once the data are read
    try:
        known = pre.parse_known_args(argv)[0]
    except argparse.ArgumentError:  # e.g. --env-id without a value: tyro reports it
        known = args_cls()
    default = env_defaults(args_cls(env_id=known.env_id, dataset=known.dataset, dataset_path=known.dataset_path))
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            return tyro.cli(args_cls, args=argv, default=default)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        # tyro's error box as one line: what is wrong, then where to look
        text = re.sub(r"[│╭╮╰╯─]+", " ", box.getvalue())
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        end = next((i for i, ln in enumerate(lines) if ln.startswith(("Got errors", "Argument help", "For full"))), 4)
        what = " ".join(lines[1:end])  # lines[0] is the box's title
        print(f"error: {what or 'bad command line'} (see --help)", file=sys.stderr)
        raise SystemExit(2) from None


def check_common_args(args, n_agents: int | None = None):
    """Reject values of the settings both scripts share that would fail later (or silently mislead).
    n_agents: the env's number of agents, to check --agent-order before any data are made."""
    for k in ("seed", "stage1_seed", "dataset_seed"):
        v = getattr(args, k)
        if not 0 <= v < SEED_RANGE:
            raise RunError(
                f"--{k.replace('_', '-')} must be an integer in 0..{SEED_RANGE - 1} (numpy's seed range), got {v}"
            )
    if not 0 <= args.capture_video <= args.eval_episodes:
        raise RunError(
            f"--capture-video must be 0 (none) or a number of episodes to draw, at most --eval-episodes "
            f"({args.eval_episodes}: the videos are episodes of the evaluation), got {args.capture_video}"
        )
    if args.threads < 0:
        raise RunError(f"--threads must be 0 (all cores) or a positive number of threads, got {args.threads}")
    name = args.exp_name
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > 100:
        raise RunError(
            f"--exp-name must be a plain name of 1 to 100 bytes without '/' (it becomes part of the run "
            f"directory's name), got {name!r}"
        )
    for k in ("beta", "actor_lr", "critic_lr", "expectile", "gamma"):
        if getattr(args, k) is not None and not math.isfinite(getattr(args, k)):  # beta None: set from the data
            raise RunError(f"--{k.replace('_', '-')} must be a finite number, got {getattr(args, k)}")
    for k in ("actor_lr", "critic_lr"):
        if not getattr(args, k) > 0:
            raise RunError(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    if not 0 < args.expectile < 1:
        raise RunError(
            f"--expectile must be in (0, 1) (IQL's tau: 0.5 fits the mean, towards 1 the maximum), got {args.expectile}"
        )
    if not 0 < args.gamma <= 1:
        raise RunError(f"--gamma must be in (0, 1] (the discount), got {args.gamma}")
    order = list(args.agent_order)
    if order and n_agents is not None and sorted(order) != list(range(n_agents)):
        raise RunError(
            f"--agent-order must be a permutation of 0..{n_agents - 1} ({args.env_id} has {n_agents} "
            f"agents), got {order}"
        )


def check_dirs(cache_dir: str):
    """The run directory and --cache-dir can be written (checked without creating anything, before data are made)."""
    why = unwritable_dir("runs")
    if why:
        raise RunError(
            f"cannot create a run directory under {os.path.abspath('runs')} ({why}); run from a writable directory"
        )
    why = unwritable_dir(cache_dir)
    if why:
        raise RunError(f"cannot write to --cache-dir {cache_dir} ({why}); give a writable directory")


# ---------------------------------------------------------------------------------------------
# Progress, checkpoints, the stage-1 cache
# ---------------------------------------------------------------------------------------------
class Progress:
    """Status of a stage: step, steps/s, ETA. Rewritten in place on a terminal (twice a second), otherwise
    one line every 10 s, so that logs stay readable."""

    def __init__(self, stage: str, total: int, start: int = 0):
        self.stage, self.total, self.start, self.t0, self.last = stage, total, start, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, step: int, extra: str = ""):
        now = time.time()
        if now - self.last > (0.5 if self.tty else 10.0) or step == self.total:
            sps = (step - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - step) / max(sps, 1e-9)
            line = f"[{self.stage}] {step:>8d}/{self.total}  {sps:7.1f} steps/s  eta {eta:5.0f}s  {extra}"
            end = "\n" if step == self.total or not self.tty else ""
            print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
            self.last = now

    @property
    def seconds(self):
        return time.time() - self.t0

    def rate(self, step: int) -> float:
        return (step - self.start) / max(self.seconds, 1e-9)


TORCH_THREADS = torch.get_num_threads()  # torch's default: the physical cores (read before anything changes it)


def set_threads(threads: int) -> int:
    """torch's CPU threads: `threads`, or for 0 every core this process may use (torch's default, capped by the
    affinity mask that a scheduler such as SLURM or taskset sets). Returns the number set."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or min(TORCH_THREADS, allowed))
    return torch.get_num_threads()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX CPUs, Ampere+ GPUs): there a
    bfloat16 matmul takes about half the time of a float32 one; elsewhere it is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def seed_everything(seed: int):
    """Python's, numpy's and torch's global RNGs, and deterministic torch algorithms (same seed, same numbers)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def check_finite(loss, stage: str, step: int):
    if not torch.isfinite(loss).all():
        raise RunError(
            f"{stage}: loss became {loss.detach().flatten()[~torch.isfinite(loss.detach().flatten())][0].item()} "
            f"at step {step}; lower the learning rate or check the data"
        )


def cache_path(cache_dir: str, env_id: str, kind: str, fields: dict) -> str:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"{env_id}-{kind}-{key}.pt")


def load_cached(path: str, fields: dict):
    """A checkpoint this script wrote for exactly `fields`, or None if there is none."""
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise RunError(f"{path} is a directory where a checkpoint belongs; remove it or use another --cache-dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # our own file: tensors and plain values only
        saved = json.loads(ckpt["fields"])
    except PermissionError as e:
        raise RunError(f"cannot read {path} ({e.strerror}); fix its permissions or use another --cache-dir") from None
    except Exception as e:
        raise RunError(f"{path} is not a readable checkpoint of this script ({type(e).__name__}); delete it") from None
    fields = json.loads(json.dumps(fields))  # as stored: tuples become lists
    if saved != fields:
        k = next(
            k
            for k in sorted(set(saved) | set(fields), key=lambda k: (k != "stage", k))
            if saved.get(k) != fields.get(k)
        )
        raise RunError(
            f"{path} is a checkpoint of another configuration ({k}: {saved.get(k)!r} there, "
            f"{fields.get(k)!r} here); delete it or use another --cache-dir"
        )
    return ckpt


def _tmp_pattern(path: str) -> str:
    """The names of the temporaries `save_atomic` writes for `path` (to remove those a kill left behind)."""
    return re.escape(os.path.basename(path)) + r"\.tmp\d*"


RERUN = "then run the same command again (it continues from the last checkpoint)"


def save_atomic(obj, path: str, then: str = RERUN):
    """Write to a temporary name, then rename: a crash never leaves a half-written file under `path`. A failed
    write (full disk, no permission) removes the temporary and raises RunError (`then`: what to do after fixing)."""
    d = os.path.dirname(path) or "."
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(d, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise RunError(
            f"cannot write {path} ({describe_write_error(e, d)}); free disk space or make the directory "
            f"writable, {then}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str):
    """json.dump to a temporary name, then rename; a failed write raises RunError (see save_atomic)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise RunError(
            f"cannot write {path} ({describe_write_error(e, os.path.dirname(path) or '.')}); free disk "
            f"space or make the directory writable, {RERUN}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Resume: the stage in progress is checkpointed every --checkpoint-every steps to `<cache>.partial.pt` (models,
# optimisers, schedulers, RNG state, step). Ctrl-C / SIGTERM only set a flag; the loop saves at the end of the
# step and stops, so a checkpoint always holds a whole number of steps and resuming reproduces the numbers.
STOP = {"signal": None}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the stage was checkpointed; rerunning the command continues it."""


def on_stop_signal(signum, frame):
    STOP["signal"] = signum
    print("\nstopping after the current step (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once


def stop_at_once():
    """From here on (nothing left to checkpoint: evaluation, diagnostics, videos) a stop signal ends the command at
    once, with exit code 130; a training run stopped now continues from its last checkpoint when run again."""
    if not STOP.get("handled"):  # only under run_command: a script called as a function keeps its caller's handlers
        return

    def at_once(signum, frame):
        raise Interrupted(f"stopped by signal {signum} after training; run the same command again to finish")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, at_once)
    if STOP["signal"] is not None:
        at_once(STOP["signal"], None)


def partial_path(path: str) -> str:
    return path[: -len(".pt")] + ".partial.pt"


def resume_stage(resume: bool, path: str, fields: dict, stage: str, objs: dict, g) -> tuple[int, float, dict]:
    """Load the checkpoint of an interrupted stage into `objs` (models, optimisers, schedulers) and the RNG `g`.
    Returns (steps done, seconds spent, extra state); (0, 0.0, {}) when there is nothing to resume."""
    ckpt = load_cached(partial_path(path), fields) if resume else None
    if ckpt is None:
        return 0, 0.0, {}
    for k, o in objs.items():
        o.load_state_dict(ckpt[k])
    g.set_state(ckpt["rng"])
    print(f"[{stage}] resuming from step {ckpt['step']} ({partial_path(path)})", file=sys.stderr)
    return ckpt["step"], ckpt["seconds"], json.loads(ckpt["extra"])


def checkpoint(
    every: int,
    path: str,
    fields: dict,
    stage: str,
    objs: dict,
    g,
    step: int,
    total: int,
    seconds: float,
    extra: dict | None = None,
):
    """Save the stage every `every` steps, and stop cleanly after a Ctrl-C / SIGTERM. The open run's marker is saved
    first, with the run's time so far (see Run)."""
    stop = STOP["signal"] is not None
    if stop or (step % every == 0 and step < total):
        if _ACTIVE["run"] is not None:
            _ACTIVE["run"].save_marker()
        save_atomic(
            {
                **{k: o.state_dict() for k, o in objs.items()},
                "rng": g.get_state(),
                "step": step,
                "seconds": seconds,
                "extra": json.dumps(extra or {}),
                "fields": json.dumps(fields),
            },
            partial_path(path),
        )
    if stop:
        raise Interrupted(
            f"{stage} stopped at step {step}/{total}; checkpoint saved, run the same command again to continue"
        )


def remove(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# The run: its directory, its marker in --cache-dir, its locks, its clock
# ---------------------------------------------------------------------------------------------
_ACTIVE = {"run": None}  # the run this process opened last (main() opens one per call)


def run_name(args: dict) -> str:
    path = args.get("dataset_path")
    dataset_name = args["dataset"] if not path else os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    parts = (args["env_id"], dataset_name, args["exp_name"], args["decomposition"], args["seed"], int(time.time()))
    return "__".join(map(str, parts))


class Run:
    """One run of a command (its settings and data). Its marker `<cache-dir>/<env>-run-<key>.pt` names the run
    directory and records the time the run's processes spent (each up to its last checkpoint) and the stage-1
    models the run trained itself; it is locked (`<marker>.lock`) while a process works on the run, so one
    command started twice works in one directory once. Stage-1 cache files are locked while one is trained
    (`claim`): a second run needing the same models waits for them and reuses them."""

    def __init__(self, marker, fields, lock, t_start, cache_dir: str, env_id: str, resume: bool):
        self.marker, self.fields, self.lock = marker, fields, lock
        self.t_start = t_start  # time.time() minus the seconds earlier processes of this run spent
        self.dir, self.stages, self.finished, self.stage_locks = None, {}, None, {}
        self.cache_dir, self.env_id, self.resume = cache_dir, env_id, resume
        self.timing, self.cache_files, self.policy_extra, self.writer = {}, {}, {}, None

    def cache_file(self, kind: str, fields: dict) -> str:
        self.cache_files[kind] = cache_path(self.cache_dir, self.env_id, kind, fields)
        return self.cache_files[kind]

    def stage(self, name: str, fields: dict | None, objs: dict, g, total: int, every: int) -> Stage:
        """The loop of one stage (see Stage); fields: the settings that key a stage-1 model, None for stage 2."""
        stage = Stage(self, name, fields, objs, g, total, every)
        if fields is None:
            self.policy_extra = stage.extra
        return stage

    def report_finished(self) -> dict:
        """The results of a run `open_run` found finished, reported as the run itself would have."""
        res = self.finished
        if res.get("status", "ok") != "ok" or res.get("final_return") is None:
            raise RunError(f"this run already ended with status {res.get('status')!r}; see {self.dir}/results.json")
        print(f"final return {res['final_return']:.2f} (finished earlier) -> {self.dir}/results.json")
        return res

    def save_marker(self):
        save_atomic(
            {
                "run_dir": self.dir,
                "fields": json.dumps(self.fields),
                "seconds": time.time() - self.t_start,
                "stages": json.dumps(self.stages),
            },
            self.marker,
        )

    def claim(self, path: str, fields: dict, stage: str):
        """The stage-1 model cached at `path` (load_cached), or None, and then this process holds its lock and
        trains it; while another process trains it, wait for that one and reuse its result."""
        lock = LockFile(lock_path(path))

        def poll():
            if STOP["signal"] is not None:
                raise Interrupted(f"{stage} stopped while waiting for another process; run the same command again")

        try:
            lock.acquire(
                on_wait=lambda pid: print(
                    f"[{stage}] waiting for process {pid or '(unknown)'}, which is training the same model into {path}",
                    file=sys.stderr,
                    flush=True,
                ),
                on_poll=poll,
            )
        except OSError as e:
            raise RunError(
                f"cannot write to --cache-dir {os.path.dirname(path)} ({e.strerror}); give a writable directory"
            ) from None
        self.stage_locks[path] = lock
        for p in (path, partial_path(path)):
            remove_stale(os.path.dirname(p), _tmp_pattern(p))
        cached = load_cached(path, fields)
        if cached is not None:
            self.release(path)
        return cached

    def trained(self, stage: str, timing: dict):
        """Record (in the marker, before the model is saved) that this run trained `stage`."""
        self.stages[stage] = timing
        self.save_marker()

    def save_stage(self, path: str, obj: dict):
        """Save a trained stage-1 model to its cache file, remove the stage's checkpoint, release its lock."""
        save_atomic(obj, path)
        remove(partial_path(path))
        self.release(path)

    def release(self, path: str):
        lock = self.stage_locks.pop(path, None)
        if lock is not None:
            lock.release()

    def stages_of(self, timing: dict) -> dict:
        """The stage timings of results.json: a stage an earlier process of this run trained is not 'cached'."""
        return {k: self.stages.get(k, v) if "cached" in v else v for k, v in timing.items()}

    def abandon(self):
        """Release the locks, keeping the marker (the run can be resumed)."""
        for path in list(self.stage_locks):
            self.release(path)
        self.lock.release()
        if _ACTIVE["run"] is self:
            _ACTIVE["run"] = None

    def close(self):
        """The run is over (results.json written): remove its checkpoint and marker, release its locks."""
        remove(partial_path(self.marker))
        remove(self.marker)
        self.abandon()


def open_run(args: dict, cache_dir: str, resume: bool, fields: dict, t_start: float) -> Run:
    """Lock the run of these settings and find its directory: the interrupted run's (continued), a finished
    run's whose checkpoints a kill left behind (`Run.finished` holds its results.json), or a new one."""
    if _ACTIVE["run"] is not None:  # a previous main() in this process that ended with an exception
        _ACTIVE["run"].abandon()
    marker = cache_path(cache_dir, args["env_id"], "run", fields)
    lock = LockFile(lock_path(marker))
    try:
        os.makedirs(os.path.dirname(marker) or ".", exist_ok=True)
        free = lock.acquire(blocking=False)
    except OSError as e:
        raise RunError(f"cannot write to --cache-dir {cache_dir} ({e.strerror}); give a writable directory") from None
    if not free:
        raise RunError(
            f"this run (the same command on the same data) is already in progress in process "
            f"{lock.holder() or '(unknown)'}; wait for it to finish, or change --seed or --exp-name to "
            f"start another run"
        )
    run = Run(marker, fields, lock, t_start, cache_dir, args["env_id"], resume)
    _ACTIVE["run"] = run
    try:
        for p in (marker, partial_path(marker)):
            remove_stale(os.path.dirname(p), _tmp_pattern(p))
        previous = load_cached(marker, fields) if resume else None
        if previous is not None and os.path.isdir(previous["run_dir"]):
            run.dir = previous["run_dir"]
            results = os.path.join(run.dir, "results.json")
            if os.path.exists(results):
                try:
                    with open(results) as f:
                        run.finished = json.load(f)
                except (OSError, ValueError) as e:
                    raise RunError(
                        f"{results} cannot be read ({e}); move the run directory away to run again"
                    ) from None
                print(
                    f"the run {run.dir} had already finished (its results.json is complete); removed the "
                    f"checkpoints it left behind",
                    file=sys.stderr,
                )
                run.close()
                return run
            run.t_start = t_start - float(previous.get("seconds", 0.0))
            run.stages = json.loads(previous.get("stages", "{}"))
            for name in ("actors.pt", "results.json"):
                remove_stale(run.dir, _tmp_pattern(name))
            print(f"continuing the interrupted run {run.dir}", file=sys.stderr)
            return run
        name = run_name(args)
        try:
            os.makedirs("runs", exist_ok=True)
            for k in range(1000):  # never reuse (and overwrite) an existing run directory
                run.dir = os.path.join("runs", name + (f"_{k}" if k else ""))
                try:
                    os.mkdir(run.dir)
                    break
                except FileExistsError:
                    continue
        except OSError as e:
            raise RunError(
                f"cannot create a run directory under {os.path.abspath('runs')} ({e.strerror}); "
                f"run from a writable directory"
            ) from None
        try:
            run.save_marker()
        except RunError:
            os.rmdir(run.dir)  # still empty: nothing of the run is left behind
            raise
        return run
    except BaseException:
        run.abandon()
        raise


# how a run is executed or shown, not what it computes
NOT_IN_KEY = ("resume", "checkpoint_every", "threads", "capture_video", "video_every", "eval_from")


def start_run(args: dict, cache_dir: str, resume: bool, t_start: float, exclude=(), **fields) -> Run:
    """`open_run` for the run these settings (all but NOT_IN_KEY and `exclude`) and `fields` (e.g. the data's
    checksum) define: an interrupted run of the same command on the same data is continued in its directory. The
    run's TensorBoard writer (`run.writer`) holds every setting as text."""
    keyed = {k: v for k, v in args.items() if k not in NOT_IN_KEY + tuple(exclude)}
    run = open_run(args, cache_dir, resume, {**keyed, **fields}, t_start)
    if run.finished is None:
        run.writer = SummaryWriter(run.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in args.items())
        run.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run


class Stage:
    """One stage's loop, one object per stage: the stage-1 model cached under `fields` is loaded instead of trained
    (fields None: stage 2, checkpointed with the run's marker); an interrupted stage resumes from its checkpoint;
    `steps()` yields the step numbers, then shows progress and checkpoints every `every` steps and at a stop signal.
    `extra` (a dict) is checkpointed with the stage; `g` is its RNG."""

    KINDS = {"diffusion": "diffusion", "critic": "critic", None: "policy"}

    def __init__(self, run: Run, name: str, fields: dict | None, objs: dict, g, total: int, every: int):
        self.run, self.name, self.objs, self.g, self.total, self.every = run, name, objs, g, total, every
        self.kind = self.KINDS[fields["stage"] if fields else None]
        self.path, self.fields = (run.cache_file(self.kind, fields), fields) if fields else (run.marker, run.fields)
        self.cached = run.claim(self.path, fields, name.split(":")[0]) if fields else None
        self.start, self.spent, self.extra = 0, 0.0, {}
        if self.cached is not None:
            for k, o in objs.items():
                if k in self.cached:
                    o.load_state_dict(self.cached[k])
            run.timing[self.kind] = {"cached": self.path}
            what = {"diffusion": "behaviour models", "critic": "critic"}[self.kind]
            print(f"[{name.split(':')[0]}] reusing cached {what} {self.path}", file=sys.stderr)
            return
        self.start, self.spent, self.extra = resume_stage(run.resume, self.path, self.fields, name, objs, g)
        self.bar = Progress(name, total, self.start)

    @property
    def seconds(self) -> float:
        return self.spent + self.bar.seconds

    def steps(self):
        if self.cached is not None:
            return
        for step in range(self.start + 1, self.total + 1):
            yield step
            checkpoint(self.every, self.path, self.fields, self.name, self.objs, self.g, step, self.total,
                       self.seconds, self.extra)  # fmt: skip

    def log(self, step: int, scalars: dict, status: str):
        """TensorBoard scalars (and steps/s) every 100 steps, and the progress line."""
        if step % 100 == 0 or step == self.total:
            for k, v in scalars.items():
                self.run.writer.add_scalar(k, v.item() if torch.is_tensor(v) else v, step)
            self.run.writer.add_scalar(f"charts/SPS_{self.kind}", self.bar.rate(step), step)
        self.bar.update(step, status)

    def evaluated(self, step: int, ret: float | None, ref: dict | None, **fields):
        """Record an evaluation of stage 2 (its history is checkpointed with the stage). `fields`: more of it for
        the history (e.g. episode_returns, episode_lengths, failed_episodes); a failed one (ret None) is not logged."""
        self.extra["eval_history"].append({"step": step, "return": ret, **fields})
        self.extra["eval_seconds"].append(time.time() - self.run.t_start)
        if ret is None:
            return
        self.run.writer.add_scalar("eval/episodic_return", ret, step)
        if fields.get("episode_lengths"):
            lengths = fields["episode_lengths"]
            self.run.writer.add_scalar("eval/episode_length", sum(lengths) / len(lengths), step)
        if ref is not None:
            self.run.writer.add_scalar("eval/normalized_score", normalized_score(ret, ref), step)

    def save(self, models: dict | None):
        """The stage is done: its time, and a stage-1 model saved to its cache file (models: name -> module)."""
        if self.cached is not None:
            return
        self.run.timing[self.kind] = {"seconds": self.seconds, "steps_per_s": self.total / self.seconds}
        if models is None:  # stage 2 is over: the rest of the run stops at once on a signal
            stop_at_once()
        if models is not None:
            self.run.trained(self.kind, self.run.timing[self.kind])
            obj = {k: m.state_dict() for k, m in models.items()}
            self.run.save_stage(self.path, {**obj, "fields": json.dumps(self.fields)})


def normalized_score(ret, ref: dict | None):
    """100 * (R - R_random) / (R_expert - R_random), or None without reference returns."""
    if ret is None or ref is None:
        return None
    return 100.0 * (ret - ref["random"]) / (ref["expert"] - ref["random"])


def finish_run(run: Run, results: dict, actors, order, args: dict, ref, paper=None, draw=None) -> dict:
    """results.json and actors.pt of a finished run (`results`: what the script reports; here the evaluation history
    of stage 2, the scores normalised with `ref` and the `paper`'s constants, times and settings are added), then
    videos (`draw(out_dir)`), and the run's checkpoint and marker removed."""
    history = run.policy_extra["eval_history"]
    for h in history:
        h["normalized_score"] = normalized_score(h["return"], ref)
    final = history[-1]["return"]
    results = {
        **results,
        "final_return": final,
        "final_eval_episodes": args.get("eval_episodes"),  # the final evaluation's (earlier ones may have fewer)
        "final_normalized_score": history[-1]["normalized_score"],
        "normalization": {"formula": "100 * (R - R_random) / (R_expert - R_random)", **ref} if ref else None,
        "final_paper_normalized_score": normalized_score(final, paper),
        "paper_normalization": paper,
        "eval_history": history,
        "eval_seconds": run.policy_extra["eval_seconds"],
        "total_seconds": time.time() - run.t_start,
        "stages": run.stages_of(run.timing),
        "stage1_cache": {k: v for k, v in run.cache_files.items()},
        "args": args,
    }
    save_atomic({"actors": actors.state_dict(), "order": torch.tensor(order)}, os.path.join(run.dir, "actors.pt"))
    write_json_atomic(results, os.path.join(run.dir, "results.json"))
    if draw is not None:
        results["videos"] = draw(os.path.join(run.dir, "videos"))
        write_json_atomic(results, os.path.join(run.dir, "results.json"))
    run.writer.close()
    run.close()  # removes the run's checkpoint and marker
    if final is None:  # a failed evaluation (results["status"]): the script reports it
        return results
    score = ""
    if ref:
        score = (
            f", normalized score {results['final_normalized_score']:.1f} with R_random {ref['random']:.1f}, "
            f"R_expert {ref['expert']:.1f} ({ref['source']})"
        )
    if paper and (paper["random"], paper["expert"]) != (ref["random"], ref["expert"]):
        score += f"; {results['final_paper_normalized_score']:.1f} with the paper's constants"
    if results.get("diagnostics"):
        print(f"diagnostics: {json.dumps(results['diagnostics'])}", file=sys.stderr)
    print(f"final return {final:.2f}{score} -> {run.dir}/results.json")
    return results


def run_command(main, args, errors: tuple = ()):
    """A script's `__main__`: Ctrl-C / SIGTERM stop at the end of a step with a checkpoint; bad input (RunError and
    the script's `errors`) and failed runs print one line and exit with 2, an interrupted run exits with 130."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_stop_signal)
    STOP["handled"] = True
    try:
        main(args)
    except (RunError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted: {e or 'before the first checkpoint'}", file=sys.stderr)
        sys.exit(130)
