"""Online MATD3 on the MPE tasks and the Multi-agent MuJoCo configurations: makes the behaviour policies of
the project's datasets.

Following OMAR's recipe (D4RL style), a dataset's quality is the training stage of the policy
that collected it. This trainer saves, in one small checkpoint per (task, seed):
  random        the randomly initialised actors (step 0)
  replay_<k>    snapshots from the start of training up to the medium one (for medium-replay)
  medium        the first snapshot whose evaluation return reaches `medium_fraction` of the way
                from random to expert
  expert        the snapshot with the best evaluation return
Checkpoints are plain tensors (loadable with `weights_only=True`) and are committed to the repo
under `omsd_data/behaviour/`, so that making a dataset on a fresh machine is only rollouts.

MATD3 here: decentralised tanh actors (one per predator / agent, stacked into one tensor op),
a centralised twin critic on all controlled agents' observations and actions, target policy smoothing,
delayed actor updates. On MPE every agent has its own reward, so there is one twin critic per agent; on
MaMuJoCo the reward is the team's, so one twin critic serves all agents. MaMuJoCo agents with smaller
observations are zero-padded to the largest; early terminations (Hopper, Ant) do not bootstrap.
Some tasks train with settings of their own (`TASK_DEFAULTS`), recorded in every checkpoint's info.

Usage: python -m omsd_data.train_behaviour --task simple_spread --seed 0
       python -m omsd_data.train_behaviour --task HalfCheetah-2x3 --seed 0
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from envs import mamujoco, mpe
from omsd_data import mamujoco_data, mpe_data
from omsd_data.dataset import DatasetError, episode_returns
from omsd_data.generation import select_snapshots
from omsd_data.policies import StackedActor, StackedLinear
from omsd_utils.files import LockFile, lock_path, remove_stale, unwritable_dir
from omsd_utils.runs import SEED_RANGE, RunError, save_atomic

BEHAVIOUR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviour")
# Per family; MPE's are OMAR's generator settings, MaMuJoCo's a cheaper TD3 (half an update per transition).
# fmt: off
FAMILY_DEFAULTS = {
    "mpe": dict(total_steps=500_000, learning_starts=10_000, update_every=32, batch_size=1024, lr=1e-3, gamma=0.95,
                tau=0.01, actor_hidden=64, critic_hidden=64, eval_every=20_000, eval_episodes=40),
    "mamujoco": dict(total_steps=1_000_000, learning_starts=25_000, update_every=2, batch_size=256, lr=1e-3,
                     gamma=0.99, tau=0.005, actor_hidden=64, critic_hidden=256, eval_every=25_000, eval_episodes=10),
}
# fmt: on
# Per task, on top of the family's: the settings each committed checkpoint was trained with, so that
# `python -m omsd_data.train_behaviour --task T --seed K` remakes it. Why they differ: docs/datasets.md.
# MaMuJoCo's total_steps are the seed-0 runs' budgets, not set by convergence (several were still rising).
TASK_DEFAULTS = {
    # Four times the updates: at one per 32 transitions the spread actors fell below their random
    # initialisation for ~150k transitions (medium-replay < random) and plateaued at ~290. The penalty
    # alone shortened that dip but did not remove it.
    "simple_spread": dict(update_every=8, preact_penalty=1e-3),
    # spread's settings; the same for co-training the prey (--train-prey) and for the predators against it
    "simple_tag": dict(update_every=8, preact_penalty=1e-3, total_steps=600_000),
    "simple_world": dict(update_every=8, preact_penalty=1e-3, total_steps=600_000),
    # With the other agents' dataset actions in the actor update, Hopper plateaued at ~310 (the agents must
    # balance together); one update per transition as in TD3.
    "Hopper-3x1": dict(others_in_actor_update="policy", update_every=1, total_steps=300_000),
    # Ant's legs must also act together; the joint gradient, at HalfCheetah's half update per transition.
    "Ant-2x4": dict(others_in_actor_update="policy", total_steps=400_000),
    "HalfCheetah-2x3": dict(total_steps=200_000),
    "HalfCheetah-6x1": dict(total_steps=250_000),
}

# Co-training the prey (--train-prey) stops early: a prey co-trained for 500k transitions flees so well that
# predators trained against it from scratch reached only 7.9 (tag) and -2.5 (world) in 280k / 200k transitions,
# against OMAR's expert data at 207.9 / 85.2 (docs/datasets.md). 80k is where the co-trained predators were best.
PREY_DEFAULTS = dict(total_steps=80_000)


@dataclass
class Args:
    task: str = "simple_spread"
    """simple_spread | simple_tag | simple_world | HalfCheetah-2x3 | Ant-2x4 | Ant-2x4-nocf | Hopper-3x1 |
    HalfCheetah-6x1 (unset fields below take the family's value in FAMILY_DEFAULTS)"""
    seed: int = 0
    """seed of networks, exploration and envs; different seeds give independently trained experts"""
    total_steps: int | None = None
    """environment transitions to collect"""
    num_envs: int = 8
    """envs stepped together (their actors run as one batch)"""
    learning_starts: int | None = None
    """transitions of uniform random actions before learning"""
    update_every: int | None = None
    """one gradient update per this many transitions"""
    batch_size: int | None = None
    """minibatch size"""
    lr: float | None = None
    """Adam learning rate of actors and critics"""
    gamma: float | None = None
    """discount (OMAR's generator used 0.95 on MPE; 0.99 on MaMuJoCo)"""
    tau: float | None = None
    """Polyak rate of the target networks"""
    expl_noise: float = 0.1
    """std of the Gaussian exploration noise"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise"""
    policy_delay: int = 2
    """critic updates per actor update"""
    others_in_actor_update: str | None = None
    """'dataset': agent i's actor is updated at the other agents' replayed actions (MADDPG/MATD3);
    'policy': at their current policy actions (the joint deterministic policy gradient). Default 'dataset'"""
    preact_penalty: float | None = None
    """weight of MADDPG's penalty on the squared pre-tanh actions in the actor loss (keeps the actors
    from saturating early). Default 0"""
    actor_hidden: int | None = None
    """actor width (OMAR's generator used 64)"""
    critic_hidden: int | None = None
    """critic width"""
    eval_every: int | None = None
    """transitions between evaluations (each one is a snapshot)"""
    eval_episodes: int | None = None
    """deterministic episodes per evaluation"""
    medium_fraction: float = 0.4
    """medium = first snapshot at this fraction of the way from random to expert return"""
    max_replay_snapshots: int = 10
    """at most this many snapshots kept for medium-replay"""
    train_prey: bool = False
    """simple_tag / simple_world: train the prey together with the predators (its own actor and twin critic on
    mpe2's prey reward) and, at the end, write the prey's actor to the prey checkpoint, the frozen learned prey of
    the env (envs/prey/<task>.pt), instead of a behaviour checkpoint"""
    out: str = ""
    """checkpoint path (default omsd_data/behaviour/<mpe|mamujoco>/<task>_seed<seed>.pt, or envs/prey/<task>.pt)"""


class StackedTwinCritic(nn.Module):
    """2h critics Q_{k,i}(s, a_1..a_n), k in {1, 2} twins, i the reward head (one per agent, or one team head)."""

    def __init__(self, heads: int, in_dim: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.l1, self.l2 = StackedLinear(2 * heads, in_dim, hidden), StackedLinear(2 * heads, hidden, hidden)
        self.l3 = StackedLinear(2 * heads, hidden, 1)

    def forward(self, x):  # x (2h, B, in) -> (2, h, B)
        q = self.l3(F.relu(self.l2(F.relu(self.l1(x)))))
        return q.view(2, self.heads, -1)


def actor_loss(actor, critic, ob, ac, others: str, preact_penalty: float, heads: int):
    """MATD3's actor loss on a minibatch (ob (B, n, obs), ac (B, n, act)): for every agent i,
    -Q_i(o, a_1..a_n) with a_i = pi_i(o_i) and the other agents' actions from the data ('dataset') or from
    their current actors ('policy'), summed over agents; plus `preact_penalty` * mean squared pre-tanh action."""
    B, n = ob.shape[:2]
    pre = actor.pre_tanh(ob.transpose(0, 1))  # (n, B, act)
    a_pi = torch.tanh(pre)
    rest = ac if others == "dataset" else a_pi.detach().transpose(0, 1)
    joint = rest.unsqueeze(0).repeat(n, 1, 1, 1)  # (n, B, n, act): agent i's joint action in row i
    joint[torch.arange(n), :, torch.arange(n)] = a_pi
    x_pi = torch.cat([ob.reshape(1, B, -1).expand(n, B, -1), joint.reshape(n, B, -1)], 2)
    if heads == 1:  # the team critic scores every agent's joint action
        x_pi = x_pi.reshape(1, n * B, -1)
    q_pi = critic(torch.cat([x_pi, x_pi], 0))[0].reshape(n, B)  # twin 1 (of each agent's critic)
    return -q_pi.mean(1).sum() + preact_penalty * pre.pow(2).mean(2).mean(1).sum()


def save_checkpoint(args: Args, family: str, snapshots: list, curve: list, seconds: float) -> dict:
    """Pick random / medium / expert and the medium-replay snapshots, write them atomically.

    Called after every evaluation, so a run stopped at any time leaves a usable checkpoint.
    """
    policies, steps, returns = select_snapshots(snapshots, args.medium_fraction, args.max_replay_snapshots)
    env_version = mpe.ENV_VERSION if family == "mpe" else mamujoco.ENV_VERSION
    prey = mpe.learned_prey(args.task) if args.task in mpe.PREY_OBS_DIMS else None
    info = {
        "task": args.task,
        "env_version": env_version,
        **({"prey_sha256": prey.sha256} if prey else {}),  # the learned prey these predators were trained against
        "seed": args.seed,
        "args": asdict(args),
        "curve": curve,
        "seconds": seconds,
        "steps": steps,
        "eval_return": returns,
    }
    save_atomic(
        {"policies": policies, "info_json": json.dumps(info)},
        out_path(args, family),
        then="then train again (the file keeps the snapshots of the last evaluation that was saved)",
    )
    return info


def out_path(args: Args, family: str) -> str:
    if args.train_prey:  # the learned prey is part of the environment
        return args.out or os.path.join(mpe.PREY_DIR, f"{args.task}.pt")
    return args.out or os.path.join(BEHAVIOUR_DIR, family, f"{args.task}_seed{args.seed}.pt")


def save_prey(args: Args, actor, curve: list, step: int, seconds: float):
    """The prey's actor (the last of the stacked ones) as the env's learned prey: plain tensors, its first layer
    cut to the prey's own observation size (the padding inputs are always zero)."""
    sd = {k: v.detach()[-1:].clone() for k, v in actor.state_dict().items()}
    sd["l1.weight"] = sd["l1.weight"][:, : mpe.PREY_OBS_DIMS[args.task]].contiguous()
    info = {
        "kind": "omsd-learned-prey",
        "task": args.task,
        "obs_dim": mpe.PREY_OBS_DIMS[args.task],
        "seed": args.seed,
        "step": step,
        "args": asdict(args),
        "curve": curve,  # (step, predators' return, prey's return) of deterministic evaluation episodes
        "seconds": seconds,
    }
    save_atomic({"policy": sd, "info_json": json.dumps(info)}, out_path(args, "mpe"), then="then train again")


def check_args(args: Args, family: str):
    """Reject settings that would fail later or write where they must not (RunError, before any training)."""
    if args.others_in_actor_update not in ("dataset", "policy"):
        raise RunError(f"--others-in-actor-update must be 'dataset' or 'policy', got {args.others_in_actor_update!r}")
    if args.train_prey and args.task not in mpe.PREY_OBS_DIMS:
        tasks = " and ".join(mpe.PREY_OBS_DIMS)
        raise RunError(f"--train-prey is for {tasks} (the tasks with a prey), not {args.task}")
    if not 0 <= args.seed < SEED_RANGE:
        raise RunError(f"--seed must be an integer in 0..{SEED_RANGE - 1} (numpy's seed range), got {args.seed}")
    for k in (
        "total_steps",
        "num_envs",
        "update_every",
        "batch_size",
        "policy_delay",
        "actor_hidden",
        "critic_hidden",
        "eval_every",
        "eval_episodes",
        "max_replay_snapshots",
    ):
        if getattr(args, k) <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)}")
    if args.learning_starts < 0:
        raise RunError(f"--learning-starts must be >= 0, got {args.learning_starts}")
    ranges = {
        "lr": (lambda v: v > 0, "> 0"),
        "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "medium_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        **{k: (lambda v: v >= 0, ">= 0") for k in ("expl_noise", "policy_noise", "noise_clip", "preact_penalty")},
    }
    for k, (ok, what) in ranges.items():
        v = getattr(args, k)
        if not (math.isfinite(v) and ok(v)):
            raise RunError(f"--{k.replace('_', '-')} must be finite and {what}, got {v}")
    out = out_path(args, family)
    if os.path.isdir(out):
        raise RunError(f"--out {out} is a directory; give the checkpoint's file name")
    why = unwritable_dir(os.path.dirname(os.path.abspath(out)))
    if why:
        raise RunError(f"cannot write the checkpoint {out} ({why}); give a writable --out")
    if os.path.exists(out):  # only a checkpoint of this task and seed is replaced (retraining it)
        try:
            info = json.loads(torch.load(out, map_location="cpu", weights_only=True)["info_json"])
            same = (info.get("task"), info.get("seed"), info.get("kind") == "omsd-learned-prey") == (
                args.task,
                args.seed,
                args.train_prey,
            )
        except Exception:
            info, same = None, False
        if not same:

            def name(task, seed, prey):
                return f"the learned prey of {task} (seed {seed})" if prey else f"the checkpoint of {task} seed {seed}"

            what = name(info.get("task"), info.get("seed"), info.get("kind") == "omsd-learned-prey") if info else None
            raise RunError(
                f"--out {out} exists and is {what or 'not a behaviour checkpoint'}, not "
                f"{name(args.task, args.seed, args.train_prey)}; delete it or choose another --out"
            )


