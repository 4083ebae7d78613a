"""Reference point for oma_sd_mamujoco.py: plain behaviour cloning (MSE to the dataset actions) with the same
stacked actors, batch and evaluation, to tell how much of a gap comes from the score-based regulariser.

    python benchmark/bc_reference.py --env-id HalfCheetah-2x3 --dataset expert --steps 5000

Prints the evaluation return every --eval-every steps. Not part of OMSD; a diagnostic.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oma_sd_mamujoco as om  # noqa: E402


@dataclass
class Cfg:
    env_id: str = "HalfCheetah-2x3"
    """configuration (see oma_sd_mamujoco.py --help)"""
    dataset: str = "expert"
    """generated dataset quality"""
    steps: int = 5000
    """gradient steps"""
    eval_every: int = 1000
    """steps between evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    lr: float = 3e-4
    """Adam learning rate (constant)"""
    seed: int = 0
    """torch seed"""


def main(cfg: Cfg):
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    args = om.resolve_args(
        om.Args(env_id=cfg.env_id, dataset=cfg.dataset, eval_episodes=cfg.eval_episodes, seed=cfg.seed)
    )
    arrays, _, source = om.load_data(args)
    n = sum(1 for k in arrays if k.startswith("obs_"))
    data = om.to_tensors(arrays, list(range(n)), args)
    del arrays
    N, _, obs_max = data["obs"].shape
    actors = om.Actors(n, obs_max, data["act"].shape[-1], args.actor_hidden)
    opt = torch.optim.Adam(actors.parameters(), lr=cfg.lr)
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(N, (args.policy_batch_size,))
        loss = ((actors(data["obs"][idx].transpose(0, 1)) - data["act"][idx].transpose(0, 1)) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ret = om.evaluate(actors, args, list(range(n)), obs_max)["return"]
            print(
                f"{source}: step {step}  mse {loss.item():.4f}  eval return {ret:.1f}  ({time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main(tyro.cli(Cfg))
