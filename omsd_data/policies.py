"""Behaviour-policy networks: one small tanh MLP per agent, all agents stacked in one tensor op.

Used by the online trainer (`omsd_data/train_behaviour.py`) that makes the behaviour policies
and by dataset generation, which loads its committed checkpoints (plain tensors, loaded with
`weights_only=True`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StackedLinear(nn.Module):
    """n independent Linear layers applied as one batched matmul: x (n, B, i) -> (n, B, o)."""

    def __init__(self, n: int, i: int, o: int):
        super().__init__()
        bound = 1.0 / math.sqrt(i)  # nn.Linear's default init, per agent
        self.weight = nn.Parameter(torch.empty(n, i, o).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, o).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class StackedActor(nn.Module):
    """Deterministic actors a_i = tanh(MLP_i(o_i)) for n agents with equal obs sizes."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int = 64):
        super().__init__()
        self.l1, self.l2 = StackedLinear(n, obs_dim, hidden), StackedLinear(n, hidden, hidden)
        self.l3 = StackedLinear(n, hidden, act_dim)

    def pre_tanh(self, obs):  # obs (n, B, obs_dim) -> the actions before the tanh squashing
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(obs)))))

    def forward(self, obs):
        return torch.tanh(self.pre_tanh(obs))


def actor_from_state_dict(sd: dict) -> StackedActor:
    n, obs_dim, hidden = sd["l1.weight"].shape
    actor = StackedActor(n, obs_dim, sd["l3.weight"].shape[-1], hidden)
    actor.load_state_dict(sd)
    return actor.eval()
