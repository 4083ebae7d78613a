"""The bandit's data: two equally likely joint modes, N((0.8, 0.8), 0.1^2 I) and N((-0.8, -0.8), 0.1^2 I), clipped
to [-1, 1]: every agent's marginal is bimodal, the product of the marginals puts half its mass on the
mis-coordinated corners (+, -) and (-, +)."""

from __future__ import annotations

import numpy as np

from envs.bandit import N_AGENTS, OBS_DIM, reward
from omsd_data.dataset import checksum

MODE, MODE_STD = 0.8, 0.1
DEFAULT_SAMPLES = 1_000_000
SPEC = {"n_agents": N_AGENTS, "obs_dims": [OBS_DIM] * N_AGENTS, "act_dims": [1] * N_AGENTS}


def make_dataset(n_samples: int = DEFAULT_SAMPLES, seed: int = 42) -> tuple[dict, dict]:
    """The toy dataset in the project's format (one-step episodes, every row terminal)."""
    rng = np.random.default_rng(seed)
    sign = np.where(rng.random(n_samples) < 0.5, 1.0, -1.0)
    acts = np.clip(sign[:, None] * MODE + MODE_STD * rng.standard_normal((n_samples, N_AGENTS)), -1, 1).astype(
        np.float32
    )
    ones = np.ones((n_samples, OBS_DIM), np.float32)
    r = reward(acts[:, 0], acts[:, 1]).astype(np.float32)
    arrays = {
        "terminals": np.ones(n_samples, bool),
        "truncations": np.zeros(n_samples, bool),
        "state": ones,
        "next_state": ones,
    }
    for i in range(N_AGENTS):
        arrays[f"obs_{i}"], arrays[f"next_obs_{i}"] = ones, ones
        arrays[f"actions_{i}"], arrays[f"rewards_{i}"] = acts[:, i : i + 1], r
    meta = {"env_family": "bandit", "task": "bandit", "quality": "two-mode mixture", "generation_seed": seed}
    return arrays, meta


def bandit_data() -> tuple[dict, dict, str]:
    """(arrays, metadata with their checksum, source) of the default bandit dataset, made in memory."""
    arrays, meta = make_dataset()
    meta["sha256"] = checksum(arrays)
    return arrays, meta, "generated in memory"
