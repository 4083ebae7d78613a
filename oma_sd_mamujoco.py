# OMSD: Offline Multi-agent RL via (Sequential) Score Decomposition (Qiao et al., arXiv 2505.05968), on Multi-agent
# MuJoCo (Gymnasium-Robotics mamujoco_v1). Single file, CleanRL style: it repeats oma_sd_mpe.py's algorithm on purpose.
#   Stage 1a  per-agent conditional diffusion behaviour models eps_i(a_i^t, t | o_i, a_prev)   (VP-SDE)
#   Stage 1b  centralised IQL critic Q(o_1..o_n, a_1..a_n), frozen afterwards
#   Stage 2   deterministic decentralised actors pi_i(o_i), each regularised towards the behaviour
#             *conditional* of its agent given the actions of the agents before it in the order
# Stage-1 models do not depend on beta: they are cached under runs/cache and reused by later runs.
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from envs import render
from envs.mamujoco import ENV_IDS, EPISODE_LEN, diverged, env_spec, make_env
from omsd_data.dataset import DatasetError, episode_ends
from omsd_data.mamujoco_data import DEFAULT_TRANSITIONS, QUALITIES, check_metadata, ensure_dataset, normalization
from omsd_data.sources import read_dataset
from omsd_utils import runs, saved
from omsd_utils.critic_gradient import critic_truth, mamujoco_rows
from omsd_utils.diagnostics import diagnose
from omsd_utils.runs import RunError, check_finite, finish_run, start_run


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the run (networks, minibatches, diffusion noise); evaluation envs use seed + 100 + episode
    stage1_seed: int | None = None  # seed of stages 1a/1b (default: --seed); same seed, same cached models
    cuda: bool = False  # use CUDA if available (everything here is sized for CPU)
    threads: int = 0  # torch CPU threads (0: every core this process may use)
    env_id: str = "HalfCheetah-2x3"  # HalfCheetah-2x3 | Ant-2x4 | Ant-2x4-nocf | Hopper-3x1 | HalfCheetah-6x1
    dataset: str = "expert"  # random | medium-replay | medium | expert | medium-expert | mixture (docs/datasets.md)
    dataset_path: str = ""  # a dataset instead of --dataset: the project's .npz, or a published one (OMIGA, og-marl..)
    dataset_seed: int = 0  # which seed of a published dataset holding several (OMAR's seed_<k>_data, a vault's row)
    dataset_transitions: int = DEFAULT_TRANSITIONS  # size of the generated dataset

    decomposition: str = "sequential"
    """sequential: mu_i conditions on the actions of the agents before i (OMSD) | independent: the marginal"""
    agent_order: Annotated[tuple[int, ...], tyro.conf.arg(help_behavior_hint="(default: 0..n-1)")] = ()
    """order of the sequential decomposition, a permutation of 0..n-1"""
    beta: float | None = None  # weight of grad_a Q: SMALL = STRONG behaviour constraint (BETA_DEFAULTS, docs/omsd.md)
    weighting: str = "sigma2"  # w(t) of the score term: sigma2 (the authors') | one | alpha_over_sigma
    z_baseline: bool = True  # eps_hat - z in the actor loss (SRPO's variance reduction; same expected gradient)
    diffusion_steps: int = 30_000  # gradient steps, all agents' models together (the authors: 2e6)
    diffusion_batch_size: int = 256  # minibatch size
    diffusion_hidden: int = 128  # width of the residual trunk (the authors: 512)
    diffusion_bf16: bool = True  # stage 1a's matmuls in bfloat16 where the CPU (AVX-512 BF16) or GPU runs them natively
    critic_steps: int = 10_000  # gradient steps (the authors: 1e6)
    critic_batch_size: int = 256  # minibatch size
    critic_hidden: int = 256  # width of the two hidden layers of Q and V
    critic_target_norm: bool = False  # the critic's nets fit (Q - mu) / sd (oma_sd_mpe.py's default; docs/studies.md)
    critic_lr: float = 3e-4  # Adam learning rate of Q and V (the authors'; oma_sd_mpe.py: 1e-3)
    expectile: float = 0.7  # IQL expectile tau
    gamma: float = 0.99  # discount
    bootstrap_truncation: bool = True  # bootstrap through time-limit ends (terminations never)
    policy_steps: int | None = None  # gradient steps per agent (depends on --env-id; the authors: 1e6)
    policy_batch_size: int = 256  # minibatch size (one batch of indices shared by all agents)
    actor_hidden: int = 256  # width of the two hidden layers of each actor
    actor_lr: float = 1e-3  # Adam learning rate, cosine-annealed to 0 (the authors: 3e-4)
    actor_init: str = "random"  # random (the authors') | samples: start in one joint mode of the behaviour models
    init_steps: int = 2000  # --actor-init samples: regression steps
    init_states: int = 20_000  # --actor-init samples: the data's states it regresses on
    sample_steps: int = 20  # steps of the deterministic DDIM sampler of the behaviour models
    eval_every: int | None = None  # policy steps between evaluations (depends on --env-id)
    eval_episodes: int = 32  # episodes of the final evaluation, the return a run reports; a diverged one fails the run
    periodic_eval_episodes: int = 10  # episodes of the evaluations every --eval-every steps (at most --eval-episodes)
    diagnostics: bool = True  # after training: the models' fit, the critic's quality, the policy's support distance
    cache_dir: str = "runs/cache"  # where stage-1 models and the checkpoints of the stage in progress are kept
    resume: bool = True  # continue an interrupted run of the same command from its last checkpoint, same numbers
    checkpoint_every: int = 1000  # steps between checkpoints of the stage in progress
    capture_video: int = 0  # draw this many episodes of the final evaluation to runs/<run>/videos (0: none)
    video_every: int = 5  # --capture-video: one frame every this many env steps (GIFs at 20 frames per second)
    eval_from: str = ""  # a finished run's directory: evaluate its actors.pt, training nothing


