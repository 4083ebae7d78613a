"""The critic's gradient against ground truth (omsd_utils/critic_gradient.py): the batched simulator is the env, the
grade is 1 for a critic that is the truth and ~0 for one that knows nothing of the transition."""

import json
import os

import numpy as np
import pytest
import torch

from envs.mpe import EPISODE_LEN, MPEEnv, SpreadBatch
from omsd_data.bandit_data import bandit_data
from omsd_utils import critic_gradient as cg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spread_episodes(episodes: int, seed: int = 0) -> dict:
    """simple_spread rows of random actions, in the datasets' layout (env state, actions, rewards, episode ends)."""
    rng, env = np.random.default_rng(seed), MPEEnv("simple_spread")
    rows = {k: [] for k in ("obs", "act", "rew")}
    for e in range(episodes):
        obs, _ = env.reset(seed=seed * 100 + e)
        for _ in range(EPISODE_LEN):
            a = rng.uniform(-1, 1, (3, 2)).astype(np.float32)
            rows["obs"].append(np.stack([obs[n] for n in env.possible_agents]))
            rows["act"].append(a)
            obs, rew, *_ = env.step({n: a[i] for i, n in enumerate(env.possible_agents)})
            rows["rew"].append([rew[n] for n in env.possible_agents])
    obs, act, rew = (np.array(rows[k], np.float32) for k in ("obs", "act", "rew"))
    truncations = np.arange(len(obs)) % EPISODE_LEN == EPISODE_LEN - 1
    out = {"terminals": np.zeros(len(obs), bool), "truncations": truncations}
    for i in range(3):
        out.update({f"obs_{i}": obs[:, i], f"actions_{i}": act[:, i], f"rewards_{i}": rew[:, i]})
    return out


def test_spread_batch_is_the_env():
    rng, env = np.random.default_rng(1), MPEEnv("simple_spread")
    env.reset(seed=3)
    w = env.world
    sim = SpreadBatch(*(np.array([[e.state.p_pos for e in w.agents]]), np.array([[e.state.p_vel for e in w.agents]])),
                      np.array([[lm.state.p_pos for lm in w.landmarks]]))  # fmt: skip
    rebuilt = SpreadBatch.from_state(env.state()[None])
    assert torch.allclose(rebuilt.obs(), sim.obs(), atol=1e-6)  # the state rebuilt from float32 observations
    for _ in range(EPISODE_LEN):
        a = rng.uniform(-1.3, 1.3, (3, 2)).astype(np.float32)  # also outside the box: both clip
        obs, rew, *_ = env.step({n: a[i] for i, n in enumerate(env.possible_agents)})
        r_sim = sim.step(torch.as_tensor(a).unsqueeze(1))[0].numpy()
        np.testing.assert_allclose(sim.obs()[:, 0].numpy(), np.stack(list(obs.values())), atol=1e-6)
        np.testing.assert_allclose(r_sim, [rew[n] for n in env.possible_agents], atol=1e-9)


def test_one_step_truth_grades_the_reward_itself_as_right_and_a_shuffled_critic_as_blind():
    arrays = spread_episodes(8)
    zero = (lambda obs: torch.zeros(*obs.shape[:2], 2), 0.1)  # any behaviour: with gamma 0 only step 0 counts
    truth = cg.spread_truth(arrays, zero, gamma=0.0, order=[0, 1, 2], M=120, K=2, h=0.01)
    # the agents whose action changes the reward (one nearest to a landmark, or colliding); the others' is 0
    keep = np.linalg.norm(truth["grad"], axis=1) > 1e-6
    assert 40 < keep.sum() < 120
    truth = {k: v[keep] if isinstance(v, np.ndarray) and len(v) == len(keep) else v for k, v in truth.items()}

    def reward_critic(s, a):  # Q(s, a) = r(s, a): the exact critic of a one-step truth (differentiable)
        return SpreadBatch.from_state(s.detach()).step(a.reshape(len(a), 3, 2).transpose(0, 1).double())[:, 0]

    right = cg.grade(reward_critic, truth)
    assert right["cosine"] > 0.95 and right["cosine_centred"] > 0.9 and right["far_top1"] > 0.9
    assert right["r_q_truth"] > 0.99
    blind = cg.grade(cg.shuffled(reward_critic, int(keep.sum())), truth)
    assert abs(blind["cosine_centred"]) < 0.25 and blind["far_top1"] < 0.6


