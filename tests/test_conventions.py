"""The controlled multimodal spread data (omsd_data/mpe_data.py) and the diagnostics and sampler of oma_sd_mpe.py that
use them: the conventions are what their names say, and every measure gives known values on constructed input."""

import types

import numpy as np
import pytest
import torch

import oma_sd_mpe as om
from envs.mpe import MPEEnv, paper_metric
from omsd_data import mpe_data
from omsd_data.dataset import episode_ends
from omsd_utils import diagnostics
from tests.helpers import ConstQ


def spread_obs(landmarks, positions, vel=None):
    """(n, 1, 18) observations in mpe2's layout for agents at `positions` and landmarks at `landmarks`."""
    vel = np.zeros((3, 2)) if vel is None else vel
    obs = []
    for i in range(3):
        rel = (np.asarray(landmarks) - positions[i]).ravel()
        others = np.concatenate([positions[j] - positions[i] for j in range(3) if j != i])
        obs.append(np.concatenate([vel[i], positions[i], rel, others, np.zeros(4)]))
    return np.asarray(obs, np.float32)[:, None]


def test_controller_steers_each_agent_to_its_landmark():
    landmarks = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    obs = spread_obs(landmarks, np.zeros((3, 2)))
    for c in mpe_data.CONVENTIONS:
        act = mpe_data.convention_actions(obs, np.array([c]))
        for i in range(3):
            direction = landmarks[c[i]] / np.linalg.norm(landmarks[c[i]])
            assert act[i, 0] == pytest.approx(direction, abs=1e-6)  # kp * 1 saturates at the unit direction
    # close to the target the action is proportional, and damped by the velocity
    near = spread_obs(landmarks * 0.1, np.zeros((3, 2)), vel=np.ones((3, 2)) * 0.1)
    act = mpe_data.convention_actions(near, np.array([[0, 1, 2]]))
    assert act[0, 0] == pytest.approx([3.0 * 0.1 - 0.1, -0.1], abs=1e-6)


@pytest.mark.parametrize(
    "quality,K,joint",
    [("unimodal", 1, True), ("multimodal-2", 2, True), ("multimodal-3", 3, True), ("miscoordinated", 3, False),
     ("unimodal-soft", 1, True), ("multimodal-3-soft", 3, True), ("miscoordinated-soft", 3, False)],
)  # fmt: skip
def test_episode_conventions(quality, K, joint):
    conv = mpe_data.episode_conventions(quality, np.arange(600))
    assert conv.shape == (600, 3) and set(np.unique(conv)) == set(range(K))
    agree = (conv == conv[:, :1]).all(1)
    if joint:
        assert agree.all()
        shares = np.bincount(conv[:, 0], minlength=K) / 600
        assert np.all(np.abs(shares - 1 / K) < 0.07)  # drawn uniformly
    else:
        assert agree.mean() == pytest.approx(1 / 9, abs=0.05)  # each agent draws on its own
    assert np.array_equal(conv, mpe_data.episode_conventions(quality, np.arange(600)))


def test_controlled_data_follow_their_conventions():
    arrays, meta = mpe_data.generate("simple_spread", "multimodal-2", 500, workers=1, verbose=False)
    assert meta["quality"] == "multimodal-2" and meta["behaviour"]["conventions"] == [[0, 1, 2], [1, 2, 0]]
    obs = np.stack([arrays[f"obs_{i}"] for i in range(3)])
    act = np.stack([arrays[f"actions_{i}"] for i in range(3)])
    table = mpe_data.convention_table(obs, [0, 1, 2])
    first = np.arange(0, 500, 25)  # first steps, where the conventions' actions are far apart
    s = mpe_data.convention_stats(act[:, first], table[:, :, first])
    assert s["joint_in_one"] >= 0.9  # all agents of an episode follow one convention (up to the action noise)
    assert s["per_convention"][2] == 0.0 and min(s["per_convention"][:2]) > 0.2  # only conventions 0 and 1
    with pytest.raises(mpe_data.DatasetError, match="unknown dataset quality 'multimodal-2' for simple_tag"):
        mpe_data.generate("simple_tag", "multimodal-2", 250, workers=1, verbose=False)