# beta per --dataset, chosen on HalfCheetah 2x3's seed 0 (docs/studies.md, "β per quality")
# fmt: off
BETA_DEFAULTS = {"random": 0.1, "medium-replay": 0.001, "medium": 0.001, "expert": 0.0003, "medium-expert": 0.001,
                 "mixture": 0.001}
# beta where a task's own seed 0 (sequential, stage 1 cached) picks another value than BETA_DEFAULTS (docs/studies.md,
# "Hopper 3x1: β", "Ant 2x4: β" and "HalfCheetah 6x1: β")
BETA_ENV_DEFAULTS = {("Hopper-3x1", "expert"): 0.001, ("Hopper-3x1", "medium-expert"): 0.005,
                     ("Hopper-3x1", "mixture"): 0.0003, ("Ant-2x4", "medium-replay"): 0.0003,
                     ("Ant-2x4", "medium"): 0.0003, ("HalfCheetah-6x1", "expert"): 0.0001}
# fmt: on
# stage-2 length per --env-id (Hopper needs more: docs/studies.md, "Hopper 3x1: policy steps")
ENV_DEFAULTS = {"Hopper-3x1": dict(policy_steps=20_000, eval_every=2_500)}
STAGE2_DEFAULT = dict(policy_steps=5_000, eval_every=1_000)
DIFFUSION_BLOCKS, DIFFUSION_LR, POLYAK = 2, 3e-4, 0.005
T_MIN, T_MAX = 0.02, 0.98  # diffusion time range of the actor loss
NO_REF = "the dataset's metadata names no reference returns (no behaviour checkpoint, or unknown constants)"
METRIC = "team return: the team reward (every agent's) summed over the episode (1000 steps, or until Hopper/Ant fall)"


# ====== Networks: every agent's network is evaluated in one batched op over a leading agent axis
class StackedLinear(nn.Module):
    """n independent Linear layers as one batched matmul: (n, B, i) -> (n, B, o)."""

    def __init__(self, n: int, i: int, o: int):
        super().__init__()
        bound = 1.0 / math.sqrt(i)  # nn.Linear's default initialisation, per agent
        self.weight = nn.Parameter(torch.empty(n, i, o).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, o).uniform_(-bound, bound))

    def forward(self, x, pos=slice(None)):  # pos: the agents (positions) x holds, all by default
        return torch.baddbmm(self.bias[pos], x, self.weight[pos])


def vp_sde(t):
    """Continuous-time VP-SDE with linear beta(t), beta_0 = 0.1, beta_1 = 20: x_t = alpha_t a + sigma_t z."""
    alpha_t = torch.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    return alpha_t, torch.sqrt(1.0 - alpha_t**2)


class ScoreNet(nn.Module):
    """eps_k(x_t, t | cond_k) for all n positions k at once: an IDQL-style residual MLP per position. Gaussian
    Fourier time features (fixed W ~ N(0, 30^2)) -> time MLP; [x_t, cond, t_emb] -> hidden; residual blocks
    h + W2 relu(W1 LayerNorm(h)); relu -> linear output (the predicted noise)."""

    def __init__(self, n: int, act_dim: int, cond_dim: int, hidden: int, blocks: int = DIFFUSION_BLOCKS):
        super().__init__()
        self.register_buffer("W", torch.randn(16) * 30.0)
        self.t1, self.t2 = StackedLinear(n, 32, 64), StackedLinear(n, 64, 64)
        self.inp = StackedLinear(n, act_dim + cond_dim + 64, hidden)
        pair = lambda: nn.ModuleList([StackedLinear(n, hidden, 2 * hidden), StackedLinear(n, 2 * hidden, hidden)])
        self.blocks = nn.ModuleList(pair() for _ in range(blocks))
        self.out = StackedLinear(n, hidden, act_dim)

    def forward(self, x_t, t, cond, pos=slice(None)):  # (n, B, act), (n, B, 1), (n, B, cond); pos: the positions given
        f = 2 * math.pi * t * self.W
        t_emb = self.t2(F.relu(self.t1(torch.cat([torch.sin(f), torch.cos(f)], -1), pos)), pos)
        h = self.inp(torch.cat([x_t, cond, t_emb], -1), pos)
        for w1, w2 in self.blocks:
            h = h + w2(F.relu(w1(F.layer_norm(h, h.shape[-1:]), pos)), pos)
        return self.out(F.relu(h), pos)


