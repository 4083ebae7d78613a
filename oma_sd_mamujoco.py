# OMSD: Offline Multi-agent RL via (Sequential) Score Decomposition (Qiao et al., arXiv 2505.05968),
# on Multi-agent MuJoCo (Gymnasium-Robotics mamujoco_v1, see envs/mamujoco.py). Single file, CleanRL style;
# it deliberately repeats the algorithm of oma_sd_mpe.py instead of importing it (see docs/omsd.md).
#
#   Stage 1a  per-agent conditional diffusion behaviour models eps_i(a_i^t, t | o_i, a_prev)   (VP-SDE)
#   Stage 1b  centralised IQL critic Q(o_1..o_n, a_1..a_n), frozen afterwards
#   Stage 2   deterministic decentralised actors pi_i(o_i), each regularised towards the behaviour
#             *conditional* of its agent given the actions of the agents before it in the order
#
# Stage-1 models do not depend on beta: they are cached under runs/cache and reused by later runs.
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import mujoco
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from envs import render
from envs.mamujoco import ENV_IDS, ENV_VERSION, EPISODE_LEN, env_spec, make_env
from omsd_data.dataset import episode_ends
from omsd_data.mamujoco_data import DEFAULT_TRANSITIONS, QUALITIES, check_metadata, ensure_dataset, reference_returns
from omsd_data.sources import read_dataset
from omsd_utils import saved
from omsd_utils.runs import (
    Progress,
    RunError,
    cache_path,
    check_args,
    check_dirs,
    check_finite,
    checkpoint,
    normalized_score,
    open_writer,
    report_finished,
    resume_stage,
    run_command,
    save_atomic,
    start_run,
    write_json_atomic,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the run (networks, minibatches, diffusion noise); evaluation envs use seed + 100 + episode"""
    stage1_seed: int | None = None
    """seed of stages 1a/1b (default: --seed); runs with the same one share the cached behaviour models and critic"""
    torch_deterministic: bool = True
    """use deterministic torch algorithms (same seed, same machine -> same numbers)"""
    cuda: bool = False
    """use CUDA if available (everything here is sized for CPU)"""
    threads: int = 1
    """torch CPU threads (0: all cores)"""
    track: bool = False
    """log to Weights & Biases as well (needs `pip install wandb`; never required)"""
    wandb_project_name: str = "omsd"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""

    # Data
    env_id: str = "HalfCheetah-2x3"
    """HalfCheetah-2x3 | Ant-2x4 | Ant-2x4-nocf | Hopper-3x1 | HalfCheetah-6x1 (envs/mamujoco.py; sets the defaults
    marked 'per --env-id')"""
    dataset: str = "expert"
    """random | medium-replay | medium | expert | medium-expert | mixture (made on first use from the committed
    behaviour policies; docs/datasets.md)"""
    dataset_path: str = ""
    """a dataset for this env instead (overrides --dataset): the project's .npz, or a published one (OMIGA hdf5,
    og-marl vault, MADiff npy, OMAR HalfCheetah) made on today's mamujoco_v1 with matching observations"""
    dataset_format: str = "auto"
    """auto (.npz = the project's format, otherwise detected) | project | omar | omiga | ogmarl | madiff"""
    dataset_seed: int = 0
    """which dataset seed of a published dataset holding several (OMAR's seed_<k>_data, a vault's seed row)"""
    dataset_transitions: int = DEFAULT_TRANSITIONS
    """size of the generated dataset (a different size is a different, separately cached dataset)"""

    # The method
    decomposition: str = "sequential"
    """sequential: agent i's behaviour model conditions on the actions of the agents before it (OMSD);
    independent: on its own observation only, i.e. the marginal (the paper's BRPO-CTDE baseline)"""
    agent_order: tuple[int, ...] = ()
    """order of the sequential decomposition, a permutation of 0..n-1 (default: identity)"""
    condition: str = "obs"
    """what the behaviour models condition on besides the prefix actions: obs (own observation) | state (the
    single-agent observation of the underlying Gymnasium task)"""
    beta: float | None = None
    """weight of grad_a Q in the actor loss w(t) <eps_hat, a> - beta <grad_a Q, a>: a SMALL beta is a STRONG
    behaviour constraint (depends on --dataset: BETA_DEFAULTS, and on --env-id where BETA_ENV_DEFAULTS says)"""
    weighting: str = "sigma2"
    """w(t) of the score term: sigma2 (the authors') | one | alpha_over_sigma"""
    t_min: float = 0.02
    """lower end of the diffusion time range of the actor loss"""
    t_max: float = 0.98
    """upper end of the diffusion time range of the actor loss"""
    prefix: str = "start"
    """prefix actions in stage 2: start = all actors' actions at the start of the iteration (the authors' code) |
    updated = recomputed after each agent's step, agent by agent (the paper's text)"""
    regq: bool = False
    """normalise grad_a Q by its root mean square (SRPO's optional trick)"""
    z_baseline: bool = True
    """use eps_hat - z instead of eps_hat in the actor loss (SRPO's variance reduction; same expected gradient;
    off in the authors' code)"""

    # Stage 1a: diffusion behaviour models
    diffusion_steps: int = 30_000
    """gradient steps, all agents' models together (the authors: 2e6)"""
    diffusion_batch_size: int = 256
    """minibatch size"""
    diffusion_hidden: int = 128
    """width of the residual trunk (the authors: 512)"""
    diffusion_blocks: int = 2
    """residual blocks"""
    diffusion_lr: float = 3e-4
    """AdamW learning rate, cosine-annealed to 1e-5"""
    diffusion_t_sampling: str = "uniform"
    """noise levels of the training loss: uniform, t ~ U(1e-3, 1) | lognormal, EDM's log(sigma_t / alpha_t) ~
    N(-1.2, 1.2^2), most of them where the modes of the actions separate (the diagnostics' loss stays uniform in t)"""
    diffusion_ema: float = 0.0
    """decay of an exponential moving average of the behaviour models' weights, which replaces them after
    stage 1a (0: off, the last iterate is used)"""

    # Stage 1b: centralised IQL critic
    critic_steps: int = 10_000
    """gradient steps (the authors: 1e6)"""
    critic_batch_size: int = 256
    """minibatch size"""
    critic_hidden: int = 256
    """width of the two hidden layers of Q and V"""
    critic_lr: float = 3e-4
    """Adam learning rate"""
    expectile: float = 0.7
    """IQL expectile tau"""
    gamma: float = 0.99
    """discount"""
    polyak: float = 0.005
    """target-Q update rate"""
    bootstrap_truncation: bool = True
    """bootstrap through time-limit ends: the 1000-step limit is not visible in the observation, so the TD target
    r + gamma V(s') is the right one there (--no-bootstrap-truncation: terminal, as OMAR's HalfCheetah data);
    terminations (Hopper and Ant falling) are never bootstrapped"""

    # Stage 2: actors
    policy_steps: int | None = None
    """gradient steps per agent (depends on --env-id; the authors: 1e6)"""
    policy_batch_size: int = 256
    """minibatch size (one batch of indices shared by all agents)"""
    actor_hidden: int = 256
    """width of the two hidden layers of each actor"""
    actor_lr: float = 1e-3
    """Adam learning rate, cosine-annealed to 0 (the authors: 3e-4)"""
    eval_every: int | None = None
    """policy steps between evaluations of eval_episodes full episodes (depends on --env-id)"""
    eval_episodes: int = 10
    """evaluation episodes (decentralised execution, deterministic actions). A diverged simulation (non-finite
    numbers, or MuJoCo's instability warning) fails its episode: every failure is recorded in results.json
    (status "failed") and the run stops with an error, since a mean over diverged episodes is meaningless"""
    actor_init: str = "random"
    """random (the authors') | samples: first regress the actors onto joint behaviour samples drawn with one noise
    vector for all states, so that they start in one joint mode (the MPE default; docs/results.md)"""
    init_steps: int = 2000
    """regression steps of --actor-init samples"""
    init_states: int = 20_000
    """--actor-init samples: dataset states (drawn at random) whose behaviour samples the actors are fitted to"""
    init_candidates: int = 1
    """--actor-init samples: shared noise vectors tried; the one whose joint samples have the highest mean Q wins"""
    sample_steps: int = 20
    """steps of the deterministic DDIM sampler of the behaviour models"""
    diagnostics: bool = True
    """after training, measure the behaviour models' fit, the critic's quality and the policy's support distance"""

    # Files
    cache_dir: str = "runs/cache"
    """where stage-1 models are cached (keyed by dataset checksum and every stage-1 setting)"""
    save_model: bool = True
    """save the final actors to runs/<run_name>/actors.pt"""
    resume: bool = True
    """continue an interrupted run of the same command from its last checkpoint, with the same final numbers"""
    checkpoint_every: int = 1000
    """steps between checkpoints of the stage in progress (in --cache-dir; a kill loses at most this many steps)"""

    # Videos and evaluation of a saved run
    capture_video: bool = False
    """draw --video-episodes episodes of the final evaluation to runs/<run_name>/videos/episode_<k>.gif (MuJoCo's
    renderer, headless with MUJOCO_GL=egl); uploaded with --track"""
    video_episodes: int = 2
    """episodes of the evaluation drawn by --capture-video (k = 0.., env seed seed + 100 + k)"""
    video_every: int = 5
    """--capture-video: one frame every this many env steps (GIF at 20 frames per second: 4x real time at 5)"""
    eval_from: str = ""
    """a finished run's directory: evaluate its actors.pt with its settings (--eval-episodes episodes, drawn with
    --capture-video) into <run>/eval_<E>_episodes.json, training nothing"""


