"""The paper's 2-agent continuous bandit (its "combinatorial mode shift" toy).

Two agents see the same constant 5-d vector of ones, act once in [-1, 1] each, and get the team
reward a1 * a2 (its data: omsd_data/bandit_data.py).
"""

from __future__ import annotations

N_AGENTS, OBS_DIM, ACT_DIM = 2, 5, 1
MODE, MODE_STD = 0.8, 0.1


def reward(a1, a2):
    return a1 * a2