def prefix_mask(n: int, decomposition: str) -> torch.Tensor:
    """mask[k, j] = 1 if the model at position k conditions on the action at position j (only j < k)."""
    if decomposition == "independent":
        return torch.zeros(n, max(n - 1, 1))
    return torch.tril(torch.ones(n, n), diagonal=-1)[:, : max(n - 1, 1)]


def condition(base, a_prev_source, mask):
    """cond_k = [o_k, a_1, ..., a_{k-1}, 0, ...] (base (n, B, d): own observations; a_prev_source (n, B, act): actions
    in position order): the zero slots make the stacked models equal to per-agent models of varying width."""
    n, B, act = a_prev_source.shape
    src = a_prev_source[: mask.shape[1]]  # (n-1, B, act): position n-1 is never anyone's prefix
    prefix = mask[:, :, None, None] * src[None]  # (n, n-1, B, act)
    return torch.cat([base, prefix.permute(0, 2, 1, 3).reshape(n, B, -1)], -1)


class TwinQ(nn.Module):
    """Q_1, Q_2(s, a_1..a_n): two heads in one stacked op; s = all agents' observations."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        sizes = ((in_dim, hidden), (hidden, hidden), (hidden, 1))
        self.l1, self.l2, self.l3 = (StackedLinear(2, i, o) for i, o in sizes)

    def forward(self, s, a):  # (B, S), (B, n*act) -> (2, B)
        x = torch.cat([s, a], -1).expand(2, -1, -1)
        return self.l3(F.relu(self.l2(F.relu(self.l1(x))))).squeeze(-1)


class Scaled(nn.Module):
    """mu + sd * net(*x): the net fits targets of unit scale from its first step."""

    def __init__(self, net: nn.Module, mu: float, sd: float):
        super().__init__()
        self.net = net
        self.register_buffer("mu_sd", torch.tensor([mu, sd]))

    def forward(self, *x):
        return self.mu_sd[0] + self.mu_sd[1] * self.net(*x)


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class Actors(nn.Module):
    """Deterministic actors a_k = tanh(MLP_k(o_k)); position k's network (agent order[k]) is self.nets[k], its own
    parameters, evaluated for all positions in one batched matmul per layer."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.nets = nn.ModuleList(mlp(obs_dim, hidden, act_dim) for _ in range(n))

    def forward(self, obs):  # (n, B, obs) -> (n, B, act)
        if not self.training and obs.shape[1] != 64:  # evaluation in blocks of 64 rows, so that an episode's actions
            B = obs.shape[1]  # do not depend on how many episodes run together (matmul kernels differ by shape)
            return torch.cat([self(x) for x in F.pad(obs, (0, 0, 0, -B % 64)).split(64, 1)], 1)[:, :B]
        h = obs
        for layer in (0, 2, 4):
            W = torch.stack([net[layer].weight for net in self.nets]).transpose(1, 2)
            b = torch.stack([net[layer].bias for net in self.nets]).unsqueeze(1)
            h = torch.baddbmm(b, h, W)
            h = torch.relu(h) if layer < 4 else torch.tanh(h)
        return h


# ====== Losses
def diffusion_loss(score_net, a0, cond, gen):
    """Noise-prediction loss of every position's model: E ||eps_k(alpha_t a + sigma_t z, t | cond_k) - z||^2,
    t ~ U(1e-3, 1); summed over action dims, averaged over the batch. Returns (n,)."""
    t = torch.rand((a0.shape[0], a0.shape[1], 1), generator=gen, device=a0.device) * (1 - 1e-3) + 1e-3
    z = torch.randn(a0.shape, generator=gen, device=a0.device)
    alpha_t, sigma_t = vp_sde(t)
    eps_hat = score_net(alpha_t * a0 + sigma_t * z, t, cond)
    return ((eps_hat - z) ** 2).sum(-1).mean(-1)


def expectile_loss(u, tau):
    """IQL's asymmetric L2: |tau - 1(u < 0)| u^2, u = Q - V."""
    return (torch.abs(tau - (u < 0).float()) * u**2).mean()


def q_scale(reward, done, gamma: float) -> tuple[float, float]:
    """Q's scale: the reward's mean and std over 1 - gamma (gamma times the share of rows that continue, so that
    one-step data get the reward's own)."""
    r, horizon = reward.double(), 1 / (1 - gamma * (1 - done.mean().item()))
    return r.mean().item() * horizon, r.std().item() * horizon


def q_grad(q_target, s, joint):
    """grad_a of mean(Q1_target, Q2_target) at the joint action (n, B, act): every agent's slot in one backward."""
    joint = joint.detach().requires_grad_(True)
    q = q_target(s, joint.transpose(0, 1).reshape(s.shape[0], -1)).mean(0)
    return torch.autograd.grad(q.sum(), joint)[0]