def test_agent_order_permutes_the_critic_inputs_not_the_truth():
    arrays = spread_episodes(4)
    zero = (lambda obs: torch.zeros(*obs.shape[:2], 2), 0.1)
    a = cg.spread_truth(arrays, zero, 0.0, [0, 1, 2], M=30, K=2)
    b = cg.spread_truth(arrays, zero, 0.0, [2, 0, 1], M=30, K=2)
    np.testing.assert_array_equal(a["grad"], b["grad"])
    np.testing.assert_array_equal(b["state"][:, :18], a["state"][:, 36:])  # position 0 holds env agent 2
    np.testing.assert_array_equal(b["joint"][np.arange(30), b["agent"]], a["joint"][np.arange(30), a["agent"]])


def test_bandit_truth_is_exact():
    arrays = bandit_data()[0]
    truth = cg.bandit_truth(arrays, [0, 1], M=256)
    exact = cg.grade(lambda s, a: a[:, 0] * a[:, 1], truth)
    assert exact["cosine"] == pytest.approx(1.0) and exact["far_top1"] == 1.0 and exact["far_gain_share"] == 1.0
    flipped = cg.grade(lambda s, a: -a[:, 0] * a[:, 1], truth)  # a critic pointing downhill
    assert flipped["cosine"] == pytest.approx(-1.0)
    blind = cg.grade(cg.shuffled(lambda s, a: a[:, 0] * a[:, 1], 256), truth)
    assert abs(blind["cosine"]) < 0.3
    assert cg.critic_truth("bandit", arrays, {}, 0.99, [0, 1])["info"]["M"] == 256


def test_only_data_of_one_committed_policy_get_a_spread_truth():
    from omsd_data.mpe_data import snapshot

    snapshots = {"seed0/medium": snapshot("simple_spread", "seed0/medium")}
    behaviour = {"policies": [["seed0/medium", 4000]], "snapshots": snapshots}
    meta = {"task": "simple_spread", "collect_noise": 0.1, "behaviour": behaviour}
    actor, noise = cg.spread_behaviour(meta)
    assert noise == 0.1 and actor(torch.zeros(3, 5, 18)).shape == (3, 5, 2)
    other_run = {"seed0/medium": {**snapshots["seed0/medium"], "training_step": -1}}  # another training run's snapshot
    assert cg.spread_behaviour({**meta, "behaviour": {**behaviour, "snapshots": other_run}}) is None
    for policies in ([["seed0/replay_0", 2], ["seed0/replay_1", 2]], [["scripted/unimodal", 4000]]):
        assert cg.spread_behaviour({**meta, "behaviour": {**behaviour, "policies": policies}}) is None
    arrays = spread_episodes(2)
    assert cg.critic_truth("simple_spread", arrays, meta, 0.95, [0, 1, 2], K=2)["info"]["M"] == 8
    arrays["truncations"][30] = True  # an episode that is not the env's 25 steps: no truth
    assert cg.critic_truth("simple_spread", arrays, meta, 0.95, [0, 1, 2], K=2) is None
    assert cg.spread_behaviour({**meta, "task": "simple_tag"}) is None


def test_the_critic_study_grades_a_variant(tmp_path):
    """benchmark/critic_study.py trains a critic variant and appends its grade against both truths."""
    from tests.helpers import run_script

    out = tmp_path / "rows.jsonl"
    flags = ["--name", "tiny", "--dataset-transitions", "2500", "--critic-steps", "20", "--critic-hidden", "16",
             "--critic-batch-size", "32", "--gamma", "0.99", "--no-bootstrap-truncation", "--standardize"]  # fmt: skip
    flags += ["--out", str(out)]
    run_script(os.path.join(REPO, "benchmark", "critic_study.py"), tmp_path, *flags)
    row = json.loads(out.read_text())
    assert row["changed"] == {"gamma": 0.99, "bootstrap_truncation": False, "critic_steps": 20, "critic_hidden": 16,
                              "critic_batch_size": 32, "standardize": True}  # fmt: skip
    assert -1 <= row["gamma0.99"]["cosine"] <= 1 and 0 <= row["gamma0.99"]["far_top1"] <= 1 and "gamma0.95" not in row


def test_the_critic_study_grades_a_mamujoco_critic(tmp_path):
    """--env-id: the MaMuJoCo script's critic at its gamma 0.99, graded against the truth of --truth-steps steps."""
    from tests.helpers import run_script

    out = tmp_path / "rows.jsonl"
    flags = ["--env-id", "Hopper-3x1", "--dataset", "medium", "--name", "tiny", "--dataset-transitions", "3000",
             "--critic-steps", "20", "--critic-hidden", "16", "--truth-steps", "2", "--out", str(out)]  # fmt: skip
    run_script(os.path.join(REPO, "benchmark", "critic_study.py"), tmp_path, *flags)
    row = json.loads(out.read_text())
    assert row["env_id"] == "Hopper-3x1" and row["truth_steps"] == 2 and set(row) >= {"gamma0.99", "pearson_r"}
    assert row["changed"] == {"critic_steps": 20, "critic_hidden": 16} and "gamma0.95" not in row
    assert -1 <= row["gamma0.99"]["cosine"] <= 1 and row["gamma0.99"]["truth_seconds"] > 0


