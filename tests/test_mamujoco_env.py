"""The MaMuJoCo configurations: PettingZoo API, shapes, team reward, termination vs truncation, determinism."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from envs.mamujoco import ENV_IDS, EPISODE_LEN, env_spec, make_env

SHAPES = {  # env id: (per-agent obs, per-agent action, state)
    "HalfCheetah-2x3": ([12, 12], [3, 3], 17),
    "Ant-2x4": ([63, 63], [4, 4], 105),
    "Ant-2x4-nocf": ([21, 21], [4, 4], 27),
    "Hopper-3x1": ([8, 9, 8], [1, 1, 1], 11),
    "HalfCheetah-6x1": ([9, 9, 8, 9, 9, 8], [1] * 6, 17),
}


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_parallel_api(env_id):
    parallel_api_test(make_env(env_id), num_cycles=200)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_shapes(env_id):
    obs_dims, act_dims, state_dim = SHAPES[env_id]
    spec = env_spec(env_id)
    assert (spec["obs_dims"], spec["act_dims"], spec["state_dim"]) == (obs_dims, act_dims, state_dim)
    env = make_env(env_id)
    obs, _ = env.reset(seed=0)
    assert [obs[a].shape[0] for a in env.possible_agents] == obs_dims
    assert env.state().shape == (state_dim,)


@pytest.mark.parametrize("env_id", ["HalfCheetah-2x3", "Hopper-3x1"])
def test_one_team_reward_and_episode_ends(env_id):
    env = make_env(env_id)
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    for t in range(1, EPISODE_LEN + 1):  # noqa: B007 (t is read after the loop)
        acts = {a: rng.uniform(-1, 1, env.action_space(a).shape).astype(np.float32) for a in env.agents}
        _, rew, term, trunc, _ = env.step(acts)
        assert len(set(rew.values())) == 1  # every agent gets the same team reward
        if any(term.values()) or any(trunc.values()):
            break
    if env_id == "HalfCheetah-2x3":  # never unhealthy: cut by the time limit only
        assert t == EPISODE_LEN and all(trunc.values()) and not any(term.values())
    else:  # random actions make Hopper unhealthy well before 1000 steps: a terminal, not a truncation
        assert t < EPISODE_LEN and all(term.values()) and not any(trunc.values())


@pytest.mark.parametrize("env_id", ["HalfCheetah-6x1", "Hopper-3x1"])
def test_same_seed_same_trajectory(env_id):
    def trajectory(seed):
        env = make_env(env_id)
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        out = [np.concatenate([obs[a] for a in env.possible_agents])]
        for _ in range(30):
            obs, rew, term, trunc, _ = env.step({a: rng.uniform(-1, 1, env.action_space(a).shape) for a in env.agents})
            if not env.agents:
                break
            out.append(np.concatenate([obs[a] for a in env.possible_agents]))
        return np.stack(out)

    a, b, c = trajectory(3), trajectory(3), trajectory(4)
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_unknown_env_id():
    with pytest.raises(ValueError, match="unknown MaMuJoCo env id 'Walker-2x3'"):
        make_env("Walker-2x3")