def noised_eps_hat(score_net, a, cond, weighting: str, z_baseline: bool, gen):
    """eps_hat(a_t, t | cond) at a_t = alpha_t a + sigma_t z, t ~ U(T_MIN, T_MAX), and w(t), for every position;
    with z_baseline eps_hat - z, which has the same expectation (z is independent of the actor) and far less noise:
    for a well-trained model most of eps_hat is z itself."""
    t = torch.rand(a.shape[0], a.shape[1], 1, generator=gen, device=a.device) * (T_MAX - T_MIN) + T_MIN
    z = torch.randn(a.shape, generator=gen, device=a.device)
    alpha_t, sigma_t = vp_sde(t)
    eps_hat = score_net(alpha_t * a + sigma_t * z, t, cond)
    eps_hat = eps_hat - z if z_baseline else eps_hat
    w = {"sigma2": sigma_t**2, "one": torch.ones_like(sigma_t), "alpha_over_sigma": alpha_t / sigma_t}[weighting]
    return eps_hat, w


def actor_surrogate(a, eps_hat, grad_q, w, beta):
    """Per-agent SRPO surrogate: mean_batch( w(t) <eps_hat, a> - beta <grad_a Q, a> ) with eps_hat and g detached,
    so that its gradient is (w(t) eps_hat - beta grad_a Q) times the actor's Jacobian. Returns (n,)."""
    return (w.squeeze(-1) * (eps_hat * a).sum(-1) - beta * (grad_q * a).sum(-1)).mean(-1)


# ====== The behaviour models' DDIM sampler, and the actors' start from its samples
def logsnr_grid(t_start: float, t_end: float, steps: int) -> torch.Tensor:
    """steps + 1 times from t_start to t_end, uniform in lambda = log(alpha_t / sigma_t) (DPM-Solver's spacing); t
    inverts L = -2 log alpha_t = log(1 + exp(-2 lambda)) for the linear beta(t): 9.95 t^2 + 0.1 t = L."""

    def lam(t):
        alpha_t, sigma_t = vp_sde(torch.tensor(t, dtype=torch.float64))
        return torch.log(alpha_t / sigma_t)

    lams = torch.linspace(lam(t_start).item(), lam(t_end).item(), steps + 1, dtype=torch.float64)
    L = torch.log1p(torch.exp(-2 * lams))
    return (2 * L / (0.1 + torch.sqrt(0.1**2 + 2 * 19.9 * L))).float()


@torch.no_grad()
def sample_actions(score_net, base, mask, z, steps: int, a_prev=None):
    """Deterministic DDIM samples of every position's behaviour model from x_1 = z (n, B, act), x0_hat clipped to
    [-1, 1]; position k's prefix is a_prev if given, else the samples of positions < k (ancestral sampling)."""
    n, B, _ = z.shape
    ts = logsnr_grid(1.0, 1e-3, steps).to(z.device)
    passes = 1 if a_prev is not None or not mask.any() else n
    out = torch.zeros_like(z)
    for k in range(passes):
        pos = slice(None) if passes == 1 else slice(k, k + 1)  # pass k needs only position k's model
        cond = condition(base, out if a_prev is None else a_prev, mask)[pos]
        x = z[pos]
        for i in range(steps):
            alpha_t, sigma_t = vp_sde(ts[i])
            alpha_s, sigma_s = vp_sde(ts[i + 1])
            eps_hat = score_net(x, ts[i].expand(x.shape[0], B, 1), cond, pos)
            x0 = ((x - sigma_t * eps_hat) / alpha_t).clamp(-1.0, 1.0)
            x = alpha_s * x0 + sigma_s * (x - alpha_t * x0) / sigma_t
        if passes == 1:
            return x0
        out[k] = x0[0]
    return out


