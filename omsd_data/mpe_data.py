"""Make the project's MPE datasets from the committed behaviour policies (rollouts only).

Qualities (OMAR's recipe, see docs/datasets.md):
  random         the randomly initialised actors of the behaviour trainer
  medium         the first training snapshot at ~40 % of the way from random to expert return
  medium-replay  the training snapshots from the start up to medium, equal shares, rolled out with
                 the trainer's exploration noise (a close approximation of the replay buffer)
  expert         the best training snapshot
  mixture        the expert with its agents' roles permuted (the 3 cyclic permutations of which network
                 drives which agent), equal shares: three coordination conventions of about the same
                 quality (e.g. which agent takes which landmark), i.e. multimodal joint behaviour

Every rollout adds Gaussian noise (std `COLLECT_NOISE`) to the actions, as in OMAR's data.

Controlled multimodal data (simple_spread only), where the joint modes are known by construction: a
scripted controller steers agent i to landmark CONVENTIONS[k][i] (PD control on the landmark's relative
position, see `convention_actions`); the K conventions are cyclic shifts of who takes which landmark, so
they have the same return distribution (landmarks are placed i.i.d.) and every agent's marginal has K modes.
  unimodal        every episode follows convention 0 (the twin of the two below: same controller)
  multimodal-2    each episode follows one of conventions 0, 1, drawn uniformly
  multimodal-3    each episode follows one of conventions 0, 1, 2
  miscoordinated  each agent draws its own convention among the 3 (what mixing marginals does)
The `-soft` variants (unimodal-soft, multimodal-3-soft, miscoordinated-soft) steer with a softer controller
(`SOFT_CONTROLLER`): 3 % of its actions lie on a corner of the action box against 32 %, so the three modes are
separate points inside the box rather than shared corners (docs/datasets.md).

Usage:
  python -m omsd_data.mpe_data --task simple_spread --quality expert        # make one (cached)
  python -m omsd_data.mpe_data --task all --quality all --card              # cards of all made so far
"""

from __future__ import annotations

import os
import types

import numpy as np
import torch

from envs.mpe import ENV_VERSION, EPISODE_LEN, PREY_DIR, PREY_OBS_DIMS, TASKS, MPEEnv, paper_metric
from omsd_data.dataset import DatasetError, episode_returns, return_stats
from omsd_data.generation import (
    N_CHUNKS,
    behaviour_tag,
    cli,
    dataset_metadata,
    ensure_generated,
    load_behaviour_file,
    package_versions,
    reference_returns,
    run_chunks,
    snapshot_info,
)
from omsd_data.generation import check_metadata as _check_metadata
from omsd_data.policies import actor_from_state_dict

QUALITIES = ("random", "medium-replay", "medium", "expert", "mixture")
CONVENTIONS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))  # convention k: agent i heads for landmark CONVENTIONS[k][i]
# quality -> (number of conventions drawn from, whether the agents share one draw per episode)
CONTROLLED = {"unimodal": (1, True), "multimodal-2": (2, True), "multimodal-3": (3, True), "miscoordinated": (3, False),
              "unimodal-soft": (1, True), "multimodal-3-soft": (3, True),
              "miscoordinated-soft": (3, False)}  # fmt: skip
CONTROLLER = {"kp": 3.0, "kd": 1.0, "version": 1}  # gains of the scripted controller (in the file names' tag)
SOFT_CONTROLLER = {"kp": 1.0, "kd": 0.3, "version": 1}  # the -soft qualities': the gain saturates far less often
MIXTURE_ROLES = ((0, 1, 2), (1, 2, 0), (2, 0, 1))  # agent i is driven by the expert's network roles[i]
COLLECT_NOISE = 0.1
DEFAULT_TRANSITIONS = 100_000  # 4,000 episodes of 25 steps
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEHAVIOUR_DIR = os.path.join(REPO, "omsd_data", "behaviour", "mpe")
DATA_DIR = os.environ.get("OMSD_DATA_DIR", os.path.join(REPO, "datasets"))


def task_qualities(task: str) -> tuple[str, ...]:
    """The dataset qualities of a task: the controlled conventions exist for simple_spread only."""
    return QUALITIES + tuple(CONTROLLED) if task == "simple_spread" else QUALITIES


def default_path(task: str, quality: str, n_transitions: int = DEFAULT_TRANSITIONS, seed: int = 0) -> str:
    if quality in CONTROLLED:
        tag = f"ctrl{CONTROLLER['version']}"
    else:
        # every quality comes from seed 0's run; tag/world's also from the prey they were collected against
        prey = [os.path.join(PREY_DIR, f"{task}.pt")] if task in PREY_OBS_DIMS else []
        tag = behaviour_tag([os.path.join(BEHAVIOUR_DIR, f"{task}_seed0.pt"), *prey])
    return os.path.join(DATA_DIR, "mpe", f"{task}-{quality}-{ENV_VERSION}-b{tag}-n{n_transitions}-s{seed}.npz")


