"""Make the project's Multi-agent MuJoCo datasets from the committed behaviour policies (rollouts only).

Qualities (OMAR / D4RL recipe; see docs/datasets.md):
  random         an untrained actor network (tanh MLP, initialised from torch seed 0): small, smooth actions
  medium         the first training snapshot at ~40 % of the way from random to expert return (seed 0)
  medium-replay  the training snapshots from the start up to medium (seed 0), equal shares
  expert         the best training snapshot (seed 0)
  medium-expert  medium and expert, half each (as OMIGA's datasets)
  mixture        the experts of independently trained runs (seeds 0, 1, 2; Hopper 0, 2, 3), a third each; how much their
                 gaits differ: docs/datasets.md "Multi-agent MuJoCo datasets"

Every rollout adds Gaussian noise (std `COLLECT_NOISE`) to the actions. Episodes last up to 1000 steps; Hopper
and Ant end early when unhealthy (a terminal). Datasets hold an exact number of transitions: the last episode
of each chunk of work is cut there and marked as a truncation.

Usage:
  python -m omsd_data.mamujoco_data --task HalfCheetah-2x3 --quality expert        # make one (cached)
  python -m omsd_data.mamujoco_data --task all --quality all --card                 # cards of all made so far
"""

from __future__ import annotations

import os

import numpy as np
import torch

from envs.mamujoco import ENV_IDS, ENV_VERSION, EPISODE_LEN, env_spec, make_env
from omsd_data.dataset import DatasetError, episode_returns, return_stats
from omsd_data.generation import (
    N_CHUNKS,
    behaviour_tag,
    cli,
    dataset_metadata,
    ensure_generated,
    load_behaviour_file,
    package_versions,
    run_chunks,
    snapshot_info,
)
from omsd_data.generation import check_metadata as _check_metadata
from omsd_data.generation import reference_returns as _reference_returns
from omsd_data.policies import StackedActor, actor_from_state_dict

QUALITIES = ("random", "medium-replay", "medium", "expert", "medium-expert", "mixture")
MIXTURE_SEEDS = (0, 1, 2)
# Hopper's behaviour seed 1 never learned to hop (best evaluation 251); seed 3, trained the same way, replaces it
MIXTURE_SEEDS_OF = {"Hopper-3x1": (0, 2, 3)}


def mixture_seeds(env_id: str) -> tuple[int, ...]:
    """The behaviour seeds whose experts make the mixture of env_id."""
    return MIXTURE_SEEDS_OF.get(env_id, MIXTURE_SEEDS)


COLLECT_NOISE = 0.1
DEFAULT_TRANSITIONS = 1_000_000  # D4RL's size: 1,000 full episodes
WAVE = 16  # episodes stepped together (one batched actor call per step)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEHAVIOUR_DIR = os.path.join(REPO, "omsd_data", "behaviour", "mamujoco")
DATA_DIR = os.environ.get("OMSD_DATA_DIR", os.path.join(REPO, "datasets"))


def default_path(env_id: str, quality: str, n_transitions: int = DEFAULT_TRANSITIONS, seed: int = 0) -> str:
    seeds = {"random": (), "mixture": mixture_seeds(env_id)}.get(quality, (0,))  # the checkpoints the data come from
    tag = f"-b{behaviour_tag([os.path.join(BEHAVIOUR_DIR, f'{env_id}_seed{s}.pt') for s in seeds])}" if seeds else ""
    return os.path.join(DATA_DIR, "mamujoco", f"{env_id}-{quality}-{ENV_VERSION}{tag}-n{n_transitions}-s{seed}.npz")


def load_behaviour(env_id: str, seed: int = 0) -> tuple[dict, dict]:
    return load_behaviour_file(
        os.path.join(BEHAVIOUR_DIR, f"{env_id}_seed{seed}.pt"),
        f"python -m omsd_data.train_behaviour --task {env_id} --seed {seed}",
    )


def team_return(rewards: np.ndarray) -> float:
    """Episode return of the team from per-step rewards (T, n): every agent receives the team reward."""
    return float(np.asarray(rewards, np.float64)[:, 0].sum())


def reference_returns(env_id: str) -> dict | None:
    """Normalisation constants: evaluation returns of the random and expert behaviour policies (seed 0),
    or None while there is no behaviour checkpoint for this env."""
    try:
        info = load_behaviour(env_id, 0)[1]
    except DatasetError:
        return None
    return _reference_returns(info, f"omsd_data/behaviour/mamujoco/{env_id}_seed0.pt")