def init_from_samples(actors, score_net, q_target, data, mask, args: Args, g) -> dict:
    """--actor-init samples, a mode-seeking start: distillation of the score alone is mean-seeking between far-apart
    modes, so the actors first imitate one joint sample per state, drawn with one noise z for all states (so the mode
    a sample lands in varies smoothly with the state), agent k's given those of agents < k."""
    t0, device = time.time(), data["obs"].device
    N, n, act_dim = data["act"].shape
    rows = torch.randperm(N, generator=g, device=g.device)[: args.init_states].to(device)
    z = torch.randn((n, 1, act_dim), generator=g, device=device).expand(n, len(rows), act_dim)
    obs = data["obs"][rows].transpose(0, 1)
    target = sample_actions(score_net, obs, mask, z, args.sample_steps)
    with torch.no_grad():
        q = q_target(data["critic_state"][rows], target.transpose(0, 1).reshape(len(rows), -1)).mean().item()
    opt = torch.optim.Adam(actors.parameters(), lr=args.actor_lr, fused=True)
    for _ in range(args.init_steps):  # regress every actor onto its target: mean_batch ||pi_k(o_k) - target_k||^2
        idx = torch.randint(obs.shape[1], (args.policy_batch_size,), generator=g, device=device)
        loss = ((actors(obs[:, idx]) - target[:, idx]) ** 2).sum(-1).mean(-1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    print(f"[stage 2] actors start from behaviour samples (mean Q {q:.2f}, loss {loss.mean():.4f})", file=sys.stderr)
    return {"mean_q": q, "regression_loss": loss.detach().tolist(), "seconds": time.time() - t0}


# ====== Data and evaluation
def load_data(args: Args) -> tuple[dict, dict, str]:
    """(arrays in the project's format, metadata, source): generated data (cached), or --dataset-path's."""
    generate = lambda: ensure_dataset(args.env_id, args.dataset, args.dataset_transitions)
    spec = env_spec(args.env_id) if args.dataset_path else None
    return read_dataset(
        args.dataset_path, generate, spec, check_metadata, env_id=args.env_id, dataset_seed=args.dataset_seed
    )


def to_tensors(arrays: dict, order: list[int], bootstrap_truncation: bool) -> dict:
    """Agents stacked in the order of the decomposition: obs (N, n, obs_max) zero-padded, act (N, n, act)."""
    n = len(order)  # (the env's spec checked the data's sizes)
    if any(not np.array_equal(arrays[f"rewards_{i}"], arrays["rewards_0"]) for i in range(1, n)):
        raise RunError("the dataset's agents have different rewards; MaMuJoCo has one team reward (not MaMuJoCo data)")
    obs_max = max(arrays[f"obs_{i}"].shape[1] for i in range(n))
    pad = lambda x: np.pad(x, ((0, 0), (0, obs_max - x.shape[1])))
    t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    done = arrays["terminals"] | (arrays["truncations"] & (not bootstrap_truncation))
    cat = lambda key: t(np.concatenate([arrays[f"{key}_{i}"] for i in order], 1))
    return {"obs": t(np.stack([pad(arrays[f"obs_{i}"]) for i in order], 1)), "reward": t(arrays["rewards_0"]),
            "act": t(np.stack([arrays[f"actions_{i}"] for i in order], 1)), "done": t(done.astype(np.float32)),
            # the critic's "state" is the concatenation of the agents' own observations (authors' code)
            "critic_state": cat("obs"), "next_critic_state": cat("next_obs")}  # fmt: skip


@torch.no_grad()
def evaluate(actors, args: Args, order: list[int], obs_max: int, episodes=None) -> dict:
    """`episodes` (default --eval-episodes) episodes (env seeds seed + 100 + e), decentralised, stepped together until
    each has ended:
    {"return": mean team return (None if an episode failed), "episode_returns", "episode_lengths", "failed_episodes"}.
    An episode fails, and stops, at a non-finite action or a `diverged` step; the others go on (every failure kept)."""
    actors.eval()
    E, device = episodes or args.eval_episodes, next(actors.parameters(), torch.empty(0)).device
    envs = [make_env(args.env_id) for _ in range(E)]
    names, seeds = envs[0].possible_agents, [args.seed + 100 + e for e in range(E)]
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    returns, lengths, failed = [0.0] * E, [0] * E, []
    fail = lambda e, t, what: failed.append({"episode": e, "env_seed": seeds[e], "env_step": t, "what": what})
    live = [e for e in range(E) if not (d := diverged(envs[e], obs[e], 0.0, names)) or fail(e, 0, d + " after reset")]
    for t in range(1, EPISODE_LEN + 1):
        if not live:  # every episode has ended
            break
        o = np.stack([saved.padded(obs[e], names, order, obs_max) for e in live], 1)  # (n positions, live, obs)
        act = actors(torch.as_tensor(o, device=device)).cpu().numpy()  # (n positions, live, act)
        still = []
        for j, e in enumerate(live):
            bad = [names[i] for k, i in enumerate(order) if not np.all(np.isfinite(act[k, j]))]
            if bad:
                fail(e, t, f"non-finite action of {bad[0]}")
                continue
            obs[e], r, term, trunc, _ = envs[e].step({names[i]: act[k, j] for k, i in enumerate(order)})
            reward, lengths[e] = float(r[names[0]]), t  # the team reward: every agent receives the same
            what = diverged(envs[e], obs[e], reward, names)
            if what:
                fail(e, t, what)
                continue
            returns[e] += reward
            if not (any(term.values()) or any(trunc.values())):
                still.append(e)
        live = still
    [env.close() for env in envs]
    actors.train()
    failed.sort(key=lambda f: f["episode"])
    returns = [None if any(f["episode"] == e for f in failed) else returns[e] for e in range(E)]
    return {"return": None if failed else float(np.mean(returns)), "episode_returns": returns,
            "episode_lengths": lengths, "failed_episodes": failed}  # fmt: skip


def videos(actors, args: Args, order: list[int], obs_max: int, out: str) -> dict:
    """--capture-video N: the evaluation again, recorded, and GIFs of its first N episodes in `out`."""
    names = make_env(args.env_id).possible_agents

    def draw(policy, seed, rewards):
        env = make_env(args.env_id)  # a fresh env per episode, as the evaluation's
        frames = render.mamujoco_frames(env, policy, seed, every=args.video_every, rewards=rewards)
        env.close()
        return frames, sum(float(r[names[0]]) for r in rewards)  # the team reward, in the evaluation's order

    run_eval = lambda a: evaluate(a, args, order, obs_max)  # noqa: E731
    rec = saved.record_evaluation(run_eval, actors, draw, names, args.seed, order, obs_max, out, args.capture_video, 20)
    return {**rec, "eval_episodes": args.eval_episodes}


# ====== Settings: the defaults of --env-id / --dataset, and the checks made before anything is written
def env_defaults(args: Args) -> Args:
    """Fill the settings left at None with the defaults of --dataset and --env-id (BETA_*, ENV_DEFAULTS)."""
    if args.beta is None and not args.dataset_path:
        args.beta = BETA_ENV_DEFAULTS.get((args.env_id, args.dataset), BETA_DEFAULTS.get(args.dataset, 0.05))
    runs.fill_unset(args, {**STAGE2_DEFAULT, **ENV_DEFAULTS.get(args.env_id, {})})
    return args


def cli_args(argv: list[str] | None = None) -> Args:
    """Args from the command line, its defaults those of the --env-id and --dataset given (--help shows them)."""
    return runs.parse_cli(Args, env_defaults, argv)


def resolve_args(args: Args) -> Args:
    """Fill the defaults still unset and reject bad settings before anything is written."""
    if args.env_id not in ENV_IDS:
        raise RunError(f"unknown --env-id {args.env_id!r}; choose one of {', '.join(ENV_IDS)}")
    if not args.dataset_path and args.dataset not in QUALITIES:
        raise RunError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(QUALITIES)} or --dataset-path")
    env_defaults(args)
    args.stage1_seed = args.seed if args.stage1_seed is None else args.stage1_seed
    n = env_spec(args.env_id)["n_agents"] if args.agent_order else None
    runs.check_args(args, {"actor_init": ("random", "samples")}, ("video_every",), n)
    return args


