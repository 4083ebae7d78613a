"""The paper's Multi-agent MuJoCo configurations on Gymnasium-Robotics' `mamujoco_v1` (Gymnasium v5 tasks, the
`mujoco` bindings), as PettingZoo parallel envs.

  env id            scenario, partition   agents  per-agent obs (agent_obsk=1)  per-agent action  state
  HalfCheetah-2x3   HalfCheetah 2x3       2       12, 12                        3                 17
  Ant-2x4           Ant 2x4               2       63, 63 (with contact forces)  4                 105
  Ant-2x4-nocf      Ant 2x4, no contacts  2       21, 21                        4                 27
  Hopper-3x1        Hopper 3x1            3       8, 9, 8                       1                 11
  HalfCheetah-6x1   HalfCheetah 6x1       6       9, 9, 8, 9, 9, 8              1                 17

- One team reward: every agent receives the same reward each step (mamujoco_v1's own behaviour; checked by
  the tests).
- Episodes: 1000 steps (truncation), with the tasks' own early termination for Hopper and Ant (termination).
  The two are kept apart in the data.
- `state()` is the single-agent observation of the underlying Gymnasium task.
- Returns are NOT comparable with the MuJoCo 2.0 / 2.1 datasets and numbers of OMAR, OMIGA or og-marl:
  the simulator, the v5 tasks and, for Ant, the action partition differ (docs/datasets.md, "Environments").
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import mujoco
import numpy as np

# gymnasium_robotics warns, and prints a notice to stderr, about its Adroit envs (not used here) on import: an
# error of the scripts stays the one line on stderr
with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    from gymnasium_robotics import mamujoco_v1


def _mujoco_warning(msg: str):
    """Gymnasium's v5 model files use a deprecated attribute (settotalmass): MuJoCo would say so on every env
    creation, on stderr and in a MUJOCO_LOG.TXT in the working directory. Every other warning is shown."""
    if "settotalmass" not in msg:
        print(f"MuJoCo warning: {msg}", file=sys.stderr)


mujoco.set_mju_user_warning(_mujoco_warning)

# env id -> (scenario, agent_conf, extra kwargs of mamujoco_v1.parallel_env)
CONFIGS = {
    "HalfCheetah-2x3": ("HalfCheetah", "2x3", {}),
    "Ant-2x4": ("Ant", "2x4", {}),
    # Both kwargs are needed: the flag alone crashes mamujoco_v1 1.4.2 while building observations.
    "Ant-2x4-nocf": (
        "Ant",
        "2x4",
        {"include_cfrc_ext_in_observation": False, "local_categories": [["qpos", "qvel"], ["qpos"]]},
    ),
    "Hopper-3x1": ("Hopper", "3x1", {}),
    "HalfCheetah-6x1": ("HalfCheetah", "6x1", {}),
}
ENV_IDS = tuple(CONFIGS)
EPISODE_LEN = 1000
ENV_VERSION = "mamujoco_v1-v5"  # stored in every dataset


def make_env(env_id: str, agent_obsk: int = 1):
    """A PettingZoo parallel env of one of the paper's configurations (see the module docstring)."""
    if env_id not in CONFIGS:
        raise ValueError(f"unknown MaMuJoCo env id {env_id!r}; choose one of {', '.join(ENV_IDS)}")
    scenario, conf, kwargs = CONFIGS[env_id]
    return mamujoco_v1.parallel_env(scenario, conf, agent_obsk=agent_obsk, **kwargs)


def env_spec(env_id: str) -> dict:
    """What a dataset for this env must have (same keys as omsd_data.mpe_data.env_spec)."""
    env = make_env(env_id)
    agents = env.possible_agents
    spec = {
        "task": env_id,
        "n_agents": len(agents),
        "obs_dims": [int(env.observation_space(a).shape[0]) for a in agents],
        "act_dims": [int(env.action_space(a).shape[0]) for a in agents],
        "state_dim": int(env.single_agent_env.observation_space.shape[0]),
    }  # = state()
    env.close()
    return spec


def diverged(env, obs: dict, reward, names) -> str:
    """Why one env step's output is unusable ('' if it is fine): a NaN/inf reward or observation, or MuJoCo's
    instability warning (on a bad qpos/qvel/qacc MuJoCo resets the simulation itself, and the episode would go on
    with finite but meaningless numbers; the warning counters say so until the env's next reset)."""
    if not np.isfinite(reward):
        return f"non-finite reward {reward}"
    for a in names:
        if not np.all(np.isfinite(obs[a])):
            return f"non-finite observation of {a}"
    data = getattr(getattr(getattr(env, "single_agent_env", None), "unwrapped", None), "data", None)
    for w in ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC") if data is not None else ():
        if data.warning[int(getattr(mujoco.mjtWarning, w))].number:
            return f"unstable simulation (MuJoCo warning {w}; MuJoCo reset it)"
    return ""


def reconstructable(env_id: str, state: np.ndarray) -> np.ndarray:
    """Which stored state() rows (B, state) `set_state` restores exactly: not Hopper's with a velocity at +-10
    (Gymnasium's v5 Hopper clips its 6 velocities, the last 6 entries, in the observation)."""
    if not env_id.startswith("Hopper"):
        return np.ones(len(state), bool)
    return np.abs(state[:, -6:]).max(1) < 10.0 - 1e-6


def set_state(env, state: np.ndarray) -> dict:
    """Put a reset env into the state of a stored `state()` vector (the task's single-agent observation: qpos
    without its skipped root position, then qvel, then Ant's contact forces). The skipped x (Ant: x, y) is 0: no
    dynamics or reward depends on it. One step from there gives the stored next state to float precision; the
    returned observations differ only in Ant's contact forces, which MuJoCo computes during a step."""
    task = env.unwrapped.single_agent_env.unwrapped
    part = task.observation_structure
    skip, nq = part["skipped_qpos"], part["qpos"]
    qpos = np.concatenate([np.zeros(skip), state[:nq]])
    task.set_state(qpos, np.asarray(state[nq : nq + part["qvel"]], np.float64))
    return env.unwrapped._get_obs()
