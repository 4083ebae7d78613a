"""What per-step policies that know the conventions reach on the controlled spread data.

The behaviour models of OMSD act on the current observations only, while each episode of `multimodal-K` follows
one convention drawn at its start. This asks what that costs when the models are exact, for each factorisation of
the joint behaviour: a classifier of each episode's convention (the one whose scripted actions lie nearest to the
episode's actions) is trained on the data, and the oracle samples a convention afresh at every step and acts with
its scripted action plus the data's noise:

  joint        one c ~ p(c | s) for all agents (s: every agent's observation)
  sequential   agent by agent, c_k ~ p(c | o_k, a_<k): agent k sees its own observation and the earlier agents'
               actions of this step, as OMSD's sequential conditionals
  independent  c_k ~ p(c | o_k) for every agent on its own, as OMSD's independent marginals

If an oracle reaches the data's return, a model of that factorisation can too, and a lower score of the trained
behaviour models is their fit.

    python benchmark/convention_oracle.py --quality multimodal-3 --factorisation sequential

A diagnostic of the data, not part of OMSD.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs.mpe import EPISODE_LEN, MPEEnv, paper_metric  # noqa: E402
from omsd_data.dataset import episode_returns  # noqa: E402
from omsd_data.mpe_data import (  # noqa: E402
    COLLECT_NOISE,
    CONTROLLED,
    CONVENTIONS,
    convention_actions,
    ensure_dataset,
    rollout,
)

FACTORISATIONS = ("joint", "sequential", "independent")


@dataclass
class Cfg:
    quality: str = "multimodal-3"
    """a controlled spread quality: unimodal | multimodal-2 | multimodal-3"""
    factorisation: str = "joint"
    """joint | sequential | independent (module docstring)"""
    steps: int = 6000
    """training steps of each classifier (batch 512, Adam 1e-3)"""
    episodes: int = 50
    """evaluation episodes (env seeds 100, 101, ...)"""
    seed: int = 0


def episode_labels(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Per transition (obs, act: (n, N, .)), the convention of its episode: the one whose scripted actions lie
    nearest to the episode's actions."""
    N = obs.shape[1]
    err = np.stack(
        [np.linalg.norm(convention_actions(obs, np.tile(c, (N, 1))) - act, axis=-1).sum(0) for c in CONVENTIONS]
    )
    return np.repeat(err.reshape(len(CONVENTIONS), -1, EPISODE_LEN).sum(-1).argmin(0), EPISODE_LEN)


def classifier_inputs(obs, act, k: int, factorisation: str):
    """What agent k's classifier sees: every observation (joint), its own and the earlier agents' actions
    (sequential), or its own (independent). obs, act: (n, B, .) tensors."""
    if factorisation == "joint":
        return obs.transpose(0, 1).reshape(obs.shape[1], -1)
    return torch.cat([obs[k], *(act[:k] if factorisation == "sequential" else [])], -1)


def main(cfg: Cfg):
    if cfg.quality not in CONTROLLED or not CONTROLLED[cfg.quality][1]:
        raise SystemExit(f"--quality must be unimodal, multimodal-2 or multimodal-3, got {cfg.quality!r}")
    if cfg.factorisation not in FACTORISATIONS:
        raise SystemExit(f"--factorisation must be one of {', '.join(FACTORISATIONS)}, got {cfg.factorisation!r}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    arrays = ensure_dataset("simple_spread", cfg.quality)[0]
    obs = np.stack([arrays[f"obs_{i}"] for i in range(3)])
    act = np.stack([arrays[f"actions_{i}"] for i in range(3)])
    labels = torch.as_tensor(episode_labels(obs, act))
    obs, act = torch.as_tensor(obs), torch.as_tensor(act)
    N, held = len(labels), len(labels) // 20  # the last 5 % of the episodes are held out
    step = torch.arange(N - held, N) % EPISODE_LEN
    nets = []
    for k in range(1 if cfg.factorisation == "joint" else 3):
        x = classifier_inputs(obs, act, k, cfg.factorisation)
        net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(cfg.steps):
            i = torch.randint(N - held, (512,))
            loss = nn.functional.cross_entropy(net(x[i]), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = (net(x[N - held :]).argmax(-1) == labels[N - held :]).float()
        print(
            f"classifier {k}: held-out accuracy {right.mean():.3f} (steps 0-2 {right[step < 3].mean():.3f}, "
            f"steps 5- {right[step >= 5].mean():.3f}; chance {1 / CONTROLLED[cfg.quality][0]:.3f})"
        )
        nets.append(net)
    rng = np.random.default_rng(cfg.seed)

    def draw(net, x):  # one convention per row of x, from the classifier's probabilities
        with torch.no_grad():
            p = net(x).softmax(-1).numpy().astype(np.float64)
        return np.array([rng.choice(3, p=q / q.sum()) for q in p])

    def oracle(o):  # (n, E, obs) -> (n, E, 2), the data's noise included (the later agents see noisy prefixes)
        E = o.shape[1]
        a = torch.zeros(3, E, 2)
        c = draw(nets[0], classifier_inputs(o, a, 0, "joint")) if cfg.factorisation == "joint" else None
        for k in range(3):
            c_k = c if c is not None else draw(nets[k], classifier_inputs(o, a, k, cfg.factorisation))
            landmark_of = np.array(CONVENTIONS)[c_k]  # (E, n): agent k's column is the one used
            a_k = convention_actions(o.numpy(), landmark_of)[k]
            a[k] = torch.as_tensor(np.clip(a_k + COLLECT_NOISE * rng.standard_normal(a_k.shape), -1.0, 1.0))
        return a

    envs = [MPEEnv("simple_spread") for _ in range(cfg.episodes)]
    out = rollout(envs, oracle, 100 + np.arange(cfg.episodes), 0.0, rng)
    ret = episode_returns(out, lambda r: paper_metric("simple_spread", r))
    data = episode_returns(arrays, lambda r: paper_metric("simple_spread", r))
    print(
        f"{cfg.quality}, {cfg.factorisation} oracle: return {ret.mean():.1f} ± {ret.std(ddof=1):.1f} (ddof 1, "
        f"{cfg.episodes} episodes); data {data.mean():.1f}"
    )


if __name__ == "__main__":
    main(tyro.cli(Cfg))
