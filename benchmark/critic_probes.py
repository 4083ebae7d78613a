"""Probes of the critic's gradient on simple_spread data (docs/studies.md, "The critic's gradient: what limits it"):
each trains critics like benchmark/critic_study.py's default (IQL, gamma 0.95, bootstrapped, 10,000 x 256, two
layers of 256, learning rate 3e-4 unless --critic-lr) with one change, or grades the parts of the truth, and
appends one JSON row to --out.

  smooth      the default critic graded as E_d Q(s, clip(a + d)), d ~ N(0, sigma^2), 32 draws (sigma 0.05-0.3)
  ensemble    K default critics of seeds seed..seed+K-1, graded one by one and as their mean
  silu        SiLU instead of ReLU in Q and V
  deep        three hidden layers in Q and V instead of two
  residual    Q(s, a) = V_bar(s) + A(s, a), V_bar the Polyak copy of V; A learns r + gamma V(s') - V_bar(s)
  reward      no critic: r_hat(s, a) regressed onto the reward (the same network and budget), its action gradient
              graded against the true reward's and against the truth
  reward-next the same with r_hat(s, s'), its action gradient taken through the simulator's s' = f(s, a)
  next        Q(s, a) = W(s, f(s, a)): W(s, s') learns r + gamma V(s') on the data's next states, and its action
              gradient is taken through the simulator's s' = f(s, a) (the bound of a critic with a learned model)
  parts       the truth against the true reward's action gradient (the simulator's), and against
              grad_a [r + gamma V(s')] through the simulator with the default critic's V; and the return of the
              policy greedy on the default critic over the far actions (`critic_greedy_return`)
  stage2-reward  stage 2 of `oma_sd_mpe.py --dataset Q --seed 0 --beta B [--policy-steps P]` with the simulator's
              next reward as its critic, Q(s, a) = r(s, a) (agent 0's, exact): what stage 2 makes of a perfect one-step
              gradient (compare `greedy --gamma 0`)
  greedy      no critic: the return of one-step policy improvement on the truth, i.e. of a policy that takes in
              every state each agent's best far action ({-1, 0, 1}^2, the others' from the behaviour policy) by
              Monte-Carlo Q^mu (32 rollouts; --gamma 0: by the next reward), and of the behaviour policy itself;
              16 episodes (env seeds 100-115). What a critic that knew Q^mu could give stage 2.

    python benchmark/critic_probes.py smooth --dataset random
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import oma_sd_mpe as om  # noqa: E402
from envs.mpe import EPISODE_LEN, MPEEnv, SpreadBatch  # noqa: E402
from omsd_data.mpe_data import DEFAULT_TRANSITIONS, ensure_dataset  # noqa: E402
from omsd_utils.critic_gradient import _cos, critic_truth, far_grid, grade, spread_behaviour  # noqa: E402
from omsd_utils.files import append_row  # noqa: E402

GAMMA = 0.95


class SiLUTwinQ(om.TwinQ):
    def forward(self, s, a):
        x = torch.cat([s, a], -1).expand(2, -1, -1)
        return self.l3(F.silu(self.l2(F.silu(self.l1(x))))).squeeze(-1)


class DeepTwinQ(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        sizes = ((in_dim, hidden), (hidden, hidden), (hidden, hidden), (hidden, 1))
        self.layers = nn.ModuleList(om.StackedLinear(2, i, o) for i, o in sizes)

    def forward(self, s, a):
        x = torch.cat([s, a], -1).expand(2, -1, -1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x).squeeze(-1)


def train(data, seed, steps, batch, kind="default", lr=3e-4):
    """(Q or r_hat as q_fn(s, a) -> (B,), V, seconds): the script's stage-1b loop with the probe's change."""
    N, n, act_dim = data["act"].shape
    S, A = data["critic_state"].shape[1], n * act_dim
    joint = data["act"].reshape(N, -1)
    torch.manual_seed(seed * 1000 + 2)
    x_dim = S if kind in ("next", "reward-next") else A  # Q's second input: the action, or the next state
    q_net = {"silu": SiLUTwinQ, "deep": DeepTwinQ}.get(kind, om.TwinQ)(S + x_dim, 256)
    act, depth = (nn.SiLU if kind == "silu" else nn.ReLU), (3 if kind == "deep" else 2)
    v_layers = [nn.Linear(S, 256), act()]  # made in order: the default's initialisation is om.mlp's
    for _ in range(depth - 1):
        v_layers += [nn.Linear(256, 256), act()]
    v_net = nn.Sequential(*v_layers, nn.Linear(256, 1))
    q_target, v_bar = copy.deepcopy(q_net), copy.deepcopy(v_net)
    q_opt, v_opt = (torch.optim.Adam(m.parameters(), lr=lr) for m in (q_net, v_net))
    g, t0 = torch.Generator().manual_seed(seed * 1000 + 2), time.time()
    for _ in range(steps):
        idx = torch.randint(N, (batch,), generator=g)
        s, a, s2, r = data["critic_state"][idx], joint[idx], data["next_critic_state"][idx], data["reward"][idx]
        if kind == "reward-next":
            a, y = s2, r
        elif kind == "reward":
            y = r
        else:
            a = s2 if kind == "next" else a
            with torch.no_grad():
                base = v_bar(s).squeeze(-1) if kind == "residual" else 0.0
                q_t = base + q_target(s, a).min(0).values
            v_loss = om.expectile_loss(q_t - v_net(s).squeeze(-1), 0.7)
            v_opt.zero_grad(set_to_none=True)
            v_loss.backward()
            v_opt.step()
            with torch.no_grad():
                y = r + GAMMA * (1 - data["done"][idx]) * v_net(s2).squeeze(-1) - base
        loss = 0.5 * ((q_net(s, a) - y) ** 2).mean(1).sum()
        q_opt.zero_grad(set_to_none=True)
        loss.backward()
        q_opt.step()
        with torch.no_grad():
            for m, mt in ((q_net, q_target), (v_net, v_bar)):
                torch._foreach_lerp_(list(mt.parameters()), list(m.parameters()), om.POLYAK)
    q_fn_net = q_net if kind.startswith("reward") else q_target
    for m in (q_fn_net, v_bar, v_net):
        m.eval().requires_grad_(False)
    if kind == "residual":
        return (lambda s, a: v_bar(s).squeeze(-1) + q_fn_net(s, a).mean(0)), v_net, time.time() - t0
    q_fn = lambda s, a: q_fn_net(s, a).mean(0)  # noqa: E731
    return (through_simulator(q_fn) if kind in ("next", "reward-next") else q_fn), v_net, time.time() - t0


def through_simulator(w_fn):
    """q(s, a) = w_fn(s, s') with s' the simulator's next state: differentiable in a."""

    def q(s, a):
        sim = SpreadBatch.from_state(s.detach().cpu().numpy())
        sim.step(a.reshape(len(a), -1, 2).transpose(0, 1))
        return w_fn(s, sim.obs().transpose(0, 1).reshape(len(a), -1))

    return q


def smoothed(q_fn, sigma, draws=32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def q(s, a):
        d = torch.randn(draws, *a.shape, generator=g) * sigma
        return torch.stack([q_fn(s, (a + d[k]).clamp(-1, 1)) for k in range(draws)]).mean(0)

    return q


def simulator_grads(truth, v_net=None):
    """grad_{a_i} of the true reward (v_net None) or of r + GAMMA V(s') through the simulator, (M, act)."""
    M, agent = len(truth["agent"]), torch.as_tensor(truth["agent"])
    joint = torch.as_tensor(truth["joint"], dtype=torch.float64).requires_grad_(True)
    sim = SpreadBatch.from_state(truth["state"])
    q = sim.step(joint.transpose(0, 1))[:, 0]  # the critic's reward is agent 0's
    if v_net is not None:
        q = q + GAMMA * v_net(sim.obs().transpose(0, 1).reshape(M, -1)).squeeze(-1).double()
    return torch.autograd.grad(q.sum(), joint)[0][torch.arange(M), agent].numpy()


def start_states(episodes: int) -> SpreadBatch:
    """The evaluation episodes' first states (env seeds 100, 101, ...), one simulator row each."""
    env, states = MPEEnv("simple_spread"), []
    for e in range(episodes):
        env.reset(seed=100 + e)
        states.append(env.state())
    return SpreadBatch.from_state(np.array(states))


@torch.no_grad()
def greedy_return(meta, gamma, episodes=16, K=32, greedy=True, seed=0):
    """Mean return of the behaviour policy, or (greedy) of the policy greedy on its Monte-Carlo Q^mu."""
    actor, noise = spread_behaviour(meta)
    gen = torch.Generator().manual_seed(seed)
    grid, n, E = torch.as_tensor(far_grid(2), dtype=torch.float64), SpreadBatch.n, episodes
    C, R = n * len(grid), n * len(grid) * K  # candidates (agent i's grid action) and rows per episode

    def mu(sim, z=None):
        a = actor(sim.obs()).double()
        z = torch.randn(a.shape, generator=gen, dtype=torch.float64) if z is None else z
        return (a + noise * z).clamp(-1, 1)

    world, ret = start_states(E), np.zeros(E)
    for t in range(EPISODE_LEN):
        if not greedy:
            ret += world.step(mu(world)).mean(1).numpy()
            continue
        sim = SpreadBatch(*(x.repeat_interleave(R, 0) for x in (world.pos, world.vel, world.lm)))
        act = mu(sim).reshape(n, E, C, K, 2)  # the other agents' first actions from mu
        for i in range(n):
            act[i, :, i * len(grid) : (i + 1) * len(grid)] = grid[None, :, None]
        q = torch.zeros(E * R, dtype=torch.float64)
        for s in range(EPISODE_LEN - t):
            if s > 0:  # the same noise for every candidate of an (episode, rollout)
                z = torch.randn(n, E, 1, K, 2, generator=gen, dtype=torch.float64).expand(n, E, C, K, 2)
                act = mu(sim, z.reshape(n, E * R, 2))
            q += gamma**s * sim.step(act.reshape(n, E * R, 2))[:, 0]
        q = q.reshape(E, n, len(grid), K).mean(-1)
        ret += world.step(torch.stack([grid[q[:, i].argmax(1)] for i in range(n)])).mean(1).numpy()
    return round(float(ret.mean()), 1), round(float(ret.std(ddof=1) / np.sqrt(E)), 1)


@torch.no_grad()
def critic_greedy_return(q_fn, meta, episodes=16):
    """Mean return of the policy that takes each agent's best far action by the critic, the others at the behaviour
    policy's noise-free action: how well the critic ranks actions, without stage 2's local ascent."""
    actor, _ = spread_behaviour(meta)
    grid, n, E = torch.as_tensor(far_grid(2)), SpreadBatch.n, episodes
    world, ret = start_states(E), np.zeros(E)
    for _ in range(EPISODE_LEN):
        obs = world.obs()
        base = actor(obs).transpose(0, 1)  # (E, n, 2)
        cand = base[:, None, None].repeat(1, n, len(grid), 1, 1)  # (E, agent i, grid, n, 2)
        for i in range(n):
            cand[:, i, :, i] = grid
        s = obs.transpose(0, 1).reshape(E, -1).repeat_interleave(n * len(grid), 0)
        q = q_fn(s, cand.reshape(-1, n * 2)).reshape(E, n, len(grid))
        ret += world.step(torch.stack([grid[q[:, i].argmax(1)] for i in range(n)])).mean(1).numpy()
    return round(float(ret.mean()), 1)


class RewardCritic(nn.Module):
    """Q(s, a) = r(s, a) by the simulator, for both heads: differentiable in a."""

    def forward(self, s, a):  # (B, 54), (B, 6) -> (2, B)
        r = SpreadBatch.from_state(s.detach().cpu().numpy()).step(a.reshape(len(a), -1, 2).transpose(0, 1))[:, 0]
        return r.float().expand(2, -1)


def short(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items() if k in ("cosine", "cosine_se", "cosine_centred", "far_top1",
                                                          "far_gain_share", "cosine_states_shuffled")}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    probes = (
        "smooth",
        "ensemble",
        "silu",
        "deep",
        "next",
        "residual",
        "reward",
        "reward-next",
        "parts",
        "greedy",
        "stage2-reward",
    )
    p.add_argument("probe", choices=probes)
    p.add_argument("--dataset", default="random", choices=("random", "medium", "expert"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--critic-steps", type=int, default=10_000)
    p.add_argument("--critic-batch-size", type=int, default=256)
    p.add_argument("--critic-lr", type=float, default=3e-4, help="the probes' critics (the script's MPE default: 1e-3)")
    p.add_argument("--gamma", type=float, default=GAMMA, help="greedy only: the discount of its Q^mu")
    p.add_argument("--beta", type=float, default=30.0, help="stage2-reward only")
    p.add_argument("--policy-steps", type=int, default=5000, help="stage2-reward only")
    p.add_argument("--out", default=os.path.join(REPO, "benchmark", "results", "critic_probes.jsonl"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    arrays, meta, _ = ensure_dataset("simple_spread", a.dataset, DEFAULT_TRANSITIONS)
    if a.probe == "stage2-reward":
        om.stage1b_critic = lambda *args, **kw: RewardCritic().eval()
        flags = ["--dataset", a.dataset, "--seed", str(a.seed), "--beta", str(a.beta), "--threads", "1"]
        flags += ["--policy-steps", str(a.policy_steps), "--exp-name", "critic_probes_stage2_reward"]
        res = om.main(om.cli_args(flags))
        row = {"probe": a.probe, "dataset": a.dataset, "seed": a.seed, "beta": a.beta, "policy_steps": a.policy_steps,
               "final_return": round(res["final_return"], 1), "policy": res["diagnostics"]["policy"],
               "eval_history": [round(e["return"], 1) for e in res["eval_history"]]}  # fmt: skip
        append_row(a.out, row)
        return print(json.dumps(row))
    if a.probe == "greedy":
        row = {"probe": "greedy", "dataset": a.dataset, "gamma": a.gamma, "episodes": 16, "rollouts": 32}
        row["behaviour"], row["behaviour_se"] = greedy_return(meta, a.gamma, greedy=False)
        row["greedy"], row["greedy_se"] = greedy_return(meta, a.gamma)
        append_row(a.out, row)
        return print(json.dumps(row))
    data = om.to_tensors(arrays, [0, 1, 2], True)
    truth = critic_truth("simple_spread", arrays, meta, GAMMA, [0, 1, 2])
    budget = (a.critic_steps, a.critic_batch_size)
    row = {"probe": a.probe, "dataset": a.dataset, "seed": a.seed, "critic_steps": budget[0], "batch": budget[1]}
    row["critic_lr"] = a.critic_lr  # the rows without the key: 3e-4
    if a.probe in ("silu", "deep", "next", "residual", "smooth", "parts"):
        kind = "default" if a.probe in ("smooth", "parts") else a.probe
        q_fn, v_net, row["seconds"] = train(data, a.seed, *budget, kind, a.critic_lr)
        row["grade"] = short(grade(q_fn, truth))
    if a.probe == "smooth":
        row["smoothed"] = {str(sigma): short(grade(smoothed(q_fn, sigma), truth)) for sigma in (0.05, 0.1, 0.2, 0.3)}
    if a.probe == "ensemble":
        fns = [train(data, a.seed + k, *budget, lr=a.critic_lr)[0] for k in range(a.ensemble)]
        row["members"] = [short(grade(f, truth))["cosine"] for f in fns]
        row["grade"] = short(grade(lambda s, act: torch.stack([f(s, act) for f in fns]).mean(0), truth))
    g_r = simulator_grads(truth)
    nz = np.linalg.norm(g_r, axis=1) > 1e-9  # agent i nearest to no landmark and in no collision: dr/da_i = 0
    if a.probe.startswith("reward"):
        r_fn, _, row["seconds"] = train(data, a.seed, *budget, a.probe, a.critic_lr)
        M, s = len(truth["agent"]), torch.as_tensor(truth["state"], dtype=torch.float32)
        joint = torch.as_tensor(truth["joint"], dtype=torch.float64).requires_grad_(True)
        q = r_fn(s, joint.float().reshape(M, -1))  # reward-next: through the simulator
        g_hat = torch.autograd.grad(q.sum(), joint)[0][torch.arange(M), truth["agent"]].numpy()
        row["r_hat_vs_reward_where_nonzero"] = round(float(_cos(g_hat, g_r)[nz].mean()), 4)
        row["r_hat_vs_truth"] = round(float(_cos(g_hat, truth["grad"]).mean()), 4)
    if a.probe == "parts":
        c = _cos(g_r, truth["grad"])
        row["reward_vs_truth"] = round(float(c.mean()), 4)
        row["reward_vs_truth_where_nonzero"], row["nonzero_share"] = round(float(c[nz].mean()), 4), round(nz.mean(), 4)
        row["r_plus_gamma_v_vs_truth"] = round(float(_cos(simulator_grads(truth, v_net), truth["grad"]).mean()), 4)
        row["critic_greedy_return"] = critic_greedy_return(q_fn, meta)
    append_row(a.out, row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