def _critic_probes():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("critic_probes", os.path.join(REPO, "benchmark", "critic_probes.py"))
    module = sys.modules["critic_probes"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_simulator_reward_gradient_is_the_one_step_truth():
    """critic_probes' reward part: with gamma 0 the truth is dr/da_i, which the simulator's autograd gives exactly."""
    probes = _critic_probes()
    zero = (lambda obs: torch.zeros(*obs.shape[:2], 2), 0.1)
    truth = cg.spread_truth(spread_episodes(8), zero, gamma=0.0, order=[0, 1, 2], M=120, K=2, h=0.01)
    g = probes.simulator_grads(truth)
    keep = np.linalg.norm(truth["grad"], axis=1) > 1e-6
    assert cg._cos(g[keep], truth["grad"][keep]).mean() > 0.99
    assert np.abs(g[~keep]).max() < 1e-6


def test_one_step_improvement_on_the_truth_beats_the_behaviour_policy():
    """critic_probes' greedy policy (each agent's best far action by Monte-Carlo Q^mu) scores far above the policy it
    improves: what a critic that knew Q^mu could give stage 2."""
    from omsd_data.mpe_data import snapshot

    behaviour = {
        "policies": [["seed0/random", 4000]],
        "snapshots": {"seed0/random": snapshot("simple_spread", "seed0/random")},
    }
    meta = {"task": "simple_spread", "collect_noise": 0.1, "behaviour": behaviour}
    probes = _critic_probes()
    base, _ = probes.greedy_return(meta, 0.95, episodes=4, greedy=False)
    better, _ = probes.greedy_return(meta, 0.95, episodes=4, K=4)
    assert better > base + 150, (base, better)


@pytest.mark.parametrize("env_id", ["HalfCheetah-2x3", "Hopper-3x1"])
def test_mamujoco_state_is_restored_and_the_one_step_truth_is_the_data_reward(env_id):
    from envs.mamujoco import ENV_VERSION, make_env, reconstructable, set_state
    from omsd_data.mamujoco_data import load_behaviour, plan_snapshots, rollout
    from omsd_data.policies import actor_from_state_dict

    envs = [make_env(env_id) for _ in range(2)]
    names, actor = envs[0].possible_agents, actor_from_state_dict(load_behaviour(env_id, 0)[0]["medium"])
    arrays = rollout(envs, actor, [1, 2], 0.1, np.random.default_rng(0), max_len=60)
    ok = reconstructable(env_id, arrays["state"])
    env = make_env(env_id)
    for k in np.flatnonzero(ok)[::7]:  # one step from a stored state with the data's actions: the data's next step
        env.reset(seed=0)
        set_state(env, arrays["state"][k])
        _, r, *_ = env.step({a: arrays[f"actions_{i}"][k] for i, a in enumerate(names)})
        assert np.abs(env.unwrapped.state() - arrays["next_state"][k]).max() < 1e-4
        assert r[names[0]] == pytest.approx(arrays["rewards_0"][k], abs=1e-4)
    # the data's record of one committed behaviour policy, as mamujoco_data.generate writes it
    plan = [("seed0/medium", None, len(arrays["rewards_0"]))]
    record = {"policies": [["seed0/medium", plan[0][2]]], "snapshots": plan_snapshots(env_id, plan)}
    meta = dict(env_family="mamujoco", env_version=ENV_VERSION, task=env_id, quality="medium", collect_noise=0.1,
                behaviour=record)  # fmt: skip
    for other in ({"quality": "mixture"}, {"env_version": "old"}, {"task": "Ant-2x4"}):  # no known truth
        assert cg.mamujoco_rows(env_id, arrays, {**meta, **other}) is None
    order = list(range(len(names)))[::-1]
    behaviour = cg.mamujoco_behaviour(env_id, meta)
    truth = cg.mamujoco_truth(env_id, cg.mamujoco_rows(env_id, arrays, meta, M=12), behaviour, 0.99, order, K=2, H=1)
    assert ok[truth["rows"]].all() and truth["info"]["split_half_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(truth["q_data"], arrays["rewards_0"][truth["rows"]], atol=1e-4)  # H 1: Q is the reward
    first = arrays[f"obs_{order[0]}"][truth["rows"]]  # the critic's state: the agents' observations in `order`
    assert np.allclose(truth["state"][:, : first.shape[1]], first)
