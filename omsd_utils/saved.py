"""A finished run's actors, evaluated again and drawn: the scripts' `--eval-from RUN` and `--capture-video`.

- `read_run`: a run directory's results.json and its resolved arguments, checked before anything is loaded.
- `load_actors`: actors.pt (weights only, `torch.load(weights_only=True)`) into the script's own `Actors`, its
  shapes checked against the env (one `RunError` line if they do not fit).
- `record_evaluation`: the script's own `evaluate` (all episodes stepped together, one batched actor call per
  step, env seeds seed + 100 + k), with every actor call recorded; each of the first `episodes` episodes is then
  replayed on its own with the recorded actions, checked to see the same observations at every step, and drawn
  (envs/render.py) to `<out>/episode_<k>.gif`. So a video shows exactly an episode the reported mean contains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import torch

from envs import render
from omsd_utils.files import unwritable_dir
from omsd_utils.runs import RunError, normalized_score, set_threads, stop_at_once, write_json_atomic

# options of runs made before docs/studies.md retired them; none changes how a saved run's actors are evaluated
RETIRED = ("diffusion_ema", "diffusion_t_sampling", "condition", "init_select", "init_candidates", "init_steps",
           "init_states", "team_reward", "prefix", "regq", "holdout_every", "prey", "dataset_format",
           "torch_deterministic", "track", "wandb_project_name", "wandb_entity", "save_model", "t_min", "t_max",
           "polyak", "diffusion_blocks", "diffusion_lr", "critic_lr", "video_episodes")  # fmt: skip


def read_run(run_dir: str, args_cls, resolve) -> tuple:
    """(the run's Args, its results.json) of a finished run; RunError when the directory is not one."""
    res_path = os.path.join(run_dir, "results.json")
    if not os.path.isdir(run_dir):
        raise RunError(f"--eval-from {run_dir}: no such directory; give a run directory runs/<run>")
    try:
        with open(res_path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise RunError(f"--eval-from {run_dir}: it has no results.json (not a finished run)") from None
    except (OSError, ValueError) as e:
        raise RunError(f"--eval-from {run_dir}: results.json cannot be read ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("args"), dict) or "agent_order" not in results:
        raise RunError(f"--eval-from {run_dir}: results.json has no 'args' and 'agent_order' (not a run of this repo)")
    names = {f.name for f in dataclasses.fields(args_cls)}
    saved = {k: v for k, v in results["args"].items() if k not in RETIRED}  # they do not change an evaluation
    if isinstance(saved.get("capture_video"), bool):  # a flag before it counted episodes
        saved["capture_video"] = 0
    unknown = sorted(set(saved) - names)
    if unknown:
        raise RunError(
            f"--eval-from {run_dir}: results.json's args has {unknown[0]!r}, which this script does not know "
            f"(a run of the other script, or of another version)"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return resolve(args_cls(**kwargs)), results


# the settings of an --eval-from command that apply to the evaluation; every other one is the saved run's
EVAL_SETTINGS = (
    "eval_from",
    "eval_episodes",
    "capture_video",
    "video_every",
    "trust_pickle",
    "threads",
)


def open_saved(args, args_cls, resolve) -> tuple:
    """(settings of the evaluation, the run's own settings, its results.json) for --eval-from args.eval_from: the
    run's settings with EVAL_SETTINGS taken from `args`. RunError if it is not a finished run or cannot be written."""
    stop_at_once()  # nothing is trained: a stop signal ends the evaluation at once
    run_dir = args.eval_from
    run_args, results = read_run(run_dir, args_cls, resolve)
    base = resolve(args_cls(env_id=args.env_id, dataset=args.dataset, eval_from=run_dir))  # this command's defaults
    ignored = [f"--{k.replace('_', '-')}" for k in (f.name for f in dataclasses.fields(args_cls))
               if k not in EVAL_SETTINGS and getattr(args, k) != getattr(base, k)
               and not (k == "stage1_seed" and args.stage1_seed == args.seed)]  # fmt: skip
    ignored += [f"--{k.replace('_', '-')}" for k in ("env_id", "dataset") if getattr(args, k) != getattr(args_cls, k)]
    if ignored:
        raise RunError(
            f"--eval-from evaluates the run with its own settings; {', '.join(ignored)} would be ignored (give only "
            f"{', '.join('--' + k.replace('_', '-') for k in EVAL_SETTINGS[1:] if hasattr(args, k))})"
        )
    why = unwritable_dir(run_dir)
    if why:
        raise RunError(f"--eval-from {run_dir}: cannot write its evaluation there ({why})")
    ev_args = dataclasses.replace(run_args, **{k: getattr(args, k) for k in EVAL_SETTINGS if hasattr(run_args, k)})
    set_threads(args.threads)
    return ev_args, run_args, results


def saved_actors(actors_cls, env, args, results) -> tuple:
    """(the run's actors, with actors.pt's weights; agent order; obs_max) for the env `env` of the run."""
    names = env.possible_agents
    obs_max = max(env.observation_space(a).shape[0] for a in names)
    act_dim = env.action_space(names[0]).shape[0]
    order = list(results["agent_order"])
    what = (
        f"{args.env_id} ({len(names)} agents, observations padded to {obs_max}, actions of {act_dim}, actor_hidden "
        f"{args.actor_hidden})"
    )
    path = os.path.join(args.eval_from, "actors.pt")
    actors = load_actors(actors_cls(len(names), obs_max, act_dim, args.actor_hidden), path, order, what)
    print(f"evaluating {args.eval_from} over {args.eval_episodes} episodes", file=sys.stderr, flush=True)
    return actors, order, obs_max


def write_evaluation(ev_args, run_args, results, ev: dict, videos, seconds: float) -> dict:
    """<run>/eval_<E>_episodes.json of an --eval-from evaluation (ev: its "return", "normalized_score" and what
    else the script's evaluate reports), and the line that says how it compares with the run's own final one."""
    E = ev_args.eval_episodes
    same = E == run_args.eval_episodes
    ref = results.get("normalization")
    ev.setdefault("normalized_score", normalized_score(ev["return"], ref.get("constants", ref) if ref else None))
    out = {
        "eval_from": os.path.abspath(ev_args.eval_from),
        "env_id": ev_args.env_id,
        "eval_episodes": E,
        "env_seeds": [ev_args.seed + 100 + k for k in range(E)],
        **ev,
        "run_final_return": results.get("final_return"),
        "same_protocol_as_run": same,
        "videos": videos,
        "seconds": seconds,
    }
    path = os.path.join(ev_args.eval_from, f"eval_{E}_episodes.json")
    write_json_atomic(out, path)
    episodes = lambda k: f"{k} episode" + ("s" if k != 1 else "")  # noqa: E731
    mean = "no mean (failed episodes)" if ev["return"] is None else f"{ev['return']:.2f}"
    if ev["normalized_score"] is not None:
        mean += f" (normalized score {ev['normalized_score']:.1f})"
    final = results.get("final_return")
    check = f"; the run's final evaluation: {'–' if final is None else f'{final:.2f}'}" + (
        " (the same episodes)" if same else f" over {episodes(run_args.eval_episodes)}"
    )
    print(f"return {mean} over {episodes(E)}{check} -> {path}")
    return out


def load_actors(actors: torch.nn.Module, path: str, order: list[int], what: str) -> torch.nn.Module:
    """`actors` (the script's freshly built Actors) with the weights of `path`; `what` describes the env for the
    error message. RunError if the file is missing, not weights-only, or of other shapes or agent order."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise RunError(f"{path} does not exist; the run did not finish, or its actors.pt was removed") from None
    except Exception as e:  # torch's advice (weights_only=False) would run the file's code: never taken here
        why = "a pickle of Python objects, never unpickled here" if "Weights only" in str(e) else "corrupt or truncated"
        raise RunError(
            f"{path} is not an actors file this repository wrote ({why}); use the run's own actors.pt"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("actors"), dict):
        raise RunError(f"{path} has no 'actors' state dict")
    want = {k: tuple(v.shape) for k, v in actors.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in saved["actors"].items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        k = diff[0]
        raise RunError(f"{path} does not fit {what}: {k} is {have.get(k, 'missing')}, expected {want.get(k, 'absent')}")
    if "order" in saved and saved["order"].tolist() != list(order):
        raise RunError(f"{path} was saved for agent order {saved['order'].tolist()}, results.json says {order}")
    actors.load_state_dict(saved["actors"])
    return actors.eval()


class Recorder(torch.nn.Module):
    """The actors, recording every batched call of the script's evaluate: (observations, actions), (n, B, .)."""

    def __init__(self, actors):
        super().__init__()
        self.actors, self.calls = actors, []

    def forward(self, obs):
        act = self.actors(obs)
        self.calls.append((obs.cpu().numpy().copy(), act.cpu().numpy().copy()))
        return act


def recorded_rollout(run_eval, policy):
    """The evaluation's episodes played by `policy` (run_eval(policy) -> the script's evaluation dict), for the
    diagnostics: (mean return, obs and act of every step (n, steps, .), None, {"episode_lengths"})."""
    rec = Recorder(policy)
    ev = run_eval(rec)
    obs, act = (np.concatenate([c[i] for c in rec.calls], 1) for i in (0, 1))
    return ev["return"], obs, act, None, {"episode_lengths": ev["episode_lengths"]}


def padded(obs: dict, names: list[str], order: list[int], obs_max: int) -> np.ndarray:
    """(n, obs_max): position k holds agent order[k]'s own observation, zero-padded (as the scripts' evaluate)."""
    o = np.zeros((len(order), obs_max), np.float32)
    for k, i in enumerate(order):
        x = obs[names[i]]
        o[k, : len(x)] = x
    return o


def replay_policy(steps: list, names: list[str], order: list[int], obs_max: int, episode: int):
    """A policy that gives, step by step, the actions the evaluation took in this episode, after checking that the
    replayed episode sees exactly the observations the evaluation saw."""
    t = iter(range(len(steps) + 1))

    def policy(obs: dict) -> dict:
        k = next(t)
        if k >= len(steps):
            raise RunError(f"episode {episode}: the replay goes on after the evaluation's {len(steps)} steps")
        o, act = steps[k]
        if not np.array_equal(padded(obs, names, order, obs_max), o):
            raise RunError(f"episode {episode}: the replay's observations differ from the evaluation's at step {k}")
        return {names[i]: act[p] for p, i in enumerate(order)}

    return policy


def episode_steps(calls: list, lengths: list[int], failed: dict, e: int) -> list:
    """Episode e's (obs, act) of the recorded batched calls: at call t the batch holds the episodes still running
    (length >= t) and those that fail at t."""
    out = []
    for t, (o, a) in enumerate(calls, start=1):
        live = sorted(
            {j for j, n in enumerate(lengths) if n >= t} | {k for k, f in failed.items() if f["env_step"] == t}
        )
        if len(live) != o.shape[1]:
            raise RunError(f"step {t}: {o.shape[1]} observations in the evaluation's batch, {len(live)} expected")
        if e in live and (e not in failed or t <= lengths[e]):
            out.append((o[:, live.index(e)], a[:, live.index(e)]))
    return out


def record_evaluation(
    run_eval,
    actors,
    draw,
    names: list[str],
    seed: int,
    order: list[int],
    obs_max: int,
    out: str,
    episodes: int,
    fps: float,
) -> dict:
    """The evaluation of `actors` (run_eval(actors) -> {"return", "episode_lengths", "episode_returns" or None,
    "failed_episodes"}, the script's evaluate), recorded, and GIFs of its first `episodes` episodes in `out`.

    draw(policy, seed, rewards) -> (frames, return) plays one episode from env.reset(seed=seed) in an env of its
    own and returns its frames and its return in the script's metric; rewards receives each step's rewards. The
    return is checked against the evaluation's where it reports per-episode returns. Returns {"return" (the evaluation's
    mean), "episodes": [{"episode", "env_seed", "steps", "return", "gif", "frames", "bytes"}]}."""
    rec = Recorder(actors)
    ev = run_eval(rec)
    lengths, ev_returns = ev["episode_lengths"], ev.get("episode_returns")
    failed = {f["episode"]: f for f in ev.get("failed_episodes", [])}
    videos = []
    for k in range(episodes):
        env_seed = seed + 100 + k
        if k in failed:
            videos.append({"episode": k, "env_seed": env_seed, "failed": failed[k]["what"]})
            continue
        rewards: list = []
        policy = replay_policy(episode_steps(rec.calls, lengths, failed, k), names, order, obs_max, k)
        frames, ret = draw(policy, env_seed, rewards)
        if len(rewards) != lengths[k] or (ev_returns is not None and ret != ev_returns[k]):
            raise RunError(
                f"episode {k}: the replay ({len(rewards)} steps, return {ret}) differs from the evaluation "
                f"({lengths[k]} steps, return {ev_returns[k] if ev_returns is not None else '?'})"
            )
        path = os.path.join(out, f"episode_{k}.gif")
        nbytes = render.save_gif(frames, path, fps)
        videos.append(
            {
                "episode": k,
                "env_seed": env_seed,
                "steps": len(rewards),
                "return": ret,
                "gif": path,
                "frames": len(frames),
                "bytes": nbytes,
            }
        )
        print(
            f"episode {k} (env seed {env_seed}): {len(rewards)} steps, return {ret:.4f}; {len(frames)} frames, "
            f"{nbytes / 1024:.0f} KiB -> {path}"
        )
    return {"return": ev["return"], "episodes": videos}