# beta per --dataset, in the authors' convention (small = strong constraint): all but random chosen on HalfCheetah
# 2x3, seed 0, sequential, stage 1 cached (docs/results.md, "beta per quality"); random is the authors' starting
# value, untuned.
BETA_DEFAULTS = {
    "random": 0.1,
    "medium-replay": 0.001,  # of 0.02 / 0.003 / 0.001 / 0.0003
    "medium": 0.001,  # of 0.01 / 0.003 / 0.001 / 0.0003
    "expert": 0.0003,  # of 0.003 / 0.001 / 0.0003 / 0.0001
    "medium-expert": 0.001,  # of 0.005 / 0.003 / 0.001 / 0.0003
    "mixture": 0.001,  # of 0.005 / 0.001 / 0.0003
}
# beta where a task's own seed 0 (sequential, stage 1 cached) picks another value than BETA_DEFAULTS (docs/results.md,
# "Hopper 3x1: policy steps and beta", "beta on Ant 2x4's seed 0" and "beta on HalfCheetah 6x1's seed 0")
BETA_ENV_DEFAULTS = {
    ("Hopper-3x1", "expert"): 0.001,  # of 0.003 / 0.001 / 0.0003 / 0.0001
    ("Hopper-3x1", "medium-expert"): 0.005,  # of 0.005 / 0.003 / 0.001 / 0.0003
    ("Hopper-3x1", "mixture"): 0.0003,  # of 0.005 / 0.001 / 0.0003 / 0.0001
    ("Ant-2x4", "medium-replay"): 0.0003,  # of 0.003 / 0.001 / 0.0003 / 0.0001
    ("Ant-2x4", "medium"): 0.0003,  # of 0.003 / 0.001 / 0.0003 / 0.0001
    ("HalfCheetah-6x1", "expert"): 0.0001,  # of 0.001 / 0.0003 / 0.0001
}
# stage-2 length per --env-id (Hopper needs more: docs/results.md, "Hopper 3x1: policy steps and beta")
ENV_DEFAULTS = {"Hopper-3x1": dict(policy_steps=20_000, eval_every=2_500)}
STAGE2_DEFAULT = dict(policy_steps=5_000, eval_every=1_000)
METRIC = (
    "team return: the team reward (the same for every agent) summed over the episode (up to 1000 steps, "
    "or until Hopper / Ant fall)"
)


# ---------------------------------------------------------------------------------------------
# Networks: every agent's network is evaluated in one batched op over a leading agent axis
# ---------------------------------------------------------------------------------------------
class StackedLinear(nn.Module):
    """n independent Linear layers as one batched matmul: (n, B, i) -> (n, B, o)."""

    def __init__(self, n: int, i: int, o: int):
        super().__init__()
        bound = 1.0 / math.sqrt(i)  # nn.Linear's default initialisation, per agent
        self.weight = nn.Parameter(torch.empty(n, i, o).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, o).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


def vp_sde(t):
    """Continuous-time VP-SDE with linear beta(t), beta_0 = 0.1, beta_1 = 20: x_t = alpha_t a + sigma_t z."""
    log_alpha_t = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha_t = torch.exp(log_alpha_t)
    sigma_t = torch.sqrt(1.0 - alpha_t**2)
    return alpha_t, sigma_t


def t_of_lambda(lams):
    """The t at which log(alpha_t / sigma_t) = lams: L = -2 log alpha_t, inverted for the linear beta(t):
    0.5*19.9 t^2 + 0.1 t = L."""
    L = torch.log1p(torch.exp(-2 * lams))
    return 2 * L / (0.1 + torch.sqrt(0.1**2 + 2 * 19.9 * L))


class ScoreNet(nn.Module):
    """eps_k(x_t, t | cond_k) for all n positions k at once: an IDQL-style residual MLP per position.

    Gaussian Fourier time features (fixed W ~ N(0, 30^2)) -> time MLP; [x_t, cond, t_emb] -> hidden;
    residual blocks h + W2 relu(W1 LayerNorm(h)); relu -> linear output (the predicted noise).
    """

    def __init__(self, n: int, act_dim: int, cond_dim: int, hidden: int, blocks: int):
        super().__init__()
        self.register_buffer("W", torch.randn(16) * 30.0)
        self.t1, self.t2 = StackedLinear(n, 32, 64), StackedLinear(n, 64, 64)
        self.inp = StackedLinear(n, act_dim + cond_dim + 64, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([StackedLinear(n, hidden, 2 * hidden), StackedLinear(n, 2 * hidden, hidden)])
            for _ in range(blocks)
        )
        self.out = StackedLinear(n, hidden, act_dim)

    def forward(self, x_t, t, cond):  # (n, B, act), (n, B, 1), (n, B, cond)
        f = 2 * math.pi * t * self.W
        t_emb = self.t2(F.relu(self.t1(torch.cat([torch.sin(f), torch.cos(f)], -1))))
        h = self.inp(torch.cat([x_t, cond, t_emb], -1))
        for w1, w2 in self.blocks:
            h = h + w2(F.relu(w1(F.layer_norm(h, h.shape[-1:]))))
        return self.out(F.relu(h))


def prefix_mask(n: int, decomposition: str) -> torch.Tensor:
    """mask[k, j] = 1 if the model at position k conditions on the action at position j (only j < k)."""
    if decomposition == "independent":
        return torch.zeros(n, max(n - 1, 1))
    return torch.tril(torch.ones(n, n), diagonal=-1)[:, : max(n - 1, 1)]