def evaluate_saved(args: Args) -> dict:
    """--eval-from RUN: RUN's actors.pt evaluated with RUN's settings (training nothing), drawn with --capture-video."""
    ev_args, run_args, res = saved.open_saved(args, Args, resolve_args)
    actors, order, obs_max = saved.saved_actors(Actors, make_env(ev_args.env_id), ev_args, res)
    t0, out = time.time(), os.path.join(args.eval_from, "videos")
    ev = evaluate(actors, ev_args, order, obs_max)
    vids = videos(actors, ev_args, order, obs_max, out) if args.capture_video else None
    return saved.write_evaluation(ev_args, run_args, res, ev, vids, time.time() - t0)


def finish(run, actors, args: Args, meta: dict, source: str, order, ref, status: str, diagnostics=None, draw=None):
    """results.json and actors.pt of a finished run, or of one whose evaluation failed (status "failed")."""
    history, init = run.policy_extra["eval_history"], run.policy_extra.get("init")
    failed = [dict(f, policy_step=h["step"]) for h in history for f in h.get("failed_episodes", [])]
    results = dict(env_id=args.env_id, dataset=None if args.dataset_path else args.dataset, dataset_path=source,
                   dataset_sha256=meta["sha256"], decomposition=args.decomposition, agent_order=order, beta=args.beta,
                   weighting=args.weighting, seed=args.seed, status=status, metric=METRIC, failed_episodes=failed,
                   normalization_note=None if ref else NO_REF, actor_init=init, diagnostics=diagnostics)  # fmt: skip
    return finish_run(run, results, actors, order, asdict(args), ref, None, draw)


# ====== The three stages; `run.stage` loads a cached stage-1 model, resumes and checkpoints (omsd_utils/runs.py)
def stage1a_behaviour_models(run, data, mask, args: Args, stage1: dict, g):
    """Per-agent conditional diffusion behaviour models eps_k(a_t, t | o_k, a_<k), trained by noise prediction."""
    (N, n, act_dim), obs_max = data["act"].shape, data["obs"].shape[2]
    torch.manual_seed(args.stage1_seed * 1000 + 1)
    score_net = ScoreNet(n, act_dim, obs_max + mask.shape[1] * act_dim, args.diffusion_hidden).to(mask.device)
    opt = torch.optim.AdamW(score_net.parameters(), lr=DIFFUSION_LR, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.diffusion_steps, eta_min=1e-5)
    keys = ("decomposition", "diffusion_steps", "diffusion_batch_size", "diffusion_hidden")
    bf16 = args.diffusion_bf16 and runs.native_bf16(mask.device)
    fields = dict(stage1, stage="diffusion", bf16=bf16, **{k: getattr(args, k) for k in keys})
    objs = {"model": score_net, "opt": opt, "sched": sched}
    stage = run.stage("stage 1a: diffusion", fields, objs, g, args.diffusion_steps, args.checkpoint_every)
    for step in stage.steps():
        idx = torch.randint(N, (args.diffusion_batch_size,), generator=g, device=mask.device)  # all rows, unlike MPE
        a0 = data["act"][idx].transpose(0, 1)  # (n, B, act), dataset actions, position order
        with torch.autocast(mask.device.type, torch.bfloat16, enabled=bf16):  # weights and optimiser stay float32
            loss = diffusion_loss(score_net, a0, condition(data["obs"][idx].transpose(0, 1), a0, mask), g)
        check_finite(loss, "stage 1a (diffusion)", step)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        stage.log(step, {f"losses/diffusion_position{k}": loss[k] for k in range(n)}, f"loss {loss.mean():.3f}")
    stage.save({"model": score_net})
    return score_net.eval().requires_grad_(False)


