"""What a per-step (Markov) joint policy can reach on the controlled spread data when it knows the conventions.

The behaviour models of OMSD act on the current observations only, while each episode of `multimodal-K` follows
one convention drawn at its start. This asks whether that alone costs return: a classifier p(c | s) is trained on
the data's states (all agents' observations) with each episode's convention as label (the convention whose scripted
actions lie nearest to the episode's actions); the oracle then samples c ~ p(c | s) afresh at every step, for all
agents together, and acts with convention c's scripted action plus the data's noise. If it reaches the data's
return, a per-step model of mu(a | s) can too, and a lower score of the behaviour models is their fit.

    python benchmark/convention_oracle.py --quality multimodal-3

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
from envs.dataset import episode_returns, n_agents_of  # noqa: E402
from envs.mpe import EPISODE_LEN, MPEEnv, paper_metric  # noqa: E402
from envs.mpe_data import COLLECT_NOISE, CONTROLLED, CONVENTIONS, convention_actions, ensure_dataset, rollout  # noqa: E402


@dataclass
class Cfg:
    quality: str = "multimodal-3"
    """a controlled spread quality: unimodal | multimodal-2 | multimodal-3"""
    steps: int = 6000
    """classifier training steps (batch 512, Adam 1e-3)"""
    episodes: int = 50
    """evaluation episodes (env seeds 100, 101, ...)"""
    seed: int = 0


def episode_labels(arrays: dict) -> np.ndarray:
    """Per transition, the convention of its episode: the one whose scripted actions lie nearest to the episode's."""
    n = n_agents_of(arrays)
    obs = np.stack([arrays[f"obs_{i}"] for i in range(n)])
    act = np.stack([arrays[f"actions_{i}"] for i in range(n)])
    N = obs.shape[1]
    err = np.stack(
        [np.linalg.norm(convention_actions(obs, np.tile(c, (N, 1))) - act, axis=-1).sum(0) for c in CONVENTIONS]
    )
    per_episode = err.reshape(len(CONVENTIONS), -1, EPISODE_LEN).sum(-1).argmin(0)
    return np.repeat(per_episode, EPISODE_LEN)


def main(cfg: Cfg):
    if cfg.quality not in CONTROLLED or not CONTROLLED[cfg.quality][1]:
        raise SystemExit(f"--quality must be unimodal, multimodal-2 or multimodal-3, got {cfg.quality!r}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    arrays = ensure_dataset("simple_spread", cfg.quality)[0]
    labels = torch.as_tensor(episode_labels(arrays))
    state = torch.as_tensor(arrays["state"])
    N, held = len(labels), len(labels) // 20  # the last 5 % of the episodes are held out
    net = nn.Sequential(nn.Linear(state.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(cfg.steps):
        i = torch.randint(N - held, (512,))
        loss = nn.functional.cross_entropy(net(state[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (net(state[N - held :]).argmax(-1) == labels[N - held :]).numpy()
    first = np.arange(N - held, N) % EPISODE_LEN == 0
    rng = np.random.default_rng(cfg.seed)

    def oracle(obs):  # (n, E, obs) -> (n, E, 2): c ~ p(c | s) per episode, every agent acts with convention c
        with torch.no_grad():
            p = net(obs.transpose(0, 1).reshape(obs.shape[1], -1)).softmax(-1).numpy().astype(np.float64)
        c = np.array([rng.choice(3, p=q / q.sum()) for q in p])
        return torch.as_tensor(convention_actions(obs.numpy(), np.array(CONVENTIONS)[c]))

    envs = [MPEEnv("simple_spread") for _ in range(cfg.episodes)]
    out = rollout(envs, oracle, 100 + np.arange(cfg.episodes), COLLECT_NOISE, rng)
    ret = episode_returns(out, lambda r: paper_metric("simple_spread", r))
    data = episode_returns(arrays, lambda r: paper_metric("simple_spread", r))
    print(
        f"{cfg.quality}: classifier accuracy on held-out states {right.mean():.3f} "
        f"(first steps {right[first].mean():.3f}, chance {1 / CONTROLLED[cfg.quality][0]:.3f}); "
        f"oracle return {ret.mean():.1f} ± {ret.std(ddof=1):.1f} (ddof 1, {cfg.episodes} episodes); "
        f"data {data.mean():.1f}"
    )


if __name__ == "__main__":
    main(tyro.cli(Cfg))