def condition(base, a_prev_source, mask):
    """cond_k = [base_k, a_1, ..., a_{k-1}, 0, ...]: a fixed width for every position; the zero slots of
    agents that are not in the prefix make the stacked models equal to per-agent models of varying width.

    base (n, B, d): own obs (or the state, repeated); a_prev_source (n, B, act): actions in position order.
    """
    n, B, act = a_prev_source.shape
    src = a_prev_source[: mask.shape[1]]  # (n-1, B, act): position n-1 is never anyone's prefix
    prefix = mask[:, :, None, None] * src[None]  # (n, n-1, B, act)
    return torch.cat([base, prefix.permute(0, 2, 1, 3).reshape(n, B, -1)], -1)


class TwinQ(nn.Module):
    """Q_1, Q_2(s, a_1..a_n): two heads in one stacked op; s = all agents' observations."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.l1, self.l2, self.l3 = (
            StackedLinear(2, in_dim, hidden),
            StackedLinear(2, hidden, hidden),
            StackedLinear(2, hidden, 1),
        )

    def forward(self, s, a):  # (B, S), (B, n*act) -> (2, B)
        x = torch.cat([s, a], -1).expand(2, -1, -1)
        return self.l3(F.relu(self.l2(F.relu(self.l1(x))))).squeeze(-1)


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class Actors(nn.Module):
    """Deterministic actors a_i = tanh(MLP_i(o_i)); agent i's network is self.nets[i] (its own
    parameters and optimizer), evaluated for all agents in one batched matmul per layer."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.nets = nn.ModuleList(mlp(obs_dim, hidden, act_dim) for _ in range(n))

    def forward(self, obs):  # (n, B, obs) -> (n, B, act)
        h = obs
        for layer in (0, 2, 4):
            W = torch.stack([net[layer].weight for net in self.nets]).transpose(1, 2)
            b = torch.stack([net[layer].bias for net in self.nets]).unsqueeze(1)
            h = torch.baddbmm(b, h, W)
            h = torch.relu(h) if layer < 4 else torch.tanh(h)
        return h

    def one(self, k: int, obs_k):  # agent k alone: (B, obs) -> (B, act)
        return torch.tanh(self.nets[k](obs_k))


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def diffusion_loss(score_net, a0, cond, gen, t_sampling: str = "uniform"):
    """Noise-prediction loss of every position's model: E ||eps_k(alpha_t a + sigma_t z, t | cond_k) - z||^2,
    t ~ U(1e-3, 1) or, with t_sampling="lognormal", EDM's noise levels log(sigma_t / alpha_t) ~ N(-1.2, 1.2^2)
    (most samples where the modes of the actions separate; uniform t spends half of them at alpha_t < 0.3);
    summed over action dims, averaged over the batch. Returns (n,)."""
    shape = (a0.shape[0], a0.shape[1], 1)
    if t_sampling == "lognormal":
        t = t_of_lambda(1.2 + 1.2 * torch.randn(shape, generator=gen)).clamp(1e-3, 1.0)
    else:
        t = torch.rand(shape, generator=gen) * (1 - 1e-3) + 1e-3
    z = torch.randn(a0.shape, generator=gen)
    alpha_t, sigma_t = vp_sde(t)
    eps_hat = score_net(alpha_t * a0 + sigma_t * z, t, cond)
    return ((eps_hat - z) ** 2).sum(-1).mean(-1)


def expectile_loss(u, tau):
    """IQL's asymmetric L2: |tau - 1(u < 0)| u^2, u = Q - V."""
    return (torch.abs(tau - (u < 0).float()) * u**2).mean()


def score_weight(kind: str, alpha_t, sigma_t):
    return {"sigma2": sigma_t**2, "one": torch.ones_like(sigma_t), "alpha_over_sigma": alpha_t / sigma_t}[kind]


def q_grad(q_target, s, joint):
    """grad_a of mean(Q1_target, Q2_target) at the joint action (n, B, act): every agent's slot in one backward."""
    joint = joint.detach().requires_grad_(True)
    q = q_target(s, joint.transpose(0, 1).reshape(s.shape[0], -1)).mean(0)
    return torch.autograd.grad(q.sum(), joint)[0]


def noised_eps_hat(score_net, a, cond, args, gen):
    """eps_hat(a_t, t | cond) at a_t = alpha_t a + sigma_t z, t ~ U(t_min, t_max), and w(t), for every position;
    with --z-baseline eps_hat - z, which has the same expectation (z is independent of the actor) and far less
    noise: for a well-trained model most of eps_hat is z itself."""
    t = torch.rand(a.shape[0], a.shape[1], 1, generator=gen, device=a.device) * (args.t_max - args.t_min) + args.t_min
    z = torch.randn(a.shape, generator=gen, device=a.device)
    alpha_t, sigma_t = vp_sde(t)
    eps_hat = score_net(alpha_t * a + sigma_t * z, t, cond)
    if args.z_baseline:
        eps_hat = eps_hat - z
    return eps_hat, score_weight(args.weighting, alpha_t, sigma_t)


def actor_surrogate(a, eps_hat, g, w, beta):
    """Per-agent SRPO surrogate: mean_batch( w(t) <eps_hat, a> - beta <grad_a Q, a> ) with eps_hat and g detached,
    so that its gradient is (w(t) eps_hat - beta grad_a Q) times the actor's Jacobian. Returns (n,)."""
    return (w.squeeze(-1) * (eps_hat * a).sum(-1) - beta * (g * a).sum(-1)).mean(-1)


# ---------------------------------------------------------------------------------------------
# Stage helpers: the behaviour models' DDIM sampler and the actors' start from its samples
# ---------------------------------------------------------------------------------------------
def logsnr_grid(t_start: float, t_end: float, steps: int) -> torch.Tensor:
    """steps + 1 times from t_start to t_end, uniform in lambda = log(alpha_t / sigma_t) (DPM-Solver's spacing: a
    uniform grid in t takes too large steps at small noise, and DDIM's samples then lose most of their spread)."""

    def lam(t):
        alpha_t, sigma_t = vp_sde(torch.tensor(t, dtype=torch.float64))
        return torch.log(alpha_t / sigma_t)

    lams = torch.linspace(lam(t_start).item(), lam(t_end).item(), steps + 1, dtype=torch.float64)
    return t_of_lambda(lams).float()


@torch.no_grad()
def sample_actions(score_net, base, mask, z, steps: int, a_prev=None):
    """Deterministic DDIM samples of every position's behaviour model, from x_1 = z (n, B, act).

    The prefix of position k is a_prev (e.g. the dataset's actions) if given, else the samples of positions < k:
    ancestral sampling of mu(a|s) = prod_k mu_k(a_k | s, a_<k), one pass per position (one pass if no position
    has a prefix). x0_hat = (x_t - sigma_t eps_hat) / alpha_t is clipped to the action box [-1, 1] at each step.
    """
    n, B, _ = z.shape
    ts = logsnr_grid(1.0, 1e-3, steps).to(z.device)
    passes = 1 if a_prev is not None or not mask.any() else n
    out = torch.zeros_like(z)
    for k in range(passes):
        cond = condition(base, out if a_prev is None else a_prev, mask)
        x = z
        for i in range(steps):
            alpha_t, sigma_t = vp_sde(ts[i])
            alpha_s, sigma_s = vp_sde(ts[i + 1])
            eps_hat = score_net(x, ts[i].expand(n, B, 1), cond)
            x0 = ((x - sigma_t * eps_hat) / alpha_t).clamp(-1.0, 1.0)
            x = alpha_s * x0 + sigma_s * (x - alpha_t * x0) / sigma_t
        if passes == 1:
            return x0
        out[k] = x0[k]
    return out


