import numpy as np
import pytest
from mpe2 import simple_spread_v3
from pettingzoo.test import parallel_api_test

from envs.mpe import MPEEnv, normalized_score, paper_metric, to_mpe2_action

TASKS = ["simple_spread", "simple_tag", "simple_world"]


@pytest.mark.parametrize("task", TASKS)
def test_parallel_api(task):
    parallel_api_test(MPEEnv(task), num_cycles=30)


@pytest.mark.parametrize(
    "task,n,obs,state", [("simple_spread", 3, 18, 54), ("simple_tag", 3, 16, 62), ("simple_world", 3, 24, 94)]
)
def test_spaces(task, n, obs, state):
    env = MPEEnv(task)
    o, _ = env.reset(seed=0)
    assert len(env.possible_agents) == n
    assert all(v.shape == (obs,) and v.dtype == np.float32 for v in o.values())
    assert env.state().shape == (state,)
    assert all(env.action_space(a).shape == (2,) for a in env.possible_agents)


def _run(task, seed, steps=25):
    env = MPEEnv(task)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(123)
    traj = []
    for _ in range(steps):
        obs, r, term, trunc, _ = env.step({a: rng.uniform(-1, 1, 2) for a in env.possible_agents})
        traj.append(np.concatenate([np.concatenate(list(obs.values())), list(r.values())]))
    return np.array(traj), trunc


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_trajectory(task):
    a, trunc = _run(task, 7)
    b, _ = _run(task, 7)
    c, _ = _run(task, 8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all(trunc.values())  # 25 steps end the episode by truncation


def _place(env, positions, vels=None):
    env.reset(seed=0)
    for ag, p in zip(env.world.agents, positions):
        ag.state.p_pos = np.array(p, dtype=float)
        ag.state.p_vel = np.zeros(2) if vels is None else np.array(vels.pop(0), dtype=float)


def test_spread_reward_formula():
    env = MPEEnv("simple_spread")
    _place(env, [(0.0, 0.0), (0.2, 0.0), (-1.0, -1.0)])
    lms = [(0.5, 0.0), (0.0, 0.0), (2.0, 2.0)]
    for lm, p in zip(env.world.landmarks, lms):
        lm.state.p_pos = np.array(p)
    sc, w = env.scenario, env.world
    # landmark 0: closest agent at 0.3 -> 1/0.3; landmark 1: distance 0 -> capped at 10;
    # landmark 2: closest is agent 1 at sqrt(1.8^2 + 2^2). Agents 0 and 1 overlap (0.2 < 0.3): -5 each.
    landmark_part = 1 / 0.3 + 10 + 1 / np.sqrt(1.8**2 + 2**2)
    assert sc.reward(w.agents[0], w) == pytest.approx(landmark_part - 5)
    assert sc.reward(w.agents[1], w) == pytest.approx(landmark_part - 5)
    assert sc.reward(w.agents[2], w) == pytest.approx(landmark_part)
    assert paper_metric("simple_spread", np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0]])) == pytest.approx(5.0)


@pytest.mark.parametrize("task,bonus", [("simple_tag", 10.0), ("simple_world", 5.0)])
def test_predator_reward_formula(task, bonus):
    env = MPEEnv(task)
    # predators at distance 0.1 (a catch: sizes 0.075 + prey size), 1.0 and 2.0 from the prey at the origin
    _place(env, [(0.1, 0.0), (0.0, 1.0), (-2.0, 0.0), (0.0, 0.0)])
    sc, w = env.scenario, env.world
    expected = -0.1 * (0.1 + 1.0 + 2.0) + bonus * 1
    for pred in w.agents[:3]:
        assert sc.reward(pred, w) == pytest.approx(expected)
    assert paper_metric(task, np.array([[1.0, 5.0, 5.0], [2.0, 0.0, 0.0]])) == pytest.approx(3.0)  # predator 0


def test_world_observation_layout():
    env = MPEEnv("simple_world")
    _place(env, [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.3, 0.3)])
    w = env.world
    w.forests[0].state.p_pos = np.array([0.0, 0.1])  # predator 0 is inside forest 0 (size 0.3)
    w.forests[1].state.p_pos = np.array([5.0, 5.0])
    o = env.scenario.observation(w.agents[0], w)
    assert o.shape == (24,)
    assert list(o[-2:]) == [1.0, -1.0]
    assert np.allclose(o[14:20], [0.5, 0.0, 0.0, 0.5, 0.3, 0.3])  # other agents' relative positions


def test_action_map_matches_mpe2():
    env = simple_spread_v3.raw_env(continuous_actions=True)
    env.reset(seed=0)
    agent = env.unwrapped.world.agents[0]
    for a in [np.array([0.3, -0.7]), np.array([-1.0, 1.0]), np.array([0.0, 0.2])]:
        env.unwrapped._set_action([to_mpe2_action(a)], agent, env.action_space(agent.name))
        assert np.allclose(agent.action.u, a * 5.0)  # what MPEEnv applies for spread agents


def test_omar_double_accel_and_integration():
    env = MPEEnv("simple_tag")
    _place(env, [(-0.5, 0.0), (0.5, 0.5), (0.5, -0.5), (0.9, 0.9)])
    for lm in env.world.landmarks:
        lm.state.p_pos = np.array([5.0, 5.0])
    env.step({"adversary_0": np.array([0.5, 0.0]), "adversary_1": np.zeros(2), "adversary_2": np.zeros(2)})
    pred = env.world.agents[0]
    # OMAR: v = 0.75 * 0 + (accel * accel * a) * dt = 9 * 0.5 * 0.1 = 0.45; x moves by v * dt after the update.
    assert pred.state.p_vel == pytest.approx([0.45, 0.0])
    assert pred.state.p_pos == pytest.approx([-0.5 + 0.045, 0.0])


def test_normalized_score_constants():
    assert normalized_score("simple_spread", 516.8) == pytest.approx(100.0)
    assert normalized_score("simple_tag", -4.1) == pytest.approx(0.0)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown MPE task"):
        MPEEnv("simple_world_comm")


@pytest.mark.parametrize("task", TASKS)
def test_vectorized_contact_force_equals_mpe2(task):
    from mpe2._mpe_utils.core import World

    env = MPEEnv(task)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for e in env.world.entities:  # squeeze everything together so that many pairs touch
        e.state.p_pos = rng.uniform(-0.3, 0.3, 2)
    n = len(env.world.entities)
    ours = env.world.apply_environment_force([None] * n)
    ref = World.apply_environment_force(env.world, [None] * n)
    assert sum(f is not None for f in ref) > 0
    for a, b in zip(ours, ref):
        assert (a is None and b is None) or np.allclose(a, b, rtol=1e-12, atol=1e-12)
