"""How different are the behaviour policies inside a dataset? For each file, per agent:
  marginal share     the share of the action variance explained by *which* behaviour policy acted
                     (between-policy variance / total variance, summed over action dimensions);
  disagreement       (MaMuJoCo) the policies' deterministic actions on the *same* 10,000 dataset observations:
                     mean over policy pairs of ||a_p - a_q||^2, divided by twice the data's total action variance
                     (0: they act identically; ~1: as different as two random rows of the data);
and each policy's mean action. Near 0 means the policies act alike (close to unimodal per agent); large values
mean each agent's actions mix distinct behaviours, the situation OMSD's sequential decomposition is meant for.
Disagreement is an upper bound on how multimodal the data are given an observation: where the policies visit
different observations, the data hold only one policy's action there.

    python benchmark/mixture_stats.py datasets/mamujoco/HalfCheetah-2x3-mixture-*.npz

Works on any dataset this repo generates (MPE or MaMuJoCo): the rows of each behaviour policy are consecutive,
in the order and counts (transitions on MaMuJoCo, episodes on MPE) of the metadata's `behaviour.policies`.
A diagnostic, not part of OMSD.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from omsd_data.dataset import DatasetError, episode_ends, load_dataset, n_agents_of  # noqa: E402


def policy_action_stats(arrays: dict, policies: list) -> dict:
    """{'shares': [per agent], 'means': {policy: [per agent mean action]}} for consecutive blocks of rows."""
    counts, rows = [int(k) for _, k in policies], len(arrays["obs_0"])
    ends = episode_ends(arrays) + 1  # the row after each episode's last
    if sum(counts) == rows:  # MaMuJoCo: counts are transitions
        bounds = np.cumsum([0] + counts)
    elif sum(counts) == len(ends):  # MPE: counts are episodes
        bounds = np.concatenate([[0], ends[np.cumsum(counts) - 1]])
    else:
        raise DatasetError(
            f"the metadata's behaviour policies cover {sum(counts)} rows or episodes, the data has "
            f"{rows} rows in {len(ends)} episodes; this dataset was not made by this repo's generators"
        )
    shares, means = [], {name: [] for name, _ in policies}
    for i in range(n_agents_of(arrays)):
        a = arrays[f"actions_{i}"].astype(np.float64)
        blocks = [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        mu = np.stack([b.mean(0) for b in blocks])  # (policies, act_dim)
        w = np.diff(bounds)[:, None] / len(a)  # each policy's share of the rows
        between = (w * (mu - a.mean(0)) ** 2).sum()
        shares.append(float(between / a.var(0).sum()))
        for (name, _), m in zip(policies, mu):
            means[name].append(m.round(2).tolist())
    return {"shares": shares, "means": means}


def disagreement(arrays: dict, meta: dict, n_obs: int = 10_000) -> list[float]:
    """Per agent: the behaviour policies' deterministic actions on the same observations, pairwise squared
    distance / (2 * total action variance). Uses the committed checkpoints the generator used (MaMuJoCo)."""
    import torch

    from omsd_data import mamujoco_data as md

    plan = md._plan(meta["task"], meta["quality"], len(arrays["obs_0"]))
    now, then = md.plan_snapshots(meta["task"], plan), meta["behaviour"]["snapshots"]
    for name in now:  # the committed checkpoints must be the ones that made the data
        if then.get(name) != now[name]:
            raise DatasetError(
                f"{name} of the committed checkpoints ({now[name]}) is not the policy that made this "
                f"dataset ({then.get(name)}); regenerate the dataset"
            )
    n = n_agents_of(arrays)
    rows = np.random.default_rng(0).choice(len(arrays["obs_0"]), min(n_obs, len(arrays["obs_0"])), replace=False)
    obs_max = max(arrays[f"obs_{i}"].shape[1] for i in range(n))
    o = np.zeros((n, len(rows), obs_max), np.float32)  # zero-padded as in the rollouts
    for i in range(n):
        o[i, :, : arrays[f"obs_{i}"].shape[1]] = arrays[f"obs_{i}"][rows]
    with torch.no_grad():
        acts = [md.actor_from_state_dict(sd)(torch.as_tensor(o)).numpy() for _, sd, _ in plan]  # (n, B, act)
    out = []
    for i in range(n):
        pairs = [((acts[p][i] - acts[q][i]) ** 2).sum(1).mean() for p in range(len(acts)) for q in range(p)]
        out.append(
            float(np.mean(pairs) / (2 * arrays[f"actions_{i}"].astype(np.float64).var(0).sum())) if pairs else 0.0
        )
    return out


def main(paths: list[str]):
    if not paths:
        raise SystemExit("error: give one or more dataset files (.npz made by envs.*_data)")
    for path in paths:
        try:
            arrays, meta = load_dataset(path)
            stats = policy_action_stats(arrays, meta["behaviour"]["policies"])
        except (DatasetError, KeyError) as e:
            raise SystemExit(f"error: {path}: {e}") from None
        print(f"{os.path.basename(path)}  ({meta['task']}, {meta['quality']})")
        print(
            "  marginal share (action variance explained by which policy acted), per agent: "
            + ", ".join(f"{s:.2f}" for s in stats["shares"])
        )
        if meta.get("env_family") == "mamujoco":
            print(
                "  disagreement on the same observations, per agent: "
                + ", ".join(f"{d:.2f}" for d in disagreement(arrays, meta))
            )
        for name, m in stats["means"].items():
            print(f"  {name:>24s} mean action per agent: {m}")


if __name__ == "__main__":
    main(sys.argv[1:])