def random_actor(env_id: str) -> dict:
    """State dict of the `random` behaviour policy: an untrained actor, the same on every machine."""
    spec = env_spec(env_id)
    with torch.random.fork_rng():  # leaves the caller's RNG alone
        torch.manual_seed(0)
        actor = StackedActor(spec["n_agents"], max(spec["obs_dims"]), spec["act_dims"][0], 64)
    return {k: v.detach().clone() for k, v in actor.state_dict().items()}


def rollout(envs, actor, seeds, noise: float, rng, max_len: int = EPISODE_LEN) -> dict:
    """One episode per env, all stepping together (one batched actor call per step) until every episode has
    ended, or was cut after `max_len` steps (a truncation). Observations are zero-padded to the largest agent's
    size for the actor. Returns the transitions in the dataset layout, episode after episode (in the order of
    `seeds`)."""
    names = envs[0].possible_agents
    n, E = len(names), len(envs)
    obs_max = max(envs[0].observation_space(a).shape[0] for a in names)
    obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
    eps = [{k: [] for k in ("obs", "act", "rew", "next", "state", "next_state", "term", "trunc")} for _ in range(E)]
    live, t = list(range(E)), 0
    while live:
        t += 1
        o = np.zeros((n, len(live), obs_max), np.float32)
        for j, e in enumerate(live):
            for i, a in enumerate(names):
                o[i, j, : len(obs[e][a])] = obs[e][a]
        with torch.no_grad():
            act = actor(torch.as_tensor(o)).numpy()
        if noise > 0:
            act = np.clip(act + noise * rng.standard_normal(act.shape), -1.0, 1.0).astype(np.float32)
        still = []
        for j, e in enumerate(live):
            ep, env = eps[e], envs[e]
            ep["state"].append(env.state())
            ep["obs"].append([obs[e][a] for a in names])
            nxt, r, term, trunc, _ = env.step({a: act[i, j] for i, a in enumerate(names)})
            ep["act"].append(act[:, j])
            ep["rew"].append([r[a] for a in names])
            ep["next"].append([nxt[a] for a in names])
            ep["next_state"].append(env.state())
            ep["term"].append(bool(term[names[0]]))
            ep["trunc"].append((bool(trunc[names[0]]) or t == max_len) and not term[names[0]])
            obs[e] = nxt
            if not (ep["term"][-1] or ep["trunc"][-1]):
                still.append(e)
        live = still
    out = {
        "terminals": np.concatenate([ep["term"] for ep in eps]),
        "truncations": np.concatenate([ep["trunc"] for ep in eps]),
        "state": np.concatenate([ep["state"] for ep in eps]).astype(np.float32),
        "next_state": np.concatenate([ep["next_state"] for ep in eps]).astype(np.float32),
    }
    for i in range(n):
        out[f"obs_{i}"] = np.concatenate([[o[i] for o in ep["obs"]] for ep in eps]).astype(np.float32)
        out[f"actions_{i}"] = np.concatenate([[a[i] for a in ep["act"]] for ep in eps]).astype(np.float32)
        out[f"rewards_{i}"] = np.concatenate([[r[i] for r in ep["rew"]] for ep in eps]).astype(np.float32)
        out[f"next_obs_{i}"] = np.concatenate([[x[i] for x in ep["next"]] for ep in eps]).astype(np.float32)
    return out


def _plan(env_id: str, quality: str, n_transitions: int) -> list[tuple[str, dict, int]]:
    """(name, actor state dict, transitions) for each behaviour policy that contributes."""
    if quality == "random":
        pols = [("untrained@torch-seed0", random_actor(env_id))]
    elif quality == "mixture":
        pols = [(f"seed{s}/expert", load_behaviour(env_id, s)[0]["expert"]) for s in mixture_seeds(env_id)]
    elif quality == "medium-expert":
        policies = load_behaviour(env_id, 0)[0]
        pols = [("seed0/medium", policies["medium"]), ("seed0/expert", policies["expert"])]
    elif quality == "medium-replay":
        policies = load_behaviour(env_id, 0)[0]
        pols = sorted(
            [(f"seed0/{k}", v) for k, v in policies.items() if k.startswith("replay_")],
            key=lambda p: int(p[0].split("_")[-1]),
        )
    else:
        pols = [(f"seed0/{quality}", load_behaviour(env_id, 0)[0][quality])]
    shares = np.diff(np.linspace(0, n_transitions, len(pols) + 1).round().astype(int))
    return [(name, sd, int(k)) for (name, sd), k in zip(pols, shares)]


def plan_snapshots(env_id: str, plan: list) -> dict:
    """Training step and evaluation return of every checkpoint snapshot in a plan ('seed1/expert': {...})."""
    snaps = {}
    for name, _, _ in plan:
        if name.startswith("seed"):
            s, key = name.split("/")
            snaps[name] = snapshot_info(load_behaviour(env_id, int(s[4:]))[1], key)
    return snaps