def stage1b_critic(run, data, args: Args, stage1: dict, g):
    """Centralised IQL critic: V by expectile regression onto min(Q1, Q2) of the target heads, Q onto r + gamma V'."""
    (N, n, act_dim), S, device = data["act"].shape, data["critic_state"].shape[1], data["act"].device
    torch.manual_seed(args.stage1_seed * 1000 + 2)
    # --critic-target-norm: the nets fit (Q - mu) / sd; else Q as it is (the authors')
    mu, sd = q_scale(data["reward"], data["done"], args.gamma) if args.critic_target_norm else (0.0, 1.0)
    q_net = Scaled(TwinQ(S + n * act_dim, args.critic_hidden), mu, sd).to(device)
    v_net = Scaled(mlp(S, args.critic_hidden, 1), mu, sd).to(device)
    q_target = Scaled(TwinQ(S + n * act_dim, args.critic_hidden), mu, sd).to(device)
    q_target.load_state_dict(q_net.state_dict())
    q_opt, v_opt = (torch.optim.Adam(m.parameters(), lr=args.critic_lr, fused=True) for m in (q_net, v_net))
    keys = "critic_steps critic_batch_size critic_hidden critic_lr critic_target_norm expectile gamma".split()
    keys += ["bootstrap_truncation"]
    fields = dict(stage1, stage="critic", **{k: getattr(args, k) for k in keys})
    objs = {"q": q_net, "q_target": q_target, "v": v_net, "q_opt": q_opt, "v_opt": v_opt}
    stage = run.stage("stage 1b: IQL critic", fields, objs, g, args.critic_steps, args.checkpoint_every)
    joint = data["act"].reshape(N, -1)
    for step in stage.steps():
        idx = torch.randint(N, (args.critic_batch_size,), generator=g, device=device)
        s, a, s2 = data["critic_state"][idx], joint[idx], data["next_critic_state"][idx]
        with torch.no_grad():
            q_t = q_target(s, a).min(0).values
        v_loss = expectile_loss(q_t - v_net(s).squeeze(-1), args.expectile)
        v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        v_opt.step()
        with torch.no_grad():
            y = data["reward"][idx] + args.gamma * (1 - data["done"][idx]) * v_net(s2).squeeze(-1)
        q_loss = 0.5 * ((q_net(s, a) - y) ** 2).mean(1).sum()
        check_finite(q_loss + v_loss, "stage 1b (IQL critic)", step)
        q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        q_opt.step()
        with torch.no_grad():  # Polyak averaging, all tensors in one op
            torch._foreach_lerp_(list(q_target.parameters()), list(q_net.parameters()), POLYAK)
        stage.log(step, {"losses/q_loss": q_loss, "losses/v_loss": v_loss}, f"q {q_loss:.3f} v {v_loss:.3f}")
    stage.save({"q": q_net, "q_target": q_target, "v": v_net})
    return q_target.eval().requires_grad_(False)


def stage2_actors(run, data, score_net, q_target, mask, args: Args, g, evaluate_fn, ref, fail):
    """Deterministic actors, each following w(t) eps_hat(pi(o) | o, a_<k) - beta grad_a Q (the SRPO surrogate).
    An evaluation with a diverged episode ends the run: fail() writes its results, then RunError."""
    (N, n, act_dim), obs_max = data["act"].shape, data["obs"].shape[2]
    torch.manual_seed(args.seed * 1000 + 3)
    actors = Actors(n, obs_max, act_dim, args.actor_hidden).to(mask.device)
    # one Adam over every actor's parameters: Adam is per parameter, so this is exactly one Adam per agent
    opt = torch.optim.Adam(actors.parameters(), lr=args.actor_lr, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.policy_steps, eta_min=0.0)
    objs = {"actors": actors, "opt": opt, "sched": sched}
    stage = run.stage("stage 2: actors", None, objs, g, args.policy_steps, args.checkpoint_every)

    def evaluated(step: int):
        ev = evaluate_fn(actors, final=step == args.policy_steps)
        failed = ev.pop("failed_episodes")
        stage.evaluated(step, ev.pop("return"), ref, **ev, **({"failed_episodes": failed} if failed else {}))
        if failed:
            run.timing["policy"] = {"seconds": stage.seconds, "failed_at_step": step}
            fail(actors)
            f = failed[0]
            E = len(ev["episode_returns"])
            raise RunError(f"evaluation at policy step {step}: {len(failed)} of {E} episodes diverged "
                           f"(first: episode {f['episode']}, env seed {f['env_seed']}, env step {f['env_step']}: "
                           f"{f['what']}); no mean return is reported, see {run.dir}/results.json")  # fmt: skip

    if stage.start == 0:
        if args.actor_init == "samples":
            g4 = torch.Generator(mask.device).manual_seed(args.stage1_seed * 1000 + 4)  # stage 1's: shared like it
            stage.extra["init"] = init_from_samples(actors, score_net, q_target, data, mask, args, g4)
        stage.extra.update(eval_history=[], eval_seconds=[])
        evaluated(0)
    for step in stage.steps():
        idx = torch.randint(N, (args.policy_batch_size,), generator=g, device=mask.device)
        obs, s = data["obs"][idx].transpose(0, 1), data["critic_state"][idx]
        # every agent's prefix is the actors' actions at the start of the iteration (the authors' code), so one
        # critic backward gives grad_a Q for every slot and one batched diffusion forward every agent's eps_hat
        a = actors(obs)  # (n, B, act), live
        cur = a.detach()
        grad_q = q_grad(q_target, s, cur)
        eps_hat, w = noised_eps_hat(score_net, cur, condition(obs, cur, mask), args.weighting, args.z_baseline, g)
        loss = actor_surrogate(a, eps_hat, grad_q, w, args.beta)  # (n,)
        check_finite(loss, "stage 2 (actors)", step)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # agents share no parameters: each actor gets exactly its own gradient
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.policy_steps:
            evaluated(step)
        ret = stage.extra["eval_history"][-1]["return"]
        stage.log(step, {f"losses/actor_position{k}": loss[k] for k in range(n)}, f"eval return {ret:.1f}")
    stage.save(None)
    return actors