def test_soft_data_follow_three_conventions_inside_the_box():
    """The -soft data: the soft controller's gains in the metadata and in the convention measures; the three
    conventions' actions lie on a corner of the action box far less often than the default controller's."""
    arrays, meta = mpe_data.generate("simple_spread", "multimodal-3-soft", 1000, workers=1, verbose=False)
    assert meta["behaviour"]["controller"] == mpe_data.SOFT_CONTROLLER and len(meta["behaviour"]["conventions"]) == 3
    obs = np.stack([arrays[f"obs_{i}"] for i in range(3)])
    act = np.stack([arrays[f"actions_{i}"] for i in range(3)])
    measures = mpe_data.conventions_of(meta)
    table = measures.convention_table(obs, [0, 1, 2])
    first = np.arange(0, 1000, 25)
    s = measures.convention_stats(act[:, first], table[:, :, first])
    assert s["joint_in_one"] >= 0.9 and min(s["per_convention"]) > 0.15  # one convention per episode, all three
    hard = mpe_data.conventions_of({}).convention_table(obs, [0, 1, 2])  # no controller recorded: the default one
    assert np.allclose(hard, mpe_data.convention_table(obs, [0, 1, 2]))
    corner = lambda t: (np.abs(t) > 0.999).all(-1).mean()  # noqa: E731
    assert corner(table) < 0.08 and corner(hard) > 0.25  # measured: 3 % against 32 % (docs/datasets.md)


def test_conventions_have_the_same_quality():
    """Noise-free episodes on the same seeds: each convention's mean return is within 5 % of the others'."""
    means = []
    for c in range(3):
        rets = []
        for seed in range(60):
            env = MPEEnv("simple_spread")
            obs, _ = env.reset(seed=seed)
            rew = []
            for _ in range(25):
                o = np.stack([obs[a] for a in env.possible_agents])[:, None]
                act = mpe_data.convention_actions(o, np.array([mpe_data.CONVENTIONS[c]]))
                obs, r, _, _, _ = env.step({a: act[i, 0] for i, a in enumerate(env.possible_agents)})
                rew.append([r[a] for a in env.possible_agents])
            rets.append(paper_metric("simple_spread", np.array(rew)))
        means.append(np.mean(rets))
    assert max(means) > 450 and (max(means) - min(means)) / max(means) < 0.05, means


def test_convention_table_follows_the_agent_order():
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (3, 7, 18)).astype(np.float32)
    order = [2, 0, 1]
    table = mpe_data.convention_table(obs[order], order)  # positions hold agents 2, 0, 1
    assert np.allclose(table, mpe_data.convention_table(obs, [0, 1, 2])[:, order])


def test_convention_stats_on_constructed_actions():
    table = np.zeros((3, 3, 4, 2))
    table[1] += 1.0  # convention 1's actions are (1, 1), convention 2's (-1, -1)
    table[2] -= 1.0
    act = np.zeros((3, 4, 2))
    act[:, 1] = 1.0  # step 1: everybody follows convention 1
    act[0, 2], act[1, 2], act[2, 2] = 1.0, -1.0, 0.0  # step 2: three different conventions
    act[:, 3] = 0.5  # step 3: between conventions 0 and 1, near none (distance 0.71)
    s = mpe_data.convention_stats(act, table)
    assert s["per_convention"] == [0.25, 0.25, 0.0]
    assert s["joint_in_one"] == 0.5
    assert s["near_any"] == [0.75, 0.75, 0.75]


class GaussianScore(torch.nn.Module):
    """The exact eps of a Gaussian behaviour N(mean(cond), s^2): eps = sigma_t (x_t - alpha_t m) / (alpha_t^2 s^2 +
    sigma_t^2); position 0's mean is 0.5, position k's mean is the first prefix action (it copies agent 0)."""

    s = 0.05

    def forward(self, x_t, t, cond, pos=slice(None)):
        alpha_t, sigma_t = om.vp_sde(t)
        first = (torch.arange(3)[pos] == 0)[:, None, None]  # which of the given positions is position 0
        m = torch.where(first, 0.5, cond[..., 3:4])  # cond = [base (3 values), a_1, a_2]
        return sigma_t * (x_t - alpha_t * m) / (alpha_t**2 * self.s**2 + sigma_t**2)


def test_sampler_draws_from_the_chain_rule():
    n, B = 3, 2000
    mask = om.prefix_mask(n, "sequential")
    z = torch.randn(n, B, 1, generator=torch.Generator().manual_seed(0))
    a = om.sample_actions(GaussianScore(), torch.zeros(n, B, 3), mask, z, 40)
    assert a[0].mean().item() == pytest.approx(0.5, abs=0.01)
    assert a[0].std().item() == pytest.approx(GaussianScore.s, rel=0.15)  # DDIM on a log-SNR grid keeps the spread
    # later positions copy agent 0's *sample* (ancestral sampling), up to their own spread
    assert (a[1] - a[0]).abs().mean().item() < 0.06 and (a[2] - a[0]).abs().mean().item() < 0.06
    # the same noise vector for every state gives the same sample: deterministic sampler
    same = om.sample_actions(GaussianScore(), torch.zeros(n, 4, 3), mask, z[:, :1].expand(n, 4, 1), 40)
    assert torch.allclose(same, same[:, :1].expand(n, 4, 1))
    # given prefix actions, the samples follow those instead
    given = torch.full((n, B, 1), -0.7)
    b = om.sample_actions(GaussianScore(), torch.zeros(n, B, 3), mask, z, 40, a_prev=given)
    assert b[1].mean().item() == pytest.approx(-0.7, abs=0.01) and b[0].mean().item() == pytest.approx(0.5, abs=0.01)