def load_behaviour(task: str, seed: int = 0) -> tuple[dict, dict]:
    return load_behaviour_file(
        os.path.join(BEHAVIOUR_DIR, f"{task}_seed{seed}.pt"),
        f"python -m omsd_data.train_behaviour --task {task} --seed {seed}",
    )


def normalization(task: str) -> dict:
    """The reference returns of every generated dataset of `task` (the scripted ones too): the random and expert
    snapshots of the task's behaviour checkpoint (seed 0), evaluated on this env version."""
    return reference_returns(load_behaviour(task, 0)[1], f"omsd_data/behaviour/mpe/{task}_seed0.pt")


def controller_of(quality: str) -> dict:
    return SOFT_CONTROLLER if quality.endswith("-soft") else CONTROLLER


def convention_actions(obs: np.ndarray, landmark_of: np.ndarray, controller: dict = CONTROLLER) -> np.ndarray:
    """The scripted spread controller: agent i steers towards landmark landmark_of[e, i].

    obs (n, E, 18) in mpe2's spread layout [own vel 2, own pos 2, landmark positions relative to the agent 3x2,
    other agents 2x2, comm 2x2]; landmark_of (E, n) ints. Returns clip(kp * (landmark - pos) - kd * vel, -1, 1).
    """
    n, E, _ = obs.shape
    vel = obs[..., 0:2]
    rel = obs[..., 4:10].reshape(n, E, 3, 2)
    target = rel[np.arange(n)[:, None], np.arange(E)[None, :], landmark_of.T]  # (n, E, 2)
    return np.clip(controller["kp"] * target - controller["kd"] * vel, -1.0, 1.0).astype(np.float32)


def episode_conventions(quality: str, env_seeds) -> np.ndarray:
    """(E, n) convention index of every agent in every episode, drawn from the episode's env seed."""
    K, joint = CONTROLLED[quality]
    draws = np.array([np.random.default_rng([int(s), 7]).integers(K, size=3) for s in env_seeds])
    return np.repeat(draws[:, :1], 3, 1) if joint else draws


class ConventionController:
    """`convention_actions` for a batch of episodes, as a callable like the behaviour actors (torch in, out)."""

    def __init__(self, conventions: np.ndarray, controller: dict = CONTROLLER):  # (E, n) convention of each agent
        self.landmark_of = np.array(CONVENTIONS)[conventions, np.arange(conventions.shape[1])[None, :]]
        self.controller = controller

    def __call__(self, obs):
        return torch.as_tensor(convention_actions(np.asarray(obs), self.landmark_of, self.controller))


def rollout(envs, actor, seeds, noise: float, rng) -> dict:
    """One episode per env (all envs step together; the stacked actor runs once per step for all).

    Returns the transitions of all episodes in the dataset layout, episode after episode.
    """
    names = envs[0].possible_agents
    n, E, T = len(names), len(envs), envs[0].max_cycles
    obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
    cols = {k: [] for k in ("obs", "act", "rew", "next", "state", "next_state")}
    for _ in range(T):
        o = np.stack([[ob[a] for a in names] for ob in obs], axis=1)  # (n, E, obs)
        with torch.no_grad():
            act = actor(torch.as_tensor(o)).numpy()
        if noise > 0:
            act = np.clip(act + noise * rng.standard_normal(act.shape), -1.0, 1.0).astype(np.float32)
        states, rews, nexts, next_states = [], [], [], []
        for e, env in enumerate(envs):
            states.append(env.state())
            obs[e], r, _, _, _ = env.step({a: act[i, e] for i, a in enumerate(names)})
            rews.append([r[a] for a in names])
            nexts.append([obs[e][a] for a in names])
            next_states.append(env.state())
        cols["obs"].append(o.transpose(1, 0, 2))
        cols["act"].append(act.transpose(1, 0, 2))
        cols["rew"].append(np.asarray(rews, np.float32))
        cols["next"].append(np.asarray(nexts, np.float32))
        cols["state"].append(np.asarray(states, np.float32))
        cols["next_state"].append(np.asarray(next_states, np.float32))
    # (T, E, ...) -> episode-major rows (E*T, ...)
    c = {k: np.stack(v, axis=1).reshape(E * T, *np.shape(v[0])[1:]) for k, v in cols.items()}
    out = {
        "terminals": np.zeros(E * T, bool),
        "truncations": np.tile(np.arange(T) == T - 1, E),
        "state": c["state"],
        "next_state": c["next_state"],
    }
    for i in range(n):
        out[f"obs_{i}"], out[f"actions_{i}"] = c["obs"][:, i], c["act"][:, i]
        out[f"rewards_{i}"], out[f"next_obs_{i}"] = c["rew"][:, i], c["next"][:, i]
    return out


