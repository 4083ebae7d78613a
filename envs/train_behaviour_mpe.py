"""Online MATD3 on the OMAR-style MPE tasks: makes the behaviour policies of our MPE datasets.

Following OMAR's recipe (D4RL style), a dataset's quality is the training stage of the policy
that collected it. This trainer saves, in one small checkpoint per (task, seed):
  random        the randomly initialised actors (step 0)
  replay_<k>    snapshots from the start of training up to the medium one (for medium-replay)
  medium        the first snapshot whose evaluation return reaches `medium_fraction` of the way
                from random to expert
  expert        the snapshot with the best evaluation return
Checkpoints are plain tensors (loadable with `weights_only=True`) and are committed to the repo
under `envs/behaviour/`, so that making a dataset on a fresh machine is only rollouts.

MATD3 here: decentralised tanh actors (one per predator / agent, stacked into one tensor op),
one centralised twin critic per agent on all controlled agents' observations and actions and
that agent's own reward, target policy smoothing, delayed actor updates.

Usage: python -m envs.train_behaviour_mpe --task simple_spread --seed 0
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from envs.dataset import episode_returns
from envs.mpe import ENV_VERSION, MPEEnv, paper_metric
from envs.mpe_data import rollout
from envs.policies import StackedActor, StackedLinear

BEHAVIOUR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviour", "mpe")


@dataclass
class Args:
    task: str = "simple_spread"
    """simple_spread | simple_tag | simple_world"""
    seed: int = 0
    """seed of networks, exploration and envs; different seeds give independently trained experts"""
    total_steps: int = 500_000
    """environment transitions to collect"""
    num_envs: int = 8
    """envs stepped together (their actors run as one batch)"""
    learning_starts: int = 10_000
    """transitions of uniform random actions before learning"""
    update_every: int = 32
    """one gradient update per this many transitions"""
    batch_size: int = 1024
    """minibatch size"""
    lr: float = 1e-3
    """Adam learning rate of actors and critics"""
    gamma: float = 0.95
    """discount (OMAR's generator used 0.95 on MPE)"""
    tau: float = 0.01
    """Polyak rate of the target networks"""
    expl_noise: float = 0.1
    """std of the Gaussian exploration noise"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise"""
    policy_delay: int = 2
    """critic updates per actor update"""
    actor_hidden: int = 64
    """actor width (OMAR's generator used 64)"""
    critic_hidden: int = 64
    """critic width"""
    eval_every: int = 20_000
    """transitions between evaluations (each one is a snapshot)"""
    eval_episodes: int = 40
    """deterministic episodes per evaluation"""
    medium_fraction: float = 0.4
    """medium = first snapshot at this fraction of the way from random to expert return"""
    max_replay_snapshots: int = 10
    """at most this many snapshots kept for medium-replay"""
    out: str = ""
    """checkpoint path (default envs/behaviour/mpe/<task>_seed<seed>.pt)"""


class StackedTwinCritic(nn.Module):
    """2n critics Q_{k,i}(s, a_1..a_n), k in {1, 2} twins, i the agent whose reward it predicts."""

    def __init__(self, n: int, in_dim: int, hidden: int):
        super().__init__()
        self.n = n
        self.l1, self.l2 = StackedLinear(2 * n, in_dim, hidden), StackedLinear(2 * n, hidden, hidden)
        self.l3 = StackedLinear(2 * n, hidden, 1)

    def forward(self, x):  # x (2n, B, in) -> (2, n, B)
        q = self.l3(F.relu(self.l2(F.relu(self.l1(x)))))
        return q.view(2, self.n, -1)


def save_checkpoint(args: Args, snapshots: list, curve: list, seconds: float) -> dict:
    """Pick random / medium / expert and the medium-replay snapshots, write them atomically.

    Called after every evaluation, so a run stopped at any time leaves a usable checkpoint.
    """
    rets = np.array([s[2] for s in snapshots])
    i_exp = int(np.flatnonzero(rets >= rets.max() - 1e-9)[-1])
    r_rand, r_exp = rets[0], rets[i_exp]
    target = r_rand + args.medium_fraction * (r_exp - r_rand)
    i_med = int(np.flatnonzero(rets[: i_exp + 1] >= target)[0])
    replay = np.unique(np.linspace(0, i_med, min(args.max_replay_snapshots, i_med + 1)).round().astype(int))
    policies = {"random": snapshots[0][1], "medium": snapshots[i_med][1], "expert": snapshots[i_exp][1]}
    for k, j in enumerate(replay):
        policies[f"replay_{k}"] = snapshots[j][1]
    info = {
        "task": args.task, "env_version": ENV_VERSION, "seed": args.seed, "args": asdict(args),
        "curve": curve, "seconds": seconds,
        "steps": {"random": 0, "medium": snapshots[i_med][0], "expert": snapshots[i_exp][0],
                  "replay": [snapshots[j][0] for j in replay]},
        "eval_return": {"random": float(r_rand), "medium": float(rets[i_med]), "expert": float(r_exp)},
    }
    out = args.out or os.path.join(BEHAVIOUR_DIR, f"{args.task}_seed{args.seed}.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.save({"policies": policies, "info_json": json.dumps(info)}, out + ".tmp")
    os.replace(out + ".tmp", out)
    return info


def main(args: Args):
    torch.set_num_threads(1)  # two trainers can share the 2 cores
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    envs = [MPEEnv(args.task) for _ in range(args.num_envs)]
    eval_envs = [MPEEnv(args.task) for _ in range(args.eval_episodes)]
    names = envs[0].possible_agents
    n, obs_dim = len(names), envs[0].observation_space(names[0]).shape[0]
    in_dim = n * obs_dim + n * 2

    actor = StackedActor(n, obs_dim, 2, args.actor_hidden)
    critic = StackedTwinCritic(n, in_dim, args.critic_hidden)
    actor_t, critic_t = copy.deepcopy(actor), copy.deepcopy(critic)
    a_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    c_opt = torch.optim.Adam(critic.parameters(), lr=args.lr)

    N = args.total_steps + args.num_envs
    buf_obs = np.zeros((N, n, obs_dim), np.float32)
    buf_next = np.zeros((N, n, obs_dim), np.float32)
    buf_act = np.zeros((N, n, 2), np.float32)
    buf_rew = np.zeros((N, n), np.float32)
    size = 0

    def evaluate():
        seeds = 1_000_000 + np.arange(args.eval_episodes)  # the same episodes at every evaluation
        data = rollout(eval_envs, actor, seeds, noise=0.0, rng=None)
        return float(episode_returns(data, lambda r: paper_metric(args.task, r)).mean())

    snapshots, curve = [], []

    def snapshot(step):
        ret = evaluate()
        snapshots.append((step, {k: v.detach().clone() for k, v in actor.state_dict().items()}, ret))
        curve.append((step, ret))
        info = save_checkpoint(args, snapshots, curve, time.time() - t0)
        print(f"[{args.task} seed {args.seed}] step {step:>8d}  eval return {ret:8.2f}  "
              f"({(time.time() - t0):.0f}s, {step / max(time.time() - t0, 1e-9):.0f} transitions/s)  "
              f"so far: medium {info['eval_return']['medium']:.1f} @ {info['steps']['medium']}, "
              f"expert {info['eval_return']['expert']:.1f} @ {info['steps']['expert']}", flush=True)

    t0 = time.time()
    snapshot(0)
    ep_seed = args.seed * 10_000_000
    obs = [env.reset(seed=ep_seed + e)[0] for e, env in enumerate(envs)]
    ep_seed += args.num_envs
    step, updates = 0, 0
    while step < args.total_steps:
        o = np.stack([[ob[a] for a in names] for ob in obs], axis=1)  # (n, E, obs)
        if step < args.learning_starts:
            act = rng.uniform(-1, 1, (n, args.num_envs, 2))
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(o)).numpy()
            act = np.clip(act + args.expl_noise * rng.standard_normal(act.shape), -1, 1)
        for e, env in enumerate(envs):
            nxt, r, _, trunc, _ = env.step({a: act[i, e] for i, a in enumerate(names)})
            buf_obs[size], buf_act[size] = o[:, e], act[:, e]
            buf_rew[size] = [r[a] for a in names]
            buf_next[size] = [nxt[a] for a in names]
            size += 1
            # MPE episodes end only by the time limit, so every transition bootstraps.
            obs[e] = env.reset(seed=ep_seed)[0] if trunc[names[0]] else nxt
            ep_seed += int(trunc[names[0]])
        prev, step = step, step + args.num_envs

        n_updates = (step // args.update_every - prev // args.update_every) if step >= args.learning_starts else 0
        for _ in range(n_updates):
            idx = rng.integers(0, size, args.batch_size)
            ob, ac = torch.as_tensor(buf_obs[idx]), torch.as_tensor(buf_act[idx])
            rw, nx = torch.as_tensor(buf_rew[idx]).T, torch.as_tensor(buf_next[idx])
            B = len(idx)
            with torch.no_grad():
                na = actor_t(nx.transpose(0, 1))  # (n, B, 2)
                na = (na + (torch.randn_like(na) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)).clamp(-1, 1)
                x_next = torch.cat([nx.reshape(B, -1), na.transpose(0, 1).reshape(B, -1)], 1)
                q_next = critic_t(x_next.expand(2 * n, B, in_dim)).min(0).values  # (n, B)
                y = rw + args.gamma * q_next
            x = torch.cat([ob.reshape(B, -1), ac.reshape(B, -1)], 1)
            c_loss = F.mse_loss(critic(x.expand(2 * n, B, in_dim)), y.expand(2, n, B))
            c_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            c_opt.step()
            updates += 1
            if updates % args.policy_delay == 0:
                a_pi = actor(ob.transpose(0, 1))  # (n, B, 2)
                # agent i's joint action: dataset actions with slot i replaced by pi_i(o_i)
                joint = ac.unsqueeze(0).repeat(n, 1, 1, 1)  # (n, B, n, 2)
                joint[torch.arange(n), :, torch.arange(n)] = a_pi
                x_pi = torch.cat([ob.reshape(1, B, -1).expand(n, B, -1), joint.reshape(n, B, -1)], 2)
                q_pi = critic(torch.cat([x_pi, x_pi], 0))[0]  # twin 1 of each agent's critic
                a_loss = -q_pi.mean(1).sum()
                a_opt.zero_grad(set_to_none=True)
                a_loss.backward()
                a_opt.step()
                with torch.no_grad():
                    for p, pt in zip(list(actor.parameters()) + list(critic.parameters()),
                                     list(actor_t.parameters()) + list(critic_t.parameters())):
                        pt.lerp_(p, args.tau)
        if step // args.eval_every > prev // args.eval_every:
            snapshot(step)



if __name__ == "__main__":
    main(tyro.cli(Args))