class PreferQ(torch.nn.Module):
    """Twin Q = -sum over agents (a_k - 0.5 - 0.05 s)^2 with s = +-1: in half of the states the critic prefers actions
    a little above the behaviour's mean 0.5, in the other half a little below."""

    def forward(self, s, joint):
        q = -((joint - 0.5 - 0.05 * s) ** 2).sum(-1)
        return torch.stack([q, q])


@pytest.mark.parametrize("script", ["oma_sd_mpe", "oma_sd_mamujoco"])
def test_init_from_samples_shares_one_noise_vector_and_fits_the_actors_to_its_samples(script):
    """--actor-init samples: one noise vector for every state (here one sample for all states, since the behaviour
    does not depend on the state), so the start sits in one joint mode; the actors then regress onto it."""
    mod = __import__(script)
    n, N = 3, 400
    s = torch.tensor([1.0, -1.0]).repeat(N // 2)[:, None]
    data = {"act": torch.zeros(N, n, 1), "obs": torch.zeros(N, n, 3), "critic_state": s}
    args = types.SimpleNamespace(
        sample_steps=20, policy_batch_size=32, actor_lr=1e-2, init_steps=2000, init_states=20_000
    )
    actors = mod.Actors(n, 3, 1, 8)
    rec = mod.init_from_samples(
        actors,
        GaussianScore(),
        PreferQ(),
        data,
        om.prefix_mask(n, "sequential"),
        args,
        torch.Generator().manual_seed(0),
    )
    out = actors(data["obs"].transpose(0, 1))  # (n, N, 1): the same action in every state, for every agent
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5)
    assert (out[1:] - out[:1]).abs().max() < 0.2  # agents 1, 2 copy agent 0's sample (the sequential chain rule)
    # one sample for every state: at best 0.5 for all, 0.05 from each state's preferred action for each of 3 agents
    assert rec["mean_q"] < -3 * 0.05**2 * 0.9 and max(rec["regression_loss"]) < 1e-3


def test_support_distance_on_constructed_data():
    pool_s = torch.tensor([[0.0], [1.0], [10.0]])
    pool_a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    d = diagnostics.support_distance(
        torch.tensor([[0.1], [10.0]]), torch.tensor([[1.0, 1.0], [5.0, 5.0]]), pool_s, pool_a, k=2
    )
    # state 0.1: neighbours 0 and 1, nearest action (1, 0) at distance 1; state 10: neighbours 10 and 1, exact
    assert d.tolist() == pytest.approx([1.0, 0.0])


def test_critic_quality_monte_carlo_returns():
    # two episodes of 3 steps, reward 1 each step, gamma 0.5: returns-to-go 1.75, 1.5, 1 in each
    arrays = {"terminals": np.zeros(6, bool), "truncations": np.array([0, 0, 1, 0, 0, 1], bool)}
    data = {"reward": torch.ones(6), "act": torch.zeros(6, 1, 1), "critic_state": torch.zeros(6, 1)}
    out = diagnostics.critic_quality(ConstQ(1.5), data, episode_ends(arrays), 0.5)
    assert out["mc_return_mean"] == pytest.approx((1.75 + 1.5 + 1) / 3)
    assert out["q_mean"] == pytest.approx(1.5) and out["abs_error"] == pytest.approx((0.25 + 0 + 0.5) / 3)


def test_assignment_stats_reads_the_landmark_each_agent_ends_at():
    landmarks = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    episodes = [landmarks[[0, 1, 2]], landmarks[[1, 2, 0]], landmarks[[0, 0, 2]], landmarks[[2, 1, 0]]]
    obs = np.concatenate([spread_obs(landmarks, pos * 0.9) for pos in episodes], 1)  # (3, 4, 18)
    s = mpe_data.assignment_stats(obs, [0, 1, 2], 2)
    assert s["per_convention"] == [0.25, 0.25, 0.0]  # episode 0: convention 0, episode 1: convention 1
    assert s["in_data_convention"] == 0.5
    assert s["distinct"] == 0.75  # episode 2 has two agents at landmark 0; episode 3 is a permutation, no convention
    order = [1, 2, 0]  # positions hold agents 1, 2, 0
    assert mpe_data.assignment_stats(obs[order], order, 2) == s