def fit_actors(actors, obs, target, steps: int, batch: int, lr: float, g):
    """Regress every actor onto its target actions: mean_batch ||pi_k(o_k) - target_k||^2. obs (n, N, obs)."""
    opt = torch.optim.Adam(actors.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(obs.shape[1], (batch,), generator=g, device=obs.device)
        loss = ((actors(obs[:, idx]) - target[:, idx]) ** 2).sum(-1).mean(-1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    return loss.detach()


def init_from_samples(actors, score_net, q_target, data, cond_base, mask, args, g) -> dict:
    """--actor-init samples, a mode-seeking start: distillation of the score alone is mean-seeking between far-apart
    modes, so the actors first imitate one joint sample per state. The noise z is shared by all states, so the mode
    a sample lands in varies smoothly with the state; sequentially, agent k's sample is conditioned on those of
    agents < k. Of --init-candidates noise vectors, the one whose samples have the highest mean Q is used."""
    t0, device = time.time(), data["obs"].device
    N, n, act_dim = data["act"].shape
    rows = torch.randperm(N, generator=g)[: args.init_states].to(device)
    best = None
    for c in range(args.init_candidates):
        z = torch.randn(n, 1, act_dim, generator=g, device=device).expand(n, len(rows), act_dim)
        target = sample_actions(score_net, cond_base(rows), mask, z, args.sample_steps)
        with torch.no_grad():
            q = q_target(data["critic_state"][rows], target.transpose(0, 1).reshape(len(rows), -1)).mean().item()
        if best is None or q > best[0]:
            best = (q, c, target)
    init_loss = fit_actors(
        actors, data["obs"][rows].transpose(0, 1), best[2], args.init_steps, args.policy_batch_size, args.actor_lr, g
    )
    print(
        f"[stage 2] actors initialised from behaviour samples (candidate {best[1]}, mean Q {best[0]:.2f}, "
        f"regression loss {init_loss.mean().item():.4f}, {time.time() - t0:.0f} s)",
        file=sys.stderr,
    )
    return {"candidate": best[1], "mean_q": best[0], "regression_loss": init_loss.tolist(), "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def stage1_fields(args: Args, meta: dict, n: int, order: list[int]) -> dict:
    """What every stage-1 cache key holds: the data, the agent order, the stage-1 seed and the format version."""
    return {"dataset_sha256": meta["sha256"], "n": n, "order": order, "seed": args.stage1_seed, "version": 1}


def diffusion_fields(args: Args, stage1: dict) -> dict:
    """The settings that key stage 1a's cached behaviour models (with the data and agent order of `stage1`)."""
    return dict(
        stage1,
        stage="diffusion",
        decomposition=args.decomposition,
        condition=args.condition,
        **{
            k: getattr(args, k)
            for k in ("diffusion_steps", "diffusion_batch_size", "diffusion_hidden", "diffusion_blocks", "diffusion_lr")
        },
        # only when on, so that the cached models trained without them keep their keys
        **({"diffusion_ema": args.diffusion_ema} if args.diffusion_ema else {}),
        **({"diffusion_t_sampling": args.diffusion_t_sampling} if args.diffusion_t_sampling != "uniform" else {}),
    )


def load_data(args: Args) -> tuple[dict, dict, str]:
    """(arrays in the project's format, metadata, source): data made from the committed behaviour policies (cached
    under data/), or read from --dataset-path."""
    return read_dataset(
        args, lambda: ensure_dataset(args.env_id, args.dataset, args.dataset_transitions), env_spec, check_metadata
    )


def to_tensors(arrays: dict, order: list[int], args: Args) -> dict:
    """Stack agents in the order of the decomposition: obs (N, n, obs_max) zero-padded (Hopper's agents see 8, 9
    and 8 numbers), act (N, n, act). MaMuJoCo has one team reward, which every agent receives."""
    n = len(order)
    obs_dims = [arrays[f"obs_{i}"].shape[1] for i in range(n)]
    act_dims = {arrays[f"actions_{i}"].shape[1] for i in range(n)}
    if len(act_dims) != 1:
        raise RunError(f"agents have different action sizes {sorted(act_dims)}; this script needs equal ones")
    obs_max = max(obs_dims)
    for i in range(1, n):
        if not np.array_equal(arrays[f"rewards_{i}"], arrays["rewards_0"]):
            raise RunError(
                f"the dataset's rewards_{i} differ from rewards_0; MaMuJoCo has one team reward that every "
                f"agent receives, so this is not a MaMuJoCo dataset"
            )

    def stack(key):
        return np.stack(
            [np.pad(arrays[f"{key}_{i}"], ((0, 0), (0, obs_max - arrays[f"{key}_{i}"].shape[1]))) for i in order], 1
        )

    done = arrays["terminals"] | (arrays["truncations"] & (not args.bootstrap_truncation))
    t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    return {
        "obs": t(stack("obs")),  # (next observations enter only through the critic's next state)
        "act": t(np.stack([arrays[f"actions_{i}"] for i in order], 1)),
        "reward": t(arrays["rewards_0"]),
        "done": t(done.astype(np.float32)),
        "state": t(arrays["state"]),
        # the critic's "state" is the concatenation of the agents' own observations (authors' code)
        "critic_state": t(np.concatenate([arrays[f"obs_{i}"] for i in order], 1)),
        "next_critic_state": t(np.concatenate([arrays[f"next_obs_{i}"] for i in order], 1)),
    }


# ---------------------------------------------------------------------------------------------
# Evaluation: decentralised execution, each agent acts on its own observation only
# ---------------------------------------------------------------------------------------------
MJ_INSTABILITY = ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC")


def diverged(env, obs: dict, reward, names) -> str:
    """Why one env step's output is unusable ('' if it is fine): a NaN/inf reward or observation, or MuJoCo's
    instability warning. On a bad qpos/qvel/qacc MuJoCo resets the simulation by itself, so the episode goes on
    with finite but meaningless numbers; its warning counters say so until the env's next reset."""
    if not np.isfinite(reward):
        return f"non-finite reward {reward}"
    for a in names:
        if not np.all(np.isfinite(obs[a])):
            return f"non-finite observation of {a}"
    data = getattr(getattr(getattr(env, "single_agent_env", None), "unwrapped", None), "data", None)
    for w in MJ_INSTABILITY if data is not None else ():
        if data.warning[int(getattr(mujoco.mjtWarning, w))].number:
            return f"unstable simulation (MuJoCo warning {w}; MuJoCo reset it)"
    return ""


@torch.no_grad()
def evaluate(actors, args: Args, order: list[int], obs_max: int) -> dict:
    """eval_episodes full episodes (env seeds seed + 100 + e), all stepped together with one batched actor call
    per step until every episode has ended (termination, or truncation at 1000 steps).

    Returns {"return": mean team return (None if any episode failed), "episode_returns", "episode_lengths",
    "failed_episodes": [{episode, env_seed, env_step, what}]}. An episode fails (and stops) at a non-finite
    action, observation or reward or an unstable simulation (see `diverged`); the other episodes go on, so that
    every failure is recorded.
    """
    actors.eval()
    device = next(actors.parameters()).device
    E = args.eval_episodes
    envs = [make_env(args.env_id) for _ in range(E)]
    names = envs[0].possible_agents
    seeds = [args.seed + 100 + e for e in range(E)]
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    returns, lengths, failed, live = [0.0] * E, [0] * E, [], []
    for e in range(E):
        what = diverged(envs[e], obs[e], 0.0, names)
        if what:
            failed.append({"episode": e, "env_seed": seeds[e], "env_step": 0, "what": what + " after reset"})
        else:
            live.append(e)
    for t in range(1, EPISODE_LEN + 1):
        if not live:
            break
        o = np.zeros((len(order), len(live), obs_max), np.float32)
        for j, e in enumerate(live):
            for k, i in enumerate(order):
                x = obs[e][names[i]]
                o[k, j, : len(x)] = x
        act = actors(torch.as_tensor(o, device=device)).cpu().numpy()  # (n positions, live, act)
        still = []
        for j, e in enumerate(live):
            bad = [names[i] for k, i in enumerate(order) if not np.all(np.isfinite(act[k, j]))]
            if bad:
                failed.append(
                    {"episode": e, "env_seed": seeds[e], "env_step": t, "what": f"non-finite action of {bad[0]}"}
                )
                continue
            obs[e], r, term, trunc, _ = envs[e].step({names[i]: act[k, j] for k, i in enumerate(order)})
            reward = float(r[names[0]])  # the team reward: every agent receives the same
            lengths[e] = t
            what = diverged(envs[e], obs[e], reward, names)
            if what:
                failed.append({"episode": e, "env_seed": seeds[e], "env_step": t, "what": what})
                continue
            returns[e] += reward
            if not (any(term.values()) or any(trunc.values())):
                still.append(e)
        live = still
    for env in envs:
        env.close()
    actors.train()
    failed.sort(key=lambda f: f["episode"])
    bad = {f["episode"] for f in failed}
    return {
        "return": None if failed else float(np.mean(returns)),
        "episode_returns": [None if e in bad else returns[e] for e in range(E)],
        "episode_lengths": lengths,
        "failed_episodes": failed,
    }


def capture_video(actors, args: Args, order: list[int], obs_max: int, out: str) -> dict:
    """--capture-video: the evaluation of `actors` again, recorded, and GIFs of its first --video-episodes episodes
    in `out` (omsd_utils/saved.py checks that each drawn episode is the evaluation's own, return included)."""
    E = max(args.eval_episodes, args.video_episodes)
    run_args = Args(**{**asdict(args), "eval_episodes": E})
    names = make_env(args.env_id).possible_agents

    def draw(policy, seed, rewards):
        env = make_env(args.env_id)  # a fresh env per episode, as the evaluation's
        frames = render.mamujoco_frames(env, policy, seed, every=args.video_every, rewards=rewards)
        env.close()
        ret = 0.0
        for r in rewards:
            ret += float(r[names[0]])  # the team reward, summed in the evaluation's order
        return frames, ret

    rec = saved.record_evaluation(
        lambda a: evaluate(a, run_args, order, obs_max),
        actors,
        draw,
        names,
        args,
        order,
        obs_max,
        out,
        args.video_episodes,
        fps=20,
    )
    rec["eval_episodes"] = E
    if args.track:
        saved.upload_videos(rec["episodes"])
    return rec


def evaluate_saved(args: Args) -> dict:
    """--eval-from RUN: RUN's actors.pt (weights only) evaluated with RUN's settings over --eval-episodes episodes
    (env seeds seed + 100 + k, as its evaluations), drawn with --capture-video; nothing is trained."""
    ev_args, run_args, res = saved.open_saved(args, Args, resolve_args)
    env = make_env(ev_args.env_id)
    actors, order, obs_max = saved.saved_actors(Actors, env, ev_args, res)
    env.close()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    ev = evaluate(actors, ev_args, order, obs_max)
    ev["normalized_score"] = normalized_score(ev["return"], res.get("normalization"))
    videos = None
    if args.capture_video:
        videos = capture_video(actors, ev_args, order, obs_max, os.path.join(args.eval_from, "videos"))
    return saved.write_evaluation(ev_args, run_args, res, ev, videos, time.time() - t0)


# ---------------------------------------------------------------------------------------------
# Diagnostics: which part limits a score (behaviour models, critic or extraction)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def behaviour_fit(score_net, data, rows, cond_base, mask, args) -> dict:
    """Denoising loss of every position's model on `rows` (of every 50th episode; the models trained on them), and the
    distance of DDIM samples given the dataset's prefix actions to the dataset's action."""
    g = torch.Generator(rows.device).manual_seed(12345)
    a0 = data["act"][rows].transpose(0, 1)
    cond = condition(cond_base(rows), a0, mask)
    loss = torch.stack([diffusion_loss(score_net, a0, cond, g) for _ in range(8)]).mean(0)
    z = torch.randn(a0.shape, generator=g, device=a0.device)
    samples = sample_actions(score_net, cond_base(rows), mask, z, args.sample_steps, a_prev=a0)
    return {
        "denoising_loss": loss.tolist(),
        "denoising_loss_rows": "every 50th episode, seen in training",
        "sample_to_data_distance": (samples - a0).norm(dim=-1).mean(1).tolist(),
    }


class BehaviourSampler(nn.Module):
    """The joint behaviour policy stage 1a represents, mu(a|s) = prod_k mu_k(a_k | o_k, a_<k), as a policy: a fresh
    DDIM sample per step, agent by agent, each conditioned on the samples of the agents before it (so it is not
    decentralised: it is a diagnostic of the models, not a policy to deploy)."""

    def __init__(self, score_net, mask, act_dim: int, steps: int, gen):
        super().__init__()
        self.score_net, self.mask, self.act_dim, self.steps, self.gen = score_net, mask, act_dim, steps, gen

    def forward(self, obs):  # (n, E, obs) -> (n, E, act)
        z = torch.randn(*obs.shape[:2], self.act_dim, generator=self.gen, device=obs.device)
        return sample_actions(self.score_net, obs, self.mask, z, self.steps)


def sampler_rollout(score_net, mask, act_dim: int, args: Args, order: list[int], obs_max: int) -> dict:
    """The behaviour models acting in the final evaluation's episodes (BehaviourSampler): if their return is far
    below the data's, stage 1a limits the score before any extraction."""
    g = torch.Generator(next(score_net.parameters()).device).manual_seed(args.seed * 1000 + 5)
    ev = evaluate(BehaviourSampler(score_net, mask, act_dim, args.sample_steps, g), args, order, obs_max)
    score_net.eval()  # evaluate() leaves its policy in train mode
    return {"return": ev["return"], "episode_lengths": ev["episode_lengths"]}


@torch.no_grad()
def support_distance(states, acts, pool_states, pool_acts, k: int = 20) -> np.ndarray:
    """For every (state, joint action): the distance from the action to the nearest joint action of the dataset
    among the k dataset states nearest to the state (standardised), the authors' planned OOD measure."""
    mu, sd = pool_states.mean(0), pool_states.std(0) + 1e-6
    pool = (pool_states - mu) / sd
    out = []
    for lo in range(0, len(states), 256):
        nn_idx = torch.cdist((states[lo : lo + 256] - mu) / sd, pool).topk(k, largest=False).indices  # (m, k)
        out.append((acts[lo : lo + 256, None] - pool_acts[nn_idx]).norm(dim=-1).min(1).values)
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def critic_quality(q_target, data, ends, gamma: float, n: int = 10_000) -> dict:
    """Q (mean of the two target heads) of dataset actions against their discounted Monte-Carlo returns to the end
    of the episode (ends: the last row of every episode), on n evenly spaced transitions."""
    r = data["reward"].cpu().numpy().astype(np.float64)
    last = np.zeros(len(r), bool)
    last[ends] = True
    G = np.zeros_like(r)
    for t in range(len(r) - 1, -1, -1):
        G[t] = r[t] + (0.0 if last[t] or t == len(r) - 1 else gamma * G[t + 1])
    idx = np.linspace(0, len(r) - 1, min(n, len(r))).astype(int)
    joint = data["act"][idx].reshape(len(idx), -1)
    q = q_target(data["critic_state"][idx], joint).mean(0).cpu().numpy()
    g = G[idx]
    corr = float(np.corrcoef(q, g)[0, 1]) if q.std() > 0 and g.std() > 0 else float("nan")
    return {
        "q_mean": float(q.mean()),
        "mc_return_mean": float(g.mean()),
        "abs_error": float(np.abs(q - g).mean()),
        "pearson_r": corr,
    }


def rounded(x, digits: int = 4):
    """x with every float rounded (for results.json)."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return round(x, digits) if isinstance(x, float) else x


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """{'a/b_0': x, ...}: the numbers of a nested dict of diagnostics, for TensorBoard."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, list):
            out.update({f"{prefix}{k}_{i}": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def diagnose(score_net, q_target, actors, data, ends, cond_base, mask, args, order, obs_max):
    """Which part limits a score: the behaviour models' fit, the critic's Q against Monte-Carlo returns, and the
    final policy's distance from the data's support (on at most 2,000 of its evaluation steps, against at most
    200,000 dataset transitions: the exact nearest-neighbour search is quadratic). Rounded for results.json."""
    t0, device = time.time(), data["obs"].device
    N = data["obs"].shape[0]
    episode = np.searchsorted(ends, np.arange(N))
    # every 50th episode (the last one of a smaller dataset): where the fit is measured and the data's own support
    # distance is taken, against the other episodes
    is_ref = (episode % 50 == 49) if episode.max() >= 49 else episode == episode.max()
    rows = torch.as_tensor(np.flatnonzero(is_ref))
    rows = rows[torch.linspace(0, len(rows) - 1, min(2048, len(rows))).long()].to(device)
    others = torch.as_tensor(np.flatnonzero(~is_ref) if (~is_ref).any() else np.arange(N))
    diagnostics = {
        "behaviour": behaviour_fit(score_net, data, rows, cond_base, mask, args),
        "critic": critic_quality(q_target, data, ends, args.gamma),
    }
    rec = saved.Recorder(actors)
    evaluate(rec, args, order, obs_max)  # the same episodes as the final evaluation
    obs_e = torch.as_tensor(np.concatenate([o for o, _ in rec.calls], 1))  # (n, steps of all episodes, obs_max)
    act_e = torch.as_tensor(np.concatenate([a for _, a in rec.calls], 1))
    pick = torch.linspace(0, obs_e.shape[1] - 1, min(2000, obs_e.shape[1])).long()
    pool = others[torch.linspace(0, len(others) - 1, min(200_000, len(others))).long()].to(device)
    ref = rows[torch.linspace(0, len(rows) - 1, min(500, len(rows))).long()]

    def flat(x):  # (n, B, d) -> (B, n * d): the joint observation or action
        return x.transpose(0, 1).reshape(x.shape[1], -1).to(device)

    pool_s, pool_a = flat(data["obs"][pool].transpose(0, 1)), flat(data["act"][pool].transpose(0, 1))
    d_pol = support_distance(flat(obs_e[:, pick]), flat(act_e[:, pick]), pool_s, pool_a)
    d_ref = support_distance(
        flat(data["obs"][ref].transpose(0, 1)), flat(data["act"][ref].transpose(0, 1)), pool_s, pool_a
    )
    diagnostics["policy"] = {
        "support_distance": float(d_pol.mean()),
        "support_distance_data": float(d_ref.mean()),
        "ood_share": float((d_pol > np.quantile(d_ref, 0.95)).mean()),
    }
    if args.condition == "obs":  # the sampler sees only observations; the state is not at hand in evaluate
        diagnostics["behaviour"]["sampler"] = sampler_rollout(
            score_net, mask, data["act"].shape[-1], args, order, obs_max
        )
    diagnostics["seconds"] = time.time() - t0
    return rounded(diagnostics)


# ---------------------------------------------------------------------------------------------
# Settings: the defaults of --env-id / --dataset, and the checks made before anything is written
# ---------------------------------------------------------------------------------------------
def env_defaults(args: Args) -> Args:
    """Fill the settings left at None with the defaults of --dataset and --env-id (BETA_DEFAULTS, BETA_ENV_DEFAULTS,
    ENV_DEFAULTS)."""
    if args.beta is None:
        args.beta = BETA_ENV_DEFAULTS.get((args.env_id, args.dataset), BETA_DEFAULTS.get(args.dataset, 0.05))
    for k, v in {**STAGE2_DEFAULT, **ENV_DEFAULTS.get(args.env_id, {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def cli_args(argv: list[str] | None = None) -> Args:
    """Args from the command line (default: sys.argv), its defaults those of the --env-id and --dataset given, so
    that --help shows the values a run uses."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--env-id", "--env_id", default=Args.env_id)
    pre.add_argument("--dataset", default=Args.dataset)
    try:
        known = pre.parse_known_args(argv)[0]
    except argparse.ArgumentError:  # e.g. --env-id without a value: tyro reports it
        known = Args()
    return tyro.cli(Args, args=argv, default=env_defaults(Args(env_id=known.env_id, dataset=known.dataset)))


def resolve_args(args: Args) -> Args:
    """Fill the defaults still unset and reject bad settings before anything is written."""
    if args.env_id not in ENV_IDS:
        raise RunError(f"unknown --env-id {args.env_id!r}; choose one of {', '.join(ENV_IDS)}")
    if not args.dataset_path and args.dataset not in QUALITIES:
        raise RunError(
            f"unknown --dataset {args.dataset!r}; choose one of {', '.join(QUALITIES)} or give --dataset-path"
        )
    if args.stage1_seed is None:
        args.stage1_seed = args.seed
    env_defaults(args)
    check_args(
        args,
        {"actor_init": ("random", "samples")},
        ("video_episodes", "video_every", "init_steps", "init_candidates", "init_states", "sample_steps"),
        n_agents=env_spec(args.env_id)["n_agents"] if args.agent_order else None,
    )
    return args


def main(args: Args) -> dict:
    t_start = time.time()  # wall-clock of the whole run: open_run moves it back by earlier processes' time
    args = resolve_args(args)
    if args.eval_from:
        return evaluate_saved(args)
    check_dirs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays, meta, source = load_data(args)
    n = sum(1 for k in arrays if k.startswith("obs_"))
    order = list(args.agent_order) or list(range(n))
    if sorted(order) != list(range(n)):
        raise RunError(f"--agent-order must be a permutation of 0..{n - 1}, got {order}")
    data = to_tensors(arrays, order, args)
    ends = episode_ends(arrays)  # for the critic's diagnostics
    del arrays  # 1M Ant transitions are ~2 GB of arrays; only the tensors are used from here on
    N, _, obs_max = data["obs"].shape
    act_dim = data["act"].shape[-1]
    S = data["critic_state"].shape[1]
    # normalisation constants, the dataset's own: a generated dataset's are its behaviour policies' evaluation
    # returns, a published one's those of its paper or benchmark (None: no normalized score)
    ref = meta.get("normalization")
    if ref is None and meta.get("env_family") == "mamujoco" and meta.get("env_version") == ENV_VERSION:
        ref = reference_returns(args.env_id)  # a generated file made before datasets stored their constants
    if ref is not None and not ref["expert"] > ref["random"]:
        raise RunError(
            f"reference returns of {args.env_id} have expert {ref['expert']} <= random {ref['random']} "
            f"({ref['source']}); the normalized score would be meaningless, retrain the behaviour policies"
        )

    run = start_run(args, t_start, dataset_sha256=meta["sha256"])
    if run.finished is not None:  # killed after its results.json was written: nothing left to do
        return report_finished(run)
    run_dir, t_start = run.dir, run.t_start
    writer = open_writer(args, run_dir)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    data = {k: v.to(device) for k, v in data.items()}
    print(f"data: {source}, {N:,} transitions, {n} agents, order {order}", file=sys.stderr)

    def gen(stage: int):  # each stage has its own RNG stream, so a cached stage 1 leaves stage 2 unchanged
        return torch.Generator(device).manual_seed((args.seed if stage == 3 else args.stage1_seed) * 1000 + stage)

    timing = {}
    stage1 = stage1_fields(args, meta, n, order)

    # ------------------------------------------------------------------ Stage 1a: behaviour models
    mask = prefix_mask(n, args.decomposition).to(device)
    base_dim = data["state"].shape[1] if args.condition == "state" else obs_max
    cond_dim = base_dim + mask.shape[1] * act_dim
    torch.manual_seed(args.stage1_seed * 1000 + 1)
    score_net = ScoreNet(n, act_dim, cond_dim, args.diffusion_hidden, args.diffusion_blocks).to(device)
    fields = diffusion_fields(args, stage1)
    cache = {"diffusion": cache_path(args, "diffusion", fields)}
    path = cache["diffusion"]

    def cond_base(idx):  # (n, B, base_dim)
        if args.condition == "state":
            return data["state"][idx].unsqueeze(0).expand(n, -1, -1)
        return data["obs"][idx].transpose(0, 1)

    cached = run.claim(path, fields, "stage 1a")  # waits while another process trains the same models
    if cached is not None:
        score_net.load_state_dict(cached["model"])
        timing["diffusion"] = {"cached": path}
        print(f"[stage 1a] reusing cached behaviour models {path}", file=sys.stderr)
    else:
        opt = torch.optim.AdamW(score_net.parameters(), lr=args.diffusion_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.diffusion_steps, eta_min=1e-5)
        g, objs = gen(1), {"model": score_net, "opt": opt, "sched": sched}
        if args.diffusion_ema:
            objs["ema"] = ema = copy.deepcopy(score_net).requires_grad_(False)
        start, spent, _ = resume_stage(args, path, fields, "stage 1a", objs, g)
        bar = Progress("stage 1a: diffusion", args.diffusion_steps, start)
        for step in range(start + 1, args.diffusion_steps + 1):
            idx = torch.randint(N, (args.diffusion_batch_size,), generator=g, device=device)
            a0 = data["act"][idx].transpose(0, 1)  # (n, B, act), dataset actions, position order
            loss = diffusion_loss(score_net, a0, condition(cond_base(idx), a0, mask), g, args.diffusion_t_sampling)
            check_finite(loss, "stage 1a (diffusion)", step)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            sched.step()
            if args.diffusion_ema:  # the average of the last ~1/(1 - decay) iterates: less SGD noise in the models
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), score_net.parameters()):
                        p_ema.lerp_(p, 1.0 - args.diffusion_ema)
            if step % 100 == 0 or step == args.diffusion_steps:
                for k in range(n):
                    writer.add_scalar(f"losses/diffusion_position{k}", loss[k].item(), step)
                writer.add_scalar("charts/SPS_diffusion", bar.rate(step), step)
            bar.update(step, f"loss {loss.mean().item():.3f}")
            checkpoint(
                args, path, fields, "stage 1a (diffusion)", objs, g, step, args.diffusion_steps, spent + bar.seconds
            )
        timing["diffusion"] = {
            "seconds": spent + bar.seconds,
            "steps_per_s": args.diffusion_steps / (spent + bar.seconds),
        }
        run.trained("diffusion", timing["diffusion"])
        if args.diffusion_ema:
            score_net.load_state_dict(ema.state_dict())
        run.save_stage(path, {"model": score_net.state_dict(), "fields": json.dumps(fields)})
    score_net.eval().requires_grad_(False)

    # ------------------------------------------------------------------ Stage 1b: centralised IQL critic
    fields = dict(
        stage1,
        stage="critic",
        **{
            k: getattr(args, k)
            for k in (
                "critic_steps",
                "critic_batch_size",
                "critic_hidden",
                "critic_lr",
                "expectile",
                "gamma",
                "polyak",
                "bootstrap_truncation",
            )
        },
    )
    cache["critic"] = path = cache_path(args, "critic", fields)
    torch.manual_seed(args.stage1_seed * 1000 + 2)
    q_net, v_net = TwinQ(S + n * act_dim, args.critic_hidden).to(device), mlp(S, args.critic_hidden, 1).to(device)
    q_target = TwinQ(S + n * act_dim, args.critic_hidden).to(device)
    q_target.load_state_dict(q_net.state_dict())
    cached = run.claim(path, fields, "stage 1b")
    if cached is not None:
        q_net.load_state_dict(cached["q"])
        q_target.load_state_dict(cached["q_target"])
        v_net.load_state_dict(cached["v"])
        timing["critic"] = {"cached": path}
        print(f"[stage 1b] reusing cached critic {path}", file=sys.stderr)
    else:
        q_opt = torch.optim.Adam(q_net.parameters(), lr=args.critic_lr)
        v_opt = torch.optim.Adam(v_net.parameters(), lr=args.critic_lr)
        g, objs = gen(2), {"q": q_net, "q_target": q_target, "v": v_net, "q_opt": q_opt, "v_opt": v_opt}
        start, spent, _ = resume_stage(args, path, fields, "stage 1b", objs, g)
        bar = Progress("stage 1b: IQL critic", args.critic_steps, start)
        joint = data["act"].reshape(N, -1)
        for step in range(start + 1, args.critic_steps + 1):
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
            with torch.no_grad():
                for p, pt in zip(q_net.parameters(), q_target.parameters()):
                    pt.lerp_(p, args.polyak)
            if step % 100 == 0 or step == args.critic_steps:
                writer.add_scalar("losses/q_loss", q_loss.item(), step)
                writer.add_scalar("losses/v_loss", v_loss.item(), step)
                writer.add_scalar("charts/SPS_critic", bar.rate(step), step)
            bar.update(step, f"q {q_loss.item():.3f} v {v_loss.item():.3f}")
            checkpoint(
                args, path, fields, "stage 1b (IQL critic)", objs, g, step, args.critic_steps, spent + bar.seconds
            )
        timing["critic"] = {"seconds": spent + bar.seconds, "steps_per_s": args.critic_steps / (spent + bar.seconds)}
        run.trained("critic", timing["critic"])
        run.save_stage(
            path,
            {
                "q": q_net.state_dict(),
                "q_target": q_target.state_dict(),
                "v": v_net.state_dict(),
                "fields": json.dumps(fields),
            },
        )
    q_target.eval().requires_grad_(False)

    # ------------------------------------------------------------------ Stage 2: score-regularised actors
    torch.manual_seed(args.seed * 1000 + 3)
    actors = Actors(n, obs_max, act_dim, args.actor_hidden).to(device)
    opts = [torch.optim.Adam(actors.nets[k].parameters(), lr=args.actor_lr) for k in range(n)]  # one per agent
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, args.policy_steps, eta_min=0.0) for o in opts]
    g = gen(3)
    objs = {
        "actors": actors,
        **{f"opt{k}": o for k, o in enumerate(opts)},
        **{f"sched{k}": o for k, o in enumerate(scheds)},
    }
    start, spent, extra = resume_stage(args, run.marker, run.fields, "stage 2", objs, g)
    init_record = extra.get("init")
    if args.actor_init == "samples" and start == 0:
        init_record = init_from_samples(actors, score_net, q_target, data, cond_base, mask, args, gen(4))
    bar = Progress("stage 2: actors", args.policy_steps, start)
    norm = {"formula": "100 * (R - R_random) / (R_expert - R_random)", **ref} if ref else None

    eval_seconds = list(extra.get("eval_seconds", []))  # for time-to-score plots
    diagnostics = None  # measured after the last step (--diagnostics)

    def finish(eval_history: list, status: str) -> dict:
        """results.json (and the actors) of a finished or failed run; the run's checkpoints are removed."""
        final = eval_history[-1]["return"]
        for h in eval_history:
            h["normalized_score"] = normalized_score(h["return"], ref)
        failed = [dict(f, policy_step=h["step"]) for h in eval_history for f in h.get("failed_episodes", [])]
        results = {
            "env_id": args.env_id,
            "dataset": args.dataset if not args.dataset_path else None,
            "dataset_path": source,
            "dataset_sha256": meta["sha256"],
            "decomposition": args.decomposition,
            "agent_order": order,
            "beta": args.beta,
            "weighting": args.weighting,
            "seed": args.seed,
            "status": status,
            "final_return": final,
            "final_normalized_score": eval_history[-1]["normalized_score"],
            "normalization": norm,
            "normalization_note": None
            if norm
            else "the dataset's metadata names no reference returns (a generated dataset of an env without a "
            "behaviour checkpoint yet, or published data without known constants)",
            "metric": METRIC,
            "failed_episodes": failed,
            "eval_history": eval_history,
            "eval_seconds": eval_seconds,
            "total_seconds": time.time() - t_start,
            "stages": run.stages_of(timing),
            "stage1_cache": cache,
            "actor_init": init_record,
            "diagnostics": diagnostics,
            "args": asdict(args),
        }
        if args.save_model:
            save_atomic(
                {"actors": actors.state_dict(), "order": torch.tensor(order)}, os.path.join(run_dir, "actors.pt")
            )
        write_json_atomic(results, os.path.join(run_dir, "results.json"))
        writer.close()
        run.close()  # removes the run's checkpoint and marker
        return results

    def run_eval(step: int, eval_history: list) -> list:
        """Evaluate, log, append to eval_history; a failed evaluation ends the run (see --eval-episodes)."""
        ev = evaluate(actors, args, order, obs_max)
        eval_seconds.append(time.time() - t_start)
        entry = {
            "step": step,
            "return": ev["return"],
            "episode_returns": ev["episode_returns"],
            "episode_lengths": ev["episode_lengths"],
        }
        if ev["failed_episodes"]:
            entry["failed_episodes"] = ev["failed_episodes"]
        eval_history.append(entry)
        if ev["failed_episodes"]:
            timing["policy"] = {"seconds": spent + bar.seconds, "failed_at_step": step}
            finish(eval_history, "failed")
            f = ev["failed_episodes"][0]
            raise RunError(
                f"evaluation at policy step {step}: {len(ev['failed_episodes'])} of {args.eval_episodes} "
                f"episodes diverged (first: episode {f['episode']}, env seed {f['env_seed']}, env step "
                f"{f['env_step']}: {f['what']}); no mean return is reported, see "
                f"{run_dir}/results.json"
            )
        writer.add_scalar("eval/episodic_return", ev["return"], step)
        writer.add_scalar("eval/episode_length", float(np.mean(ev["episode_lengths"])), step)
        if ref is not None:
            writer.add_scalar("eval/normalized_score", normalized_score(ev["return"], ref), step)
        return eval_history

    eval_history = extra.get("eval_history") or run_eval(0, [])

    def eps_hat_and_weight(a_prev_source, idx):
        """eps_hat and w(t) of every position's model at the current actions, conditioned on the prefix actions
        taken from a_prev_source (detached)."""
        return noised_eps_hat(score_net, a_prev_source, condition(cond_base(idx), a_prev_source, mask), args, g)

    for step in range(start + 1, args.policy_steps + 1):
        idx = torch.randint(N, (args.policy_batch_size,), generator=g, device=device)
        obs, s = data["obs"][idx].transpose(0, 1), data["critic_state"][idx]
        if args.prefix == "start":
            # Every agent's prefix is the actors' actions at the start of the iteration, so one critic backward
            # gives grad_a Q for every slot and one batched diffusion forward gives every agent's eps_hat.
            a = actors(obs)  # (n, B, act), live
            cur = a.detach()
            grad_q = q_grad(q_target, s, cur)
            if args.regq:
                grad_q = grad_q / grad_q.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-8)
            eps_hat, w = eps_hat_and_weight(cur, idx)
            loss = actor_surrogate(a, eps_hat, grad_q, w, args.beta)  # (n,)
            check_finite(loss, "stage 2 (actors)", step)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.sum().backward()  # agents share no parameters: each actor gets exactly its own gradient
            for o, sc in zip(opts, scheds):
                o.step()
                sc.step()
        else:
            # The paper's text: agent k's prefix comes from the already-updated actors of positions < k.
            with torch.no_grad():
                cur = actors(obs)
            losses = []
            for k in range(n):
                a_k = actors.one(k, obs[k])
                grad_q = q_grad(q_target, s, cur)[k]
                if args.regq:
                    grad_q = grad_q / grad_q.pow(2).mean().sqrt().clamp_min(1e-8)
                eps_hat, w = eps_hat_and_weight(cur, idx)
                loss_k = actor_surrogate(a_k[None], eps_hat[k : k + 1], grad_q[None], w[k : k + 1], args.beta)[0]
                check_finite(loss_k, "stage 2 (actors)", step)
                opts[k].zero_grad(set_to_none=True)
                loss_k.backward()
                opts[k].step()
                scheds[k].step()
                with torch.no_grad():
                    cur[k] = actors.one(k, obs[k])
                losses.append(loss_k.detach())
            loss = torch.stack(losses)
        if step % 100 == 0 or step == args.policy_steps:
            for k in range(n):
                writer.add_scalar(f"losses/actor_position{k}", loss[k].item(), step)
            writer.add_scalar("charts/SPS_policy", bar.rate(step), step)
        if step % args.eval_every == 0 or step == args.policy_steps:
            run_eval(step, eval_history)
        bar.update(step, f"eval return {eval_history[-1]['return']:.1f}")
        checkpoint(
            args,
            run.marker,
            run.fields,
            "stage 2 (actors)",
            objs,
            g,
            step,
            args.policy_steps,
            spent + bar.seconds,
            {"eval_history": eval_history, "eval_seconds": eval_seconds, "init": init_record},
        )
    timing["policy"] = {"seconds": spent + bar.seconds, "steps_per_s": args.policy_steps / (spent + bar.seconds)}

    # ------------------------------------------------------------------ Diagnostics
    if args.diagnostics:
        diagnostics = diagnose(score_net, q_target, actors, data, ends, cond_base, mask, args, order, obs_max)
        for key, v in flat_scalars(diagnostics).items():
            writer.add_scalar(f"diagnostics/{key}", v, args.policy_steps)
        print(f"diagnostics: {json.dumps(diagnostics)}", file=sys.stderr)

    # ------------------------------------------------------------------ Results
    results = finish(eval_history, "ok")
    if args.capture_video:
        results["videos"] = capture_video(actors, args, order, obs_max, os.path.join(run_dir, "videos"))
        write_json_atomic(results, os.path.join(run_dir, "results.json"))
    final = results["final_return"]
    if norm:
        score = (
            f", normalized score {results['final_normalized_score']:.1f} = {norm['formula']} with R_random "
            f"{ref['random']:.1f}, R_expert {ref['expert']:.1f} ({ref['source']})"
        )
    else:
        score = f", no normalized score ({results['normalization_note']})"
    print(f"final return {final:.2f}{score} -> {run_dir}/results.json")
    return results


if __name__ == "__main__":
    run_command(main, cli_args())