def main(args: Args):
    if args.task not in mpe.TASKS + mamujoco.ENV_IDS:
        raise RunError(f"unknown --task {args.task!r}; choose one of {', '.join(mpe.TASKS + mamujoco.ENV_IDS)}")
    family = "mpe" if args.task in mpe.TASKS else "mamujoco"
    base = dict(others_in_actor_update="dataset", preact_penalty=0.0)
    prey = PREY_DEFAULTS if args.train_prey else {}
    for k, v in {**base, **FAMILY_DEFAULTS[family], **TASK_DEFAULTS.get(args.task, {}), **prey}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args, family)
    out = out_path(args, family)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lock = LockFile(lock_path(out))  # one trainer per checkpoint file
    if not lock.acquire(blocking=False):
        raise RunError(
            f"{out} is being trained by process {lock.holder() or '(unknown)'}; wait for it to finish or "
            f"choose another --out"
        )
    try:
        remove_stale(os.path.dirname(os.path.abspath(out)), re.escape(os.path.basename(out)) + r"\.tmp\d*")
        _train(args, family)
    finally:
        lock.release()


def _train(args: Args, family: str):
    torch.set_num_threads(1)  # two trainers can share the 2 cores
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    if family == "mpe":
        make = lambda: mpe.MPEEnv(args.task, control_prey=args.train_prey)  # noqa: E731
    else:
        make = lambda: mamujoco.make_env(args.task)  # noqa: E731
    envs = [make() for _ in range(args.num_envs)]
    eval_envs = [make() for _ in range(args.eval_episodes)]
    names = envs[0].possible_agents
    n = len(names)
    obs_dims = [envs[0].observation_space(a).shape[0] for a in names]
    obs_dim, act_dim = max(obs_dims), envs[0].action_space(names[0]).shape[0]
    if family == "mpe":
        act_dim = 2  # OMAR's 2-D actions, mapped onto mpe2's 5-D Box inside MPEEnv
    heads = n if family == "mpe" else 1  # per-agent rewards vs one team reward
    in_dim = n * obs_dim + n * act_dim

    actor = StackedActor(n, obs_dim, act_dim, args.actor_hidden)
    critic = StackedTwinCritic(heads, in_dim, args.critic_hidden)
    actor_t, critic_t = copy.deepcopy(actor), copy.deepcopy(critic)
    a_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    c_opt = torch.optim.Adam(critic.parameters(), lr=args.lr)

    N = args.total_steps + args.num_envs
    buf_obs = np.zeros((N, n, obs_dim), np.float32)
    buf_next = np.zeros((N, n, obs_dim), np.float32)
    buf_act = np.zeros((N, n, act_dim), np.float32)
    buf_rew = np.zeros((N, n), np.float32)
    buf_done = np.zeros(N, np.float32)  # terminal (no bootstrap); time-limit ends do bootstrap
    size = 0

    def padded(ob):  # (n, obs_dim): smaller observations zero-padded
        return [np.pad(ob[a], (0, obs_dim - len(ob[a]))) for a in names]

    def evaluate_with_prey():  # (predators' return in the paper's metric, the prey's return)
        seeds = 1_000_000 + np.arange(args.eval_episodes)
        obs, rew = [env.reset(seed=int(s))[0] for env, s in zip(eval_envs, seeds)], []
        for _ in range(eval_envs[0].max_cycles):
            o = np.stack([padded(ob) for ob in obs], axis=1).astype(np.float32)
            with torch.no_grad():
                act = actor(torch.as_tensor(o)).numpy()
            steps = [env.step({a: act[i, e] for i, a in enumerate(names)}) for e, env in enumerate(eval_envs)]
            obs = [st[0] for st in steps]
            rew.append([[st[1][a] for a in names] for st in steps])
        rew = np.array(rew)  # (T, E, n)
        return float(rew[:, :, 0].sum(0).mean()), float(rew[:, :, -1].sum(0).mean())

    def evaluate():
        seeds = 1_000_000 + np.arange(args.eval_episodes)  # the same episodes at every evaluation
        if family == "mpe":
            data = mpe_data.rollout(eval_envs, actor, seeds, noise=0.0, rng=None)
            return float(episode_returns(data, lambda r: mpe.paper_metric(args.task, r)).mean())
        data = mamujoco_data.rollout(eval_envs, actor, seeds, noise=0.0, rng=None)
        return float(episode_returns(data, mamujoco_data.team_return).mean())

    snapshots, curve = [], []

    def snapshot(step):
        if args.train_prey:
            ret, prey_ret = evaluate_with_prey()
            curve.append((step, ret, prey_ret))
            if step >= args.total_steps:  # only the finished prey replaces the env's (a killed run leaves it)
                save_prey(args, actor, curve, step, time.time() - t0)
            print(
                f"[{args.task} prey+predators seed {args.seed}] step {step:>8d}  predators {ret:8.2f}  prey "
                f"{prey_ret:8.2f}  ({(time.time() - t0):.0f}s, {step / max(time.time() - t0, 1e-9):.0f} "
                "transitions/s)",
                flush=True,
            )
            return
        ret = evaluate()
        snapshots.append((step, {k: v.detach().clone() for k, v in actor.state_dict().items()}, ret))
        curve.append((step, ret))
        info = save_checkpoint(args, family, snapshots, curve, time.time() - t0)
        print(
            f"[{args.task} seed {args.seed}] step {step:>8d}  eval return {ret:8.2f}  "
            f"({(time.time() - t0):.0f}s, {step / max(time.time() - t0, 1e-9):.0f} transitions/s)  "
            f"so far: medium {info['eval_return']['medium']:.1f} @ {info['steps']['medium']}, "
            f"expert {info['eval_return']['expert']:.1f} @ {info['steps']['expert']}",
            flush=True,
        )

    t0 = time.time()
    snapshot(0)
    ep_seed = args.seed * 10_000_000
    obs = [env.reset(seed=ep_seed + e)[0] for e, env in enumerate(envs)]
    ep_seed += args.num_envs
    step, updates = 0, 0
    while step < args.total_steps:
        o = np.stack([padded(ob) for ob in obs], axis=1).astype(np.float32)  # (n, E, obs)
        if step < args.learning_starts:
            act = rng.uniform(-1, 1, (n, args.num_envs, act_dim))
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(o)).numpy()
            act = np.clip(act + args.expl_noise * rng.standard_normal(act.shape), -1, 1)
        for e, env in enumerate(envs):
            nxt, r, term, trunc, _ = env.step({a: act[i, e] for i, a in enumerate(names)})
            buf_obs[size], buf_act[size] = o[:, e], act[:, e]
            buf_rew[size] = [r[a] for a in names]
            buf_next[size] = padded(nxt)
            buf_done[size] = float(term[names[0]])
            size += 1
            ended = term[names[0]] or trunc[names[0]]
            obs[e] = env.reset(seed=ep_seed)[0] if ended else nxt
            ep_seed += int(ended)
        prev, step = step, step + args.num_envs

        n_updates = (step // args.update_every - prev // args.update_every) if step >= args.learning_starts else 0
        for _ in range(n_updates):
            idx = rng.integers(0, size, args.batch_size)
            ob, ac = torch.as_tensor(buf_obs[idx]), torch.as_tensor(buf_act[idx])
            rw, nx = torch.as_tensor(buf_rew[idx]).T[:heads], torch.as_tensor(buf_next[idx])
            done = torch.as_tensor(buf_done[idx])
            B = len(idx)
            with torch.no_grad():
                na = actor_t(nx.transpose(0, 1))  # (n, B, act)
                na = (na + (torch.randn_like(na) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)).clamp(
                    -1, 1
                )
                x_next = torch.cat([nx.reshape(B, -1), na.transpose(0, 1).reshape(B, -1)], 1)
                q_next = critic_t(x_next.expand(2 * heads, B, in_dim)).min(0).values  # (heads, B)
                y = rw + args.gamma * (1 - done) * q_next
            x = torch.cat([ob.reshape(B, -1), ac.reshape(B, -1)], 1)
            c_loss = F.mse_loss(critic(x.expand(2 * heads, B, in_dim)), y.expand(2, heads, B))
            c_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            c_opt.step()
            updates += 1
            if updates % args.policy_delay == 0:
                a_loss = actor_loss(actor, critic, ob, ac, args.others_in_actor_update, args.preact_penalty, heads)
                a_opt.zero_grad(set_to_none=True)
                a_loss.backward()
                a_opt.step()
                with torch.no_grad():
                    for p, pt in zip(
                        list(actor.parameters()) + list(critic.parameters()),
                        list(actor_t.parameters()) + list(critic_t.parameters()),
                    ):
                        pt.lerp_(p, args.tau)
        if step // args.eval_every > prev // args.eval_every:
            snapshot(step)
    if args.train_prey and curve[-1][0] != step:  # the prey is written at the last step, evaluated or not
        snapshot(step)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (RunError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