def main(args: Args) -> dict:
    t_start = time.time()
    args = resolve_args(args)
    if args.eval_from:
        return evaluate_saved(args)
    runs.set_threads(args.threads)
    arrays, meta, source = load_data(args)
    if args.dataset_path:  # beta: --beta, else the default of the quality the data record, else --dataset's
        beta_of = lambda q: BETA_ENV_DEFAULTS.get((args.env_id, q), BETA_DEFAULTS.get(q))  # noqa: E731
        args.beta = runs.data_beta(args.beta, beta_of, args.dataset, meta.get("quality"))
    n = sum(1 for k in arrays if k.startswith("obs_"))
    order = list(args.agent_order) or list(range(n))
    data = to_tensors(arrays, order, args.bootstrap_truncation)
    ends, ref = episode_ends(arrays), normalization(args.env_id, meta)
    rows = mamujoco_rows(args.env_id, arrays, meta) if args.diagnostics else None  # of the critic's gradient truth
    del arrays  # 1M Ant transitions are ~2 GB of arrays; only the tensors are used from here on
    run = start_run(asdict(args), args.cache_dir, args.resume, t_start, dataset_sha256=meta["sha256"])
    if run.finished is not None:  # killed after its results.json was written: nothing left to do
        return run.report_finished()
    runs.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    data = {k: v.to(device) for k, v in data.items()}
    print(f"data: {source}, {len(data['obs']):,} transitions, {n} agents, order {order}", file=sys.stderr)
    # each stage has its own RNG stream, so a cached stage 1 leaves stage 2 unchanged
    gen = lambda seed, stage: torch.Generator(device).manual_seed(seed * 1000 + stage)
    stage1 = dict(dataset_sha256=meta["sha256"], n=n, order=order, seed=args.stage1_seed, version=4)  # cache format
    mask = prefix_mask(n, args.decomposition).to(device)
    obs_max = data["obs"].shape[2]
    periodic = min(args.periodic_eval_episodes, args.eval_episodes)  # the final evaluation has --eval-episodes
    evaluate_fn = lambda policy, final: evaluate(policy, args, order, obs_max, None if final else periodic)
    fail = lambda actors: finish(run, actors, args, meta, source, order, ref, "failed")
    score_net = stage1a_behaviour_models(run, data, mask, args, stage1, gen(args.stage1_seed, 1))
    q_target = stage1b_critic(run, data, args, stage1, gen(args.stage1_seed, 2))
    actors = stage2_actors(run, data, score_net, q_target, mask, args, gen(args.seed, 3), evaluate_fn, ref, fail)

    diagnostics = None
    if args.diagnostics:  # which part limits the score (omsd_utils/diagnostics.py)
        fns = dict(sample_actions=sample_actions, diffusion_loss=diffusion_loss, condition=condition,
                   rollout=lambda policy: saved.recorded_rollout(lambda p: evaluate_fn(p, False), policy))  # fmt: skip
        truth = critic_truth(args.env_id, rows, meta, args.gamma, order) if rows else None
        diagnostics = diagnose(fns, score_net, q_target, actors, data, ends, mask, sample_steps=args.sample_steps,
                               gamma=args.gamma, seed=args.seed, order=order, heldout=False, joint_state="obs",
                               max_policy_steps=2000, max_pool=200_000, writer=run.writer, step=args.policy_steps,
                               gradient_truth=truth)  # fmt: skip
    draw = (lambda out: videos(actors, args, order, obs_max, out)) if args.capture_video else None
    return finish(run, actors, args, meta, source, order, ref, "ok", diagnostics, draw)


if __name__ == "__main__":
    runs.run_command(main, cli_args(), (DatasetError,))