def test_evaluate_records_the_episodes_it_scores():
    """evaluate() steps every env for the whole episode with or without a record, and the record holds every step's
    observations and actions plus the last observations."""
    torch.manual_seed(0)
    args = om.resolve_args(om.Args(eval_episodes=3))
    actors = om.Actors(3, 18, 2, 16)
    plain = om.evaluate(actors, args, [0, 1, 2], 18)
    ret, obs_e, act_e, last = om.evaluate(actors, args, [0, 1, 2], 18, record=True)
    assert ret == plain
    assert plain > 0  # spread's reward sum_l min(1/d, 10) is positive at every step
    env = MPEEnv("simple_spread")
    rets = []
    for e in range(3):  # the same episodes stepped by hand
        obs, _ = env.reset(seed=args.seed + 100 + e)
        rew = []
        for _ in range(25):
            o = torch.as_tensor(np.stack([obs[a] for a in env.possible_agents])[:, None])
            act = actors(o).detach().numpy()[:, 0]
            obs, r, _, _, _ = env.step({a: act[i] for i, a in enumerate(env.possible_agents)})
            rew.append([r[a] for a in env.possible_agents])
        rets.append(paper_metric("simple_spread", np.array(rew)))
    assert plain == pytest.approx(np.mean(rets), rel=1e-5)
    assert obs_e.shape == (3, 25 * 3, 18) and act_e.shape == (3, 25 * 3, 2) and last.shape == (3, 3, 18)


def test_behaviour_fit_of_an_exact_model():
    """With the exact score of the data (a Gaussian copy of agent 0's action), samples given the dataset's prefix
    land on the dataset actions of agents 1 and 2 up to the model's spread, and the held-out loss is the
    diffusion loss on those rows."""
    n, N = 3, 400
    g = torch.Generator().manual_seed(0)
    a0 = 0.5 + GaussianScore.s * torch.randn(N, 1, generator=g)
    act = torch.stack([a0, a0 + 0.01 * torch.randn(N, 1, generator=g), a0 + 0.01 * torch.randn(N, 1, generator=g)], 1)
    data = {"act": act, "obs": torch.zeros(N, n, 3)}
    held = torch.arange(0, N, 2)
    mask = om.prefix_mask(n, "sequential")
    fns = dict(sample_actions=om.sample_actions, diffusion_loss=om.diffusion_loss, condition=om.condition)
    cond_base = lambda idx: data["obs"][idx].transpose(0, 1)  # noqa: E731
    out = diagnostics.behaviour_fit(fns, GaussianScore(), data, held, cond_base, mask, 20, [0, 1, 2])
    d = out["sample_to_data_distance"]
    assert d[1] < 0.06 and d[2] < 0.06  # the conditionals follow the prefix
    assert d[0] == pytest.approx(GaussianScore.s * (4 / np.pi) ** 0.5, rel=0.3)  # |x - y| of two N(0.5, s^2) draws
    assert len(out["denoising_loss"]) == 3 and "samples_near_a_convention" not in out


class ConventionScore(torch.nn.Module):
    """The exact noise prediction of a point mass at the scripted controller's action of convention 1, read from the
    condition's observation part: every DDIM step's x0_hat is that action."""

    def forward(self, x_t, t, cond, pos=slice(None)):
        target = torch.as_tensor(
            mpe_data.convention_actions(cond[..., :18].numpy(), np.tile(np.array((1, 2, 0))[pos], (cond.shape[1], 1)))
        )
        alpha_t, sigma_t = om.vp_sde(t)
        return (x_t - alpha_t * target) / sigma_t


def test_sampler_rollout_acts_as_the_behaviour_models():
    """With models whose every sample is convention 1's action, the behaviour models as a joint policy score what
    the scripted controller scores in the same evaluation episodes, and every episode ends in convention 1."""
    args = om.resolve_args(om.Args(eval_episodes=3, sample_steps=5))
    g = torch.Generator().manual_seed(0)
    sampler = diagnostics.BehaviourSampler(
        om.sample_actions, ConventionScore(), om.prefix_mask(3, "sequential"), 2, 5, g
    )
    ret, _, _, last = om.evaluate(sampler, args, [0, 1, 2], 18, record=True)
    out = {"return": ret, "final_assignment": mpe_data.assignment_stats(last, [0, 1, 2], 2)}
    env = MPEEnv("simple_spread")
    rets = []
    for e in range(3):
        obs, _ = env.reset(seed=args.seed + 100 + e)
        rew = []
        for _ in range(25):
            o = np.stack([obs[a] for a in env.possible_agents])[:, None]
            act = mpe_data.convention_actions(o, np.array([[1, 2, 0]]))[:, 0]
            obs, r, _, _, _ = env.step({a: act[i] for i, a in enumerate(env.possible_agents)})
            rew.append([r[a] for a in env.possible_agents])
        rets.append(paper_metric("simple_spread", np.array(rew)))
    assert out["return"] == pytest.approx(np.mean(rets), rel=1e-4)
    assert out["final_assignment"]["per_convention"] == [0.0, 1.0, 0.0]
    assert out["final_assignment"]["in_data_convention"] == 1.0