def _chunk(job):
    """Whole episodes (waves of WAVE stepped together) until `count` transitions; the last one is cut."""
    env_id, sd, count, chunk_seed = job
    torch.set_num_threads(1)
    actor = actor_from_state_dict(sd)
    rng = np.random.default_rng(chunk_seed)
    envs = [make_env(env_id) for _ in range(WAVE)]
    next_seed = int(np.random.default_rng(chunk_seed).integers(2**31))  # env seed of the next episode
    parts, have = [], 0
    while have < count:
        k = min(WAVE, -(-(count - have) // EPISODE_LEN))  # no more episodes than could be needed
        parts.append(
            rollout(
                envs[:k], actor, next_seed + np.arange(k), COLLECT_NOISE, rng, max_len=min(EPISODE_LEN, count - have)
            )
        )
        have += len(parts[-1]["obs_0"])
        next_seed += k
    out = {k: np.concatenate([p[k] for p in parts])[:count] for k in parts[0]}
    if not (out["terminals"][-1] or out["truncations"][-1]):
        out["truncations"][-1] = True  # the episode cut here: its next_obs is real, so it may bootstrap
    return out


def generate(env_id: str, quality: str, n_transitions=DEFAULT_TRANSITIONS, seed=0, workers=2, verbose=True):
    """Roll out the behaviour policies of (env_id, quality); returns (arrays, metadata)."""
    if env_id not in ENV_IDS:
        raise DatasetError(f"unknown MaMuJoCo env id {env_id!r}; choose one of {', '.join(ENV_IDS)}")
    if quality not in QUALITIES:
        raise DatasetError(f"unknown dataset quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if n_transitions <= 0:
        raise DatasetError(f"n_transitions must be positive, got {n_transitions}")
    plan = _plan(env_id, quality, n_transitions)
    jobs = []
    for p, (_name, sd, k) in enumerate(plan):
        counts = np.diff(np.linspace(0, k, max(1, N_CHUNKS // len(plan)) + 1).round().astype(int))
        jobs += [(env_id, sd, int(c), [seed, p, j]) for j, c in enumerate(counts) if c > 0]
    parts = run_chunks(_chunk, jobs, workers, f"{env_id} {quality}", n_transitions, verbose)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    behaviour = {
        "trainer": "omsd_data/train_behaviour.py (MATD3)",
        "policies": [[n, k] for n, _, k in plan],
        "snapshots": plan_snapshots(env_id, plan),
    }
    meta = dataset_metadata(
        "mamujoco", env_id, ENV_VERSION, quality, seed, agent_names=make_env(env_id).possible_agents,
        collect_noise=COLLECT_NOISE, behaviour=behaviour,
        episode_return=return_stats(episode_returns(arrays, team_return), "team return (sum of the team reward)"),
        normalization=reference_returns(env_id), packages=package_versions(("mujoco", "gymnasium_robotics")),
    )  # fmt: skip
    return arrays, meta


def ensure_dataset(env_id, quality, n_transitions=DEFAULT_TRANSITIONS, seed=0, path=None, workers=2):
    """Load the cached dataset, making it first if it does not exist. Returns (arrays, metadata, path)."""
    path = path or default_path(env_id, quality, n_transitions, seed)
    args = (env_id, quality, n_transitions, seed, workers, lambda: reference_returns(env_id))
    return ensure_generated(path, generate, env_spec(env_id), ENV_VERSION, *args)


def check_metadata(path: str, meta: dict):
    """DatasetError if a dataset file's metadata names another env version or disagrees with its file name."""
    _check_metadata(path, meta, ENV_IDS, QUALITIES, ENV_VERSION)


if __name__ == "__main__":
    cli(
        __doc__ + f"\nenv ids: {', '.join(ENV_IDS)}",
        ENV_IDS,
        QUALITIES,
        "HalfCheetah-2x3",
        DEFAULT_TRANSITIONS,
        default_path,
        ensure_dataset,
    )


def normalization(env_id: str, meta: dict) -> dict | None:
    """The normalisation constants of a run on these data, the dataset's own: a generated dataset's are its behaviour
    policies' evaluation returns, a published one's those of its paper or benchmark (None: no normalized score)."""
    ref = meta.get("normalization")
    if ref is None and meta.get("env_family") == "mamujoco" and meta.get("env_version") == ENV_VERSION:
        ref = reference_returns(env_id)  # a generated file made before datasets stored their constants
    if ref is not None and not ref["expert"] > ref["random"]:
        raise DatasetError(
            f"reference returns of {env_id} have expert {ref['expert']} <= random {ref['random']} "
            f"({ref['source']}); the normalized score would be meaningless"
        )
    return ref
