"""Videos (GIFs) of evaluation episodes of a saved run, headless.

    python benchmark/video.py --run-dir runs/<run> [--episodes 2] [--out DIR]

Reads the run's results.json (its resolved `args` and `agent_order`) and actors.pt (weights only), rebuilds the
actors with the script's own `Actors` class and checks the weights' shapes against the env (`error:`, exit 2, if
they do not fit). Then it runs the script's own `evaluate` on them: env seeds seed + 100 + k, deterministic
actions, decentralised (each agent on its own observation, zero-padded to the largest observation size, agents in
the run's order), all episodes stepped together with one batched actor call per step, over max(eval_episodes,
--episodes) episodes, i.e. the run's final evaluation itself. Its actor calls are recorded, and each of the first
--episodes episodes is replayed on its own with those actions (checked to see the same observations) and drawn.
Writes <run-dir>/videos/episode_<k>.gif (or DIR/episode_<k>.gif), prints each episode's return in the script's
metric (MPE: `envs.mpe.paper_metric`; MaMuJoCo: the team return) and the evaluation's mean beside results.json's
final_return.

MPE frames are mpe2's own drawing (pygame, SDL_VIDEODRIVER=dummy); MaMuJoCo frames are MuJoCo's (MUJOCO_GL=egl);
see envs/render.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from envs import render  # noqa: E402
from envs.mpe import TASKS, normalized_score, paper_metric  # noqa: E402


@dataclass
class Cfg:
    run_dir: str
    """a finished run's directory (results.json and actors.pt, written with --save-model)"""
    episodes: int = 2
    """evaluation episodes to record: k = 0 .. episodes-1, env seed seed + 100 + k"""
    out: str = ""
    """directory of the GIFs (default: <run-dir>/videos)"""
    every: int = 0
    """record every k-th step (default: 1 for MPE, 5 for MaMuJoCo)"""
    video_steps: int = 0
    """MaMuJoCo: record only the first this many steps (default 0: the whole episode); the episode and its return
    are always complete"""
    fps: float = 0
    """frames per second of the GIF (default: MPE 10, mpe2's render_fps; MaMuJoCo 20)"""
    size: int = 0
    """frame side in pixels (default: MPE 256, MaMuJoCo 320)"""


class VideoError(Exception):
    pass


def script_of(env_id: str):
    if env_id in TASKS:
        import oma_sd_mpe as mod
    elif env_id == "bandit":
        raise VideoError("the bandit has no episodes to show")
    else:
        import oma_sd_mamujoco as mod
    return mod