def _plan(task: str, quality: str, n_episodes: int) -> list[tuple[str, dict, int]]:
    """(name, actor state dict, episodes) for each behaviour policy that contributes."""
    if quality in CONTROLLED:
        return [(f"scripted/{quality}", {}, n_episodes)]
    if quality == "mixture":
        expert = load_behaviour(task, 0)[0]["expert"]
        pols = [
            (f"seed0/expert@roles{''.join(map(str, r))}", {k: v[list(r)] for k, v in expert.items()})
            for r in MIXTURE_ROLES
        ]
    elif quality == "medium-replay":
        policies = load_behaviour(task, 0)[0]
        pols = [(f"seed0/{k}", v) for k, v in sorted(policies.items(), key=lambda kv: kv[0]) if k.startswith("replay_")]
        pols.sort(key=lambda p: int(p[0].split("_")[-1]))
    else:
        pols = [(f"seed0/{quality}", load_behaviour(task, 0)[0][quality])]
    shares = np.diff(np.linspace(0, n_episodes, len(pols) + 1).round().astype(int))
    return [(name, sd, int(k)) for (name, sd), k in zip(pols, shares)]


def _chunk(job):
    task, sd, seeds, chunk_seed, quality = job
    torch.set_num_threads(1)
    actor = None if quality in CONTROLLED else actor_from_state_dict(sd)
    rng = np.random.default_rng(chunk_seed)
    parts = []
    for lo in range(0, len(seeds), 50):  # 50 envs stepped together
        envs = [MPEEnv(task) for _ in seeds[lo : lo + 50]]
        if quality in CONTROLLED:
            actor = ConventionController(episode_conventions(quality, seeds[lo : lo + 50]), controller_of(quality))
        parts.append(rollout(envs, actor, seeds[lo : lo + 50], COLLECT_NOISE, rng))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def generate(task: str, quality: str, n_transitions=DEFAULT_TRANSITIONS, seed=0, workers=2, verbose=True):
    """Roll out the behaviour policies of (task, quality); returns (arrays, metadata)."""
    if task not in TASKS:
        raise DatasetError(f"unknown MPE task {task!r}; choose one of {', '.join(TASKS)}")
    if quality not in task_qualities(task):
        raise DatasetError(
            f"unknown dataset quality {quality!r} for {task}; choose one of {', '.join(task_qualities(task))}"
        )
    if n_transitions < EPISODE_LEN or n_transitions % EPISODE_LEN:
        raise DatasetError(
            f"n_transitions must be a positive multiple of the episode length {EPISODE_LEN}, got {n_transitions}"
        )
    n_episodes = n_transitions // EPISODE_LEN
    plan = _plan(task, quality, n_episodes)
    jobs, ep = [], 0
    for p, (_name, sd, k) in enumerate(plan):
        seeds = np.arange(ep, ep + k) + seed * 100_000_000  # env seed of every episode
        for c, part in enumerate(np.array_split(seeds, max(1, N_CHUNKS // len(plan)))):
            if len(part):
                jobs.append((task, sd, part, [seed, p, c], quality))
        ep += k
    parts = run_chunks(_chunk, jobs, workers, f"{task} {quality}", n_transitions, verbose)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rets = episode_returns(arrays, lambda r: paper_metric(task, r))
    behaviour = (
        {
            "trainer": "omsd_data/train_behaviour.py (MATD3)",
            "policies": [[n, k] for n, _, k in plan],
            "snapshots": {n: snapshot(task, n) for n, _, _ in plan},
        }
        if quality not in CONTROLLED
        else {
            "trainer": "scripted (omsd_data/mpe_data.py convention_actions)",
            "policies": [[n, k] for n, _, k in plan],
            "controller": controller_of(quality),
            "conventions": [list(c) for c in CONVENTIONS[: CONTROLLED[quality][0]]],
            "shared_draw": CONTROLLED[quality][1],
        }
    )
    meta = dataset_metadata(
        "mpe", task, ENV_VERSION, quality, seed, agent_names=MPEEnv(task).possible_agents,
        collect_noise=COLLECT_NOISE, behaviour=behaviour,
        episode_return=return_stats(rets, "paper (spread: mean over agents; tag/world: predator 0)"),
        normalization=normalization(task), packages=package_versions(("mpe2",)),
    )  # fmt: skip
    return arrays, meta


def snapshot(task: str, name: str) -> dict:
    """Training step and evaluation return (40 deterministic episodes) of a snapshot such as 'seed0/replay_3'."""
    seed, key = name.split("@")[0].split("/")
    return snapshot_info(load_behaviour(task, int(seed[4:]))[1], key)


def env_spec(task: str) -> dict:
    env = MPEEnv(task)
    return {
        "task": task,
        "n_agents": len(env.possible_agents),
        "obs_dims": [env.observation_space(a).shape[0] for a in env.possible_agents],
        "act_dims": [2] * len(env.possible_agents),
        "state_dim": env.state_space.shape[0],
    }


def ensure_dataset(task, quality, n_transitions=DEFAULT_TRANSITIONS, seed=0, path=None, workers=2):
    """Load the cached dataset, making it first if it does not exist. Returns (arrays, metadata, path)."""
    path = path or default_path(task, quality, n_transitions, seed)
    args = (task, quality, n_transitions, seed, workers, lambda: normalization(task))
    return ensure_generated(path, generate, env_spec(task), ENV_VERSION, *args)


def check_metadata(path: str, meta: dict):
    """DatasetError if a dataset file's metadata names another env version or disagrees with its file name."""
    _check_metadata(path, meta, TASKS, QUALITIES + tuple(CONTROLLED), ENV_VERSION)


# ---- how actions and episodes relate to the conventions of the controlled data (omsd_utils/diagnostics.py)
NEAR = 0.3  # an action follows a convention of the controlled spread data when it lies this close to its action


def convention_table(obs: np.ndarray, order: list[int], controller: dict = CONTROLLER) -> np.ndarray:
    """(K, n, B, act): the scripted action of every convention of the controlled spread data (omsd_data/mpe_data.py)
    at observations obs (n, B, obs) in position order; returned in position order too."""
    agents = np.empty_like(obs)
    agents[order] = obs  # position p holds agent order[p]
    return np.stack([convention_actions(agents, np.tile(c, (obs.shape[1], 1)), controller)[order] for c in CONVENTIONS])


def conventions_of(meta: dict) -> types.SimpleNamespace:
    """The convention measures for a dataset, with the controller its metadata names (the default one if none)."""
    controller = meta.get("behaviour", {}).get("controller") or CONTROLLER
    table = lambda obs, order: convention_table(obs, order, controller)  # noqa: E731
    return types.SimpleNamespace(convention_table=table, convention_stats=convention_stats,
                                 assignment_stats=assignment_stats, NEAR=NEAR)  # fmt: skip


def convention_stats(act: np.ndarray, table: np.ndarray) -> dict:
    """How actions (n, B, act) relate to the conventions' actions (K, n, B, act): per position, the share near any
    convention; the share of joint actions with every agent near one and the same convention, overall
    (`joint_in_one`) and per convention (which one was chosen; they can overlap where conventions coincide)."""
    d = np.linalg.norm(act[None] - table, axis=-1)  # (K, n, B)
    joint = (d < NEAR).all(1)  # (K, B)
    return {
        "near_any": (d.min(0) < NEAR).mean(1).tolist(),
        "joint_in_one": float(joint.any(0).mean()),
        "per_convention": joint.mean(1).tolist(),
    }


def assignment_stats(obs_last: np.ndarray, order: list[int], n_conventions: int) -> dict:
    """Which landmark each agent ends the episode nearest to, from the last observations (n, E, obs) in position
    order: the share of episodes ending in each convention, in one of the data's n_conventions, and with the three
    agents at three different landmarks (any assignment without a shared landmark)."""
    agents = np.empty_like(obs_last)
    agents[order] = obs_last
    nearest = np.linalg.norm(agents[..., 4:10].reshape(*agents.shape[:2], 3, 2), axis=-1).argmin(-1)  # (n, E)
    per = [float((nearest == np.array(c)[:, None]).all(0).mean()) for c in CONVENTIONS]
    distinct = float(np.mean([len(set(nearest[:, e])) == nearest.shape[0] for e in range(nearest.shape[1])]))
    return {"per_convention": per, "in_data_convention": float(sum(per[:n_conventions])), "distinct": distinct}


if __name__ == "__main__":
    cli(
        __doc__ + f"\ntasks: {', '.join(TASKS)}",
        TASKS,
        QUALITIES + tuple(CONTROLLED),
        "simple_spread",
        DEFAULT_TRANSITIONS,
        default_path,
        ensure_dataset,
        task_qualities,
    )