def args_of(mod, saved: dict):
    """The script's Args from results.json's `args` (lists back to tuples), checked by its resolve_args."""
    kwargs = {}
    for f in dataclasses.fields(mod.Args):
        if f.name in saved:
            v = saved[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return mod.resolve_args(mod.Args(**kwargs))


def env_shapes(env_id: str, env) -> tuple[list[int], int]:
    names = env.possible_agents
    obs_dims = [int(env.observation_space(a).shape[0]) for a in names]
    act_dims = {int(env.action_space(a).shape[0]) for a in names}
    if len(act_dims) != 1:
        raise VideoError(f"{env_id}: agents with different action sizes {sorted(act_dims)}")
    return obs_dims, act_dims.pop()


def load_actors(mod, path: str, n: int, obs_max: int, act_dim: int, hidden: int, order: list[int], env_id: str):
    """The script's Actors with actors.pt's weights; VideoError if the file does not fit the env."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise VideoError(f"{path} does not exist (the run was made without --save-model?)") from None
    except Exception as e:  # not a weights-only torch file
        raise VideoError(f"{path} cannot be loaded as weights only: {e}") from None
    if not isinstance(saved, dict) or "actors" not in saved:
        raise VideoError(f"{path} has no 'actors' state dict")
    actors = mod.Actors(n, obs_max, act_dim, hidden)
    want = {k: tuple(v.shape) for k, v in actors.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in saved["actors"].items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        k = diff[0]
        raise VideoError(
            f"{path} does not fit {env_id} ({n} agents, observations padded to {obs_max}, actions of "
            f"{act_dim}, actor_hidden {hidden}): {k} is {have.get(k, 'missing')}, expected "
            f"{want.get(k, 'absent')}"
        )
    if "order" in saved and saved["order"].tolist() != order:
        raise VideoError(f"{path} was saved for agent order {saved['order'].tolist()}, results.json says {order}")
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


def padded(obs: dict, names: list[str], order: list[int], obs_max: int) -> np.ndarray:
    """(n, obs_max): position k holds agent order[k]'s own observation, zero-padded (as the scripts' evaluate)."""
    o = np.zeros((len(order), obs_max), np.float32)
    for k, i in enumerate(order):
        x = obs[names[i]]
        o[k, : len(x)] = x
    return o


def replay_policy(
    steps: list[tuple[np.ndarray, np.ndarray]], names: list[str], order: list[int], obs_max: int, episode: int
):
    """A policy that gives, step by step, the actions the evaluation took in this episode, after checking that the
    replayed episode sees exactly the observations the evaluation saw."""
    t = iter(range(len(steps) + 1))

    def policy(obs: dict) -> dict:
        k = next(t)
        if k >= len(steps):
            raise VideoError(f"episode {episode}: the replay goes on after the evaluation's {len(steps)} steps")
        o, act = steps[k]
        if not np.array_equal(padded(obs, names, order, obs_max), o):
            raise VideoError(f"episode {episode}: the replay's observations differ from the evaluation's at step {k}")
        return {names[i]: act[p] for p, i in enumerate(order)}

    return policy


def main(cfg: Cfg) -> list[float]:
    torch.set_num_threads(1)
    res_path = os.path.join(cfg.run_dir, "results.json")
    try:
        with open(res_path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise VideoError(f"{res_path} does not exist (not a finished run)") from None
    if cfg.episodes <= 0:
        raise VideoError(f"--episodes must be a positive integer, got {cfg.episodes}")
    env_id = results["env_id"]
    mod = script_of(env_id)
    args = args_of(mod, results["args"])
    order = list(results["agent_order"])
    is_mpe = env_id in TASKS
    prey = mod.load_prey_arg(args)[0] if is_mpe else None
    env = mod.MPEEnv(env_id, prey=prey) if is_mpe else mod.make_env(env_id)
    names = list(env.possible_agents)
    obs_dims, act_dim = env_shapes(env_id, env)
    if sorted(order) != list(range(len(names))):
        raise VideoError(f"results.json's agent_order {order} is not a permutation of {env_id}'s {len(names)} agents")
    obs_max = max(obs_dims)
    actors = load_actors(
        mod, os.path.join(cfg.run_dir, "actors.pt"), len(names), obs_max, act_dim, args.actor_hidden, order, env_id
    )

    # The script's own evaluation (all episodes stepped together, one batched actor call per step, as in the run),
    # recorded; then each episode is replayed on its own with its recorded actions and drawn.
    E = args.eval_episodes
    run_args = dataclasses.replace(args, eval_episodes=max(E, cfg.episodes))
    rec = Recorder(actors)
    if is_mpe:
        mean = mod.evaluate(rec, run_args, order, obs_max, prey)
        lengths, failed, ev_returns = [env.max_cycles] * run_args.eval_episodes, {}, None
    else:
        ev = mod.evaluate(rec, run_args, order, obs_max)
        mean, lengths, ev_returns = ev["return"], ev["episode_lengths"], ev["episode_returns"]
        failed = {f["episode"]: f for f in ev["failed_episodes"]}

    def steps_of(e: int) -> list:
        out = []
        for t, (o, a) in enumerate(rec.calls, start=1):
            live = sorted(
                {j for j, n in enumerate(lengths) if n >= t}
                | {f["episode"] for f in failed.values() if f["env_step"] == t}
            )
            if len(live) != o.shape[1]:
                raise VideoError(f"step {t}: {o.shape[1]} observations in the evaluation's batch, {len(live)} expected")
            if e in live and (e not in failed or t <= lengths[e]):
                out.append((o[:, live.index(e)], a[:, live.index(e)]))
        return out

    out = cfg.out or os.path.join(cfg.run_dir, "videos")
    every = cfg.every or (1 if is_mpe else 5)
    size = cfg.size or (render.MPE_SIZE if is_mpe else render.MAMUJOCO_SIZE)
    fps = cfg.fps or (10 if is_mpe else 20)
    returns = []
    for k in range(cfg.episodes):
        seed = args.seed + 100 + k
        if k in failed:
            f = failed[k]
            print(
                f"episode {k} (env seed {seed}): failed in the evaluation at step {f['env_step']}: {f['what']}; "
                f"no video"
            )
            returns.append(float("nan"))
            continue
        rewards: list[dict] = []
        policy = replay_policy(steps_of(k), names, order, obs_max, k)
        if is_mpe:
            frames = render.mpe_frames(env, policy, seed, size=size, rewards=rewards)[::every]
            ret = paper_metric(env_id, np.array([[r[a] for a in names] for r in rewards]))
        else:
            env.close()
            env = mod.make_env(env_id)  # a fresh env per episode, as the script's evaluation
            frames = render.mamujoco_frames(
                env, policy, seed, size=size, every=every, rewards=rewards, video_steps=cfg.video_steps or None
            )
            ret = 0.0
            for r in rewards:
                ret += float(r[names[0]])  # the team reward, summed in the evaluation's order
            if len(rewards) != lengths[k] or ret != ev_returns[k]:
                raise VideoError(
                    f"episode {k}: the replay ({len(rewards)} steps, return {ret}) differs from the "
                    f"evaluation ({lengths[k]} steps, return {ev_returns[k]})"
                )
        path = os.path.join(out, f"episode_{k}.gif")
        nbytes = render.save_gif(frames, path, fps)
        returns.append(ret)
        score = f", normalized score {normalized_score(env_id, ret):.1f}" if is_mpe else ""
        print(
            f"episode {k} (env seed {seed}): {len(rewards)} steps, return {ret:.4f}{score}; "
            f"{len(frames)} frames, {nbytes / 1024:.0f} KiB -> {path}"
        )
    env.close()
    final = results.get("final_return")
    if run_args.eval_episodes == E:
        same = "the same" if mean == final else "DIFFERENT"
        print(
            f"evaluation of the saved actors ({E} episodes, as the run's final one): mean return {mean}; "
            f"results.json final_return: {final} ({same})"
        )
    else:
        print(
            f"evaluation of the saved actors over {run_args.eval_episodes} episodes: mean return {mean} (the run's "
            f"final evaluation averages {E}: {final})"
        )
    return returns


if __name__ == "__main__":
    cfg = tyro.cli(Cfg)
    try:
        main(cfg)
    except VideoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the scripts' own errors for bad settings (RunError, DatasetError)
        if type(e).__name__ in ("RunError", "DatasetError"):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
