# OMSD: Offline Multi-agent RL via (Sequential) Score Decomposition (Qiao et al., arXiv 2505.05968),
# on the paper's MPE tasks (OMAR variant) and its 2-agent bandit. Single file, CleanRL style; see docs/omsd.md.
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

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from envs import bandit, render, saved
from envs.dataset import checksum, episode_ends, normalized_score
from envs.mpe import TASKS, MPEEnv, paper_comparison, paper_metric
from envs.mpe_data import (
    CONVENTIONS,
    DEFAULT_TRANSITIONS,
    check_metadata,
    convention_actions,
    ensure_dataset,
    env_spec,
    task_qualities,
)
from envs.runs import (
    Progress,
    RunError,
    cache_path,
    check_args,
    check_dirs,
    check_finite,
    checkpoint,
    open_writer,
    report_finished,
    resume_stage,
    run_command,
    save_atomic,
    start_run,
    write_json_atomic,
)
from envs.sources import check_prey_arg, load_prey_arg, read_dataset, same_prey

ENV_IDS = TASKS + ("bandit",)


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
    env_id: str = "simple_spread"
    """simple_spread | simple_tag | simple_world | bandit (sets the defaults marked 'per --env-id')"""
    dataset: str = "expert"
    """random | medium-replay | medium | expert | mixture, and on simple_spread the controlled unimodal |
    multimodal-2 | multimodal-3 | miscoordinated (made on first use; docs/datasets.md)"""
    dataset_path: str = ""
    """a dataset for this env instead (overrides --dataset): the project's .npz, or a published one (OMAR's
    seed_<k>_data directories, OMIGA hdf5, og-marl vault, MADiff npy; docs/datasets.md)"""
    dataset_format: str = "auto"
    """auto (.npz = the project's format, otherwise detected) | project | omar | omiga | ogmarl | madiff"""
    dataset_seed: int = 0
    """which dataset seed of a published dataset holding several (OMAR's seed_<k>_data, a vault's seed row)"""
    prey: str = "learned"
    """tag/world: the prey of the evaluation episodes: learned (the env's frozen learned prey, the one the
    generated data were collected against) | scripted (the hand-written flee rule of env version omar-mpe2-v1)"""
    prey_path: str = ""
    """tag/world: evaluate against OMAR's pretrained prey instead: a file converted with
    `python -m envs.published --convert-prey ...`, or OMAR's original .pt with --trust-pickle"""
    trust_pickle: bool = False
    """allow unpickling OMAR's original prey .pt (runs any code it contains), converted once into --cache-dir"""
    dataset_transitions: int = DEFAULT_TRANSITIONS
    """size of the generated MPE dataset; the bandit always uses 1,000,000 samples"""

    # The method
    decomposition: str = "sequential"
    """sequential: agent i's behaviour model conditions on the actions of the agents before it (OMSD);
    independent: on its own observation only, i.e. the marginal (the paper's BRPO-CTDE baseline)"""
    agent_order: tuple[int, ...] = ()
    """order of the sequential decomposition, a permutation of 0..n-1 (default: identity)"""
    condition: str = "obs"
    """what the behaviour models condition on besides the prefix actions: obs (own observation) | state"""
    beta: float | None = None
    """weight of grad_a Q in the actor loss w(t) <eps_hat, a> - beta <grad_a Q, a>: a SMALL beta is a STRONG
    behaviour constraint (depends on --env-id and --dataset: BETA_DEFAULTS)"""
    weighting: str | None = None
    """w(t) of the score term: sigma2 (the authors') | one | alpha_over_sigma (depends on --env-id)"""
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
    """use eps_hat - z instead of eps_hat in the actor loss (SRPO's variance reduction; same expected gradient)"""

    # Stage 1a: diffusion behaviour models
    diffusion_steps: int | None = None
    """gradient steps, all agents' models together (depends on --env-id)"""
    diffusion_batch_size: int = 256
    """minibatch size"""
    diffusion_hidden: int | None = None
    """width of the residual trunk (depends on --env-id; the authors: 512)"""
    diffusion_blocks: int = 2
    """residual blocks"""
    diffusion_lr: float = 3e-4
    """AdamW learning rate, cosine-annealed to 1e-5"""
    diffusion_t_sampling: str = "uniform"
    """noise levels of the training loss: uniform, t ~ U(1e-3, 1) | lognormal, EDM's log(sigma_t / alpha_t) ~
    N(-1.2, 1.2^2), most of them where the modes of the actions separate (the held-out loss stays uniform in t)"""
    diffusion_ema: float = 0.0
    """decay of an exponential moving average of the behaviour models' weights, which replaces them after
    stage 1a (0: off, the last iterate is used)"""
    holdout_every: int = 50
    """every k-th episode is left out of the behaviour models' training to measure their fit (0: none)"""

    # Stage 1b: centralised IQL critic
    critic_steps: int | None = None
    """gradient steps (depends on --env-id)"""
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
    team_reward: str = "agent0"
    """team reward used by the critic: agent0 (the authors') | mean (over agents)"""
    bootstrap_truncation: bool = False
    """bootstrap through time-limit ends (default: treat them as terminal, as the authors' code does on MPE)"""

    # Stage 2: actors
    policy_steps: int | None = None
    """gradient steps per agent (depends on --env-id)"""
    policy_batch_size: int = 256
    """minibatch size (one batch of indices shared by all agents)"""
    actor_hidden: int = 256
    """width of the two hidden layers of each actor"""
    actor_lr: float | None = None
    """Adam learning rate, cosine-annealed to 0 (depends on --env-id)"""
    eval_every: int | None = None
    """policy steps between evaluations (depends on --env-id)"""
    eval_episodes: int = 10
    """evaluation episodes (decentralised execution, deterministic actions)"""
    actor_init: str | None = None
    """random (the authors') | samples: first regress the actors onto joint behaviour samples drawn with one noise
    vector for all states, so that they start in one joint mode (depends on --env-id) | data: first regress them
    onto the dataset's actions (behaviour cloning: each state's mean action)"""
    init_steps: int = 2000
    """regression steps of --actor-init samples or data"""
    init_states: int = 20_000
    """--actor-init samples: dataset states (drawn at random) whose behaviour samples the actors are fitted to"""
    init_candidates: int = 1
    """--actor-init samples: joint samples tried (see --init-select)"""
    init_select: str = "shared"
    """--actor-init samples: shared = one noise vector for all states, of --init-candidates the one whose samples
    have the highest mean Q | per_state = --init-candidates joint samples per state, each state's of highest Q kept
    (selection from behaviour samples by the critic, as SfBC and IDQL do)"""
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
    """draw --video-episodes episodes of the final evaluation to runs/<run_name>/videos/episode_<k>.gif (mpe2's
    renderer, headless); uploaded with --track"""
    video_episodes: int = 2
    """episodes of the evaluation drawn by --capture-video (k = 0.., env seed seed + 100 + k)"""
    eval_from: str = ""
    """a finished run's directory: evaluate its actors.pt with its settings (--eval-episodes episodes, drawn with
    --capture-video) into <run>/eval_<E>_episodes.json, training nothing"""


# Per --env-id (docs/results.md: "Multimodal data and mode selection"); the paper's scale is in docs/omsd.md.
# fmt: off
ENV_DEFAULTS = {
    "mpe": dict(diffusion_steps=15_000, diffusion_hidden=128, critic_steps=10_000, policy_steps=5_000, actor_lr=3e-4,
                eval_every=500, weighting="alpha_over_sigma", actor_init="samples"),
    "bandit": dict(diffusion_steps=4000, diffusion_hidden=64, critic_steps=1000, policy_steps=3000, actor_lr=1e-2,
                   eval_every=100, weighting="alpha_over_sigma", actor_init="random", beta=0.05),
}
# beta per --env-id and --dataset. simple_spread: chosen on seed 0 with the MPE defaults above from the authors'
# values and smaller ones (docs/results.md, "beta per dataset"); the controlled datasets are expert-level data and
# get the expert's value. simple_tag / simple_world: the authors' starting values (their run scripts, not tuned).
BETA_DEFAULTS = {
    "simple_spread": {"expert": 0.001, "medium": 0.02, "medium-replay": 0.01, "random": 0.02, "mixture": 0.001,
                      "unimodal": 0.001, "multimodal-2": 0.001, "multimodal-3": 0.001, "miscoordinated": 0.001},
    "simple_tag": {"expert": 0.005, "medium": 0.05, "medium-replay": 0.05, "random": 0.3, "mixture": 0.005},
    "simple_world": {"expert": 0.005, "medium": 0.05, "medium-replay": 0.05, "random": 0.3, "mixture": 0.005},
}
# fmt: on


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
    agents < k. Of --init-candidates noise vectors, the one whose samples have the highest mean Q is used.
    --actor-init data regresses the actors onto the dataset's own actions at the same states instead."""
    t0, device = time.time(), data["obs"].device
    N, n, act_dim = data["act"].shape
    rows = torch.randperm(N, generator=g)[: args.init_states].to(device)
    R, best = len(rows), None
    if args.actor_init == "data":  # behaviour cloning as the start: each state's mean action, no mode chosen
        with torch.no_grad():
            q = q_target(data["critic_state"][rows], data["act"][rows].reshape(R, -1)).mean(0)
        best = (q, None, data["act"][rows].transpose(0, 1))
    for c in range(args.init_candidates if args.actor_init == "samples" else 0):
        shape = (n, 1, act_dim) if args.init_select == "shared" else (n, R, act_dim)
        z = torch.randn(shape, generator=g, device=device).expand(n, R, act_dim)
        target = sample_actions(score_net, cond_base(rows), mask, z, args.sample_steps)
        with torch.no_grad():
            q = q_target(data["critic_state"][rows], target.transpose(0, 1).reshape(R, -1)).mean(0)  # (R,)
        if args.init_select == "shared":
            if best is None or q.mean() > best[0].mean():
                best = (q, c, target)
        elif best is None:
            best = (q, c, target)
        else:  # per state: keep the joint sample of highest Q
            better = q > best[0]
            best = (torch.where(better, q, best[0]), c, torch.where(better[None, :, None], target, best[2]))
    init_loss = fit_actors(
        actors, data["obs"][rows].transpose(0, 1), best[2], args.init_steps, args.policy_batch_size, args.actor_lr, g
    )
    mean_q = best[0].mean().item()
    which = f"candidate {best[1]}" if args.init_select == "shared" else f"best of {args.init_candidates} per state"
    what = "the dataset's actions (" if args.actor_init == "data" else f"behaviour samples ({which}, "
    print(
        f"[stage 2] actors initialised from {what}mean Q {mean_q:.2f}, "
        f"regression loss {init_loss.mean().item():.4f}, {time.time() - t0:.0f} s)",
        file=sys.stderr,
    )
    return {
        "source": args.actor_init,
        "select": args.init_select,
        "candidate": best[1] if args.init_select == "shared" else None,
        "mean_q": mean_q,
        "regression_loss": init_loss.tolist(),
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def stage1_fields(args: Args, meta: dict, n: int, order: list[int]) -> dict:
    """What every stage-1 cache key holds: the data, the agent order, the stage-1 seed and the format version."""
    return {"dataset_sha256": meta["sha256"], "n": n, "order": order, "seed": args.stage1_seed, "version": 2}


def diffusion_fields(args: Args, stage1: dict) -> dict:
    """The settings that key stage 1a's cached behaviour models (with the data and agent order of `stage1`)."""
    return dict(
        stage1,
        stage="diffusion",
        decomposition=args.decomposition,
        condition=args.condition,
        holdout_every=args.holdout_every,
        **{
            k: getattr(args, k)
            for k in ("diffusion_steps", "diffusion_batch_size", "diffusion_hidden", "diffusion_blocks", "diffusion_lr")
        },
        # only when on, so that the cached models trained without them keep their keys
        **({"diffusion_ema": args.diffusion_ema} if args.diffusion_ema else {}),
        **({"diffusion_t_sampling": args.diffusion_t_sampling} if args.diffusion_t_sampling != "uniform" else {}),
    )


def load_data(args: Args) -> tuple[dict, dict, str]:
    """(arrays in the project's format, metadata, source): the bandit's data are made in memory, MPE data from the
    committed behaviour policies (cached under datasets/ or $OMSD_DATA_DIR), or read from --dataset-path."""
    if args.env_id == "bandit":
        spec = {"n_agents": bandit.N_AGENTS, "obs_dims": [bandit.OBS_DIM] * 2, "act_dims": [bandit.ACT_DIM] * 2}
        return read_dataset(args, bandit_data, lambda env_id: spec, published=False)
    return read_dataset(
        args, lambda: ensure_dataset(args.env_id, args.dataset, args.dataset_transitions), env_spec, check_metadata
    )


def bandit_data() -> tuple[dict, dict, str]:
    arrays, meta = bandit.make_dataset()
    meta["sha256"] = checksum(arrays)
    return arrays, meta, "generated in memory"


def holdout_split(arrays: dict, holdout_every: int):
    """(episode of every transition, held-out mask, training rows, held-out rows). Every k-th episode (k =
    --holdout-every, or 50 with 0; the last one of a smaller dataset) is where the behaviour models' fit is
    measured; with k > 0 it is also left out of their training."""
    N = len(arrays["terminals"])
    episode = np.searchsorted(episode_ends(arrays), np.arange(N))
    k = holdout_every or 50
    is_held = (episode % k == k - 1) if episode.max() >= k - 1 else episode == episode.max()
    train_idx = torch.as_tensor(np.flatnonzero(~is_held) if holdout_every else np.arange(N))
    return episode, is_held, train_idx, torch.as_tensor(np.flatnonzero(is_held))


def to_tensors(arrays: dict, order: list[int], args: Args) -> dict:
    """Stack agents in the order of the decomposition: obs (N, n, obs_max) zero-padded, act (N, n, act)."""
    n = len(order)
    obs_dims = [arrays[f"obs_{i}"].shape[1] for i in range(n)]
    act_dims = {arrays[f"actions_{i}"].shape[1] for i in range(n)}
    if len(act_dims) != 1:
        raise RunError(f"agents have different action sizes {sorted(act_dims)}; this script needs equal ones")
    obs_max = max(obs_dims)

    def stack(key):
        return np.stack(
            [np.pad(arrays[f"{key}_{i}"], ((0, 0), (0, obs_max - arrays[f"{key}_{i}"].shape[1]))) for i in order], 1
        )

    rewards = np.stack([arrays[f"rewards_{i}"] for i in range(n)], 1)  # team reward: original agent 0, not position 0
    done = arrays["terminals"] | (arrays["truncations"] & (not args.bootstrap_truncation))
    t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    return {
        "obs": t(stack("obs")),
        "next_obs": t(stack("next_obs")),
        "act": t(np.stack([arrays[f"actions_{i}"] for i in order], 1)),
        "reward": t(rewards[:, 0] if args.team_reward == "agent0" else rewards.mean(1)),
        "done": t(done.astype(np.float32)),
        "state": t(arrays["state"]),
        # the critic's "state" is the concatenation of the agents' own observations (authors' code)
        "critic_state": t(np.concatenate([arrays[f"obs_{i}"] for i in order], 1)),
        "next_critic_state": t(np.concatenate([arrays[f"next_obs_{i}"] for i in order], 1)),
    }


# ---------------------------------------------------------------------------------------------
# Evaluation: decentralised execution, each agent acts on its own observation only
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actors, args: Args, order: list[int], obs_max: int, prey=None, record: list | None = None) -> float:
    """Mean return of --eval-episodes episodes; `record` (a list) receives (obs (n, E, obs), act (n, E, act)) of
    every step, in position order, and the last entry also the observations after the last step."""
    actors.eval()
    if args.env_id == "bandit":
        a = actors(torch.ones(2, 1, bandit.OBS_DIM))[:, 0, 0]
        actors.train()
        return float(bandit.reward(a[0], a[1]))
    envs = [MPEEnv(args.env_id, prey=prey) for _ in range(args.eval_episodes)]
    names = envs[0].possible_agents
    obs = [env.reset(seed=args.seed + 100 + e)[0] for e, env in enumerate(envs)]
    rewards = np.zeros((args.eval_episodes, envs[0].max_cycles, len(names)))
    for t in range(envs[0].max_cycles):
        o = np.stack([[np.pad(ob[names[i]], (0, obs_max - len(ob[names[i]]))) for i in order] for ob in obs], 1)
        act = actors(torch.as_tensor(o, dtype=torch.float32)).numpy()  # (n positions, E, act)
        if record is not None:
            record.append((o.astype(np.float32), act))
        for e, env in enumerate(envs):
            obs[e], r, _, _, _ = env.step({names[i]: act[k, e] for k, i in enumerate(order)})
            rewards[e, t] = [r[a] for a in names]
    if record is not None:  # the observations after the last step too: (obs, act, final obs)
        o = np.stack([[np.pad(ob[names[i]], (0, obs_max - len(ob[names[i]]))) for i in order] for ob in obs], 1)
        record[-1] = (*record[-1], o.astype(np.float32))
    actors.train()
    return float(np.mean([paper_metric(args.env_id, rewards[e]) for e in range(args.eval_episodes)]))


def capture_video(actors, args: Args, order: list[int], obs_max: int, prey, out: str) -> dict:
    """--capture-video: the evaluation of `actors` again, recorded, and GIFs of its first --video-episodes episodes
    in `out` (envs/saved.py checks that each drawn episode is the evaluation's own)."""
    env = MPEEnv(args.env_id, prey=prey)
    E = max(args.eval_episodes, args.video_episodes)
    run_args = Args(**{**asdict(args), "eval_episodes": E})

    def run_eval(rec):
        return {"return": evaluate(rec, run_args, order, obs_max, prey), "episode_lengths": [env.max_cycles] * E}

    def draw(policy, seed, rewards):
        frames = render.mpe_frames(env, policy, seed, rewards=rewards)
        return frames, paper_metric(args.env_id, np.array([[r[a] for a in env.possible_agents] for r in rewards]))

    rec = saved.record_evaluation(
        run_eval, actors, draw, env.possible_agents, args, order, obs_max, out, args.video_episodes, fps=10
    )  # mpe2's render_fps
    rec["eval_episodes"] = E
    if args.track:
        saved.upload_videos(rec["episodes"])
    return rec


def evaluate_saved(args: Args) -> dict:
    """--eval-from RUN: RUN's actors.pt (weights only) evaluated with RUN's settings over --eval-episodes episodes
    (env seeds seed + 100 + k, as its evaluations), drawn with --capture-video; nothing is trained."""
    ev_args, run_args, res = saved.open_saved(args, Args, resolve_args)
    if ev_args.env_id == "bandit":
        raise RunError(f"--eval-from {args.eval_from}: a bandit run; its final actions are in its results.json")
    if res.get("prey") == "scripted" and "prey" not in res["args"]:
        ev_args.prey = "scripted"  # a run of env version omar-mpe2-v1, whose only own prey was the scripted one
    prey, prey_record = load_prey_arg(ev_args)
    if res.get("prey") is not None and not same_prey(prey_record, res["prey"]):
        raise RunError(f"--eval-from {args.eval_from}: the prey {prey_record} is not the run's ({res['prey']})")
    actors, order, obs_max = saved.saved_actors(Actors, MPEEnv(ev_args.env_id, prey=prey), ev_args, res)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    mean = evaluate(actors, ev_args, order, obs_max, prey)
    ref = res.get("normalization")
    norm = normalized_score(mean, ref.get("constants", ref) if ref else None)  # older runs: {"constants": ...}
    videos = None
    if args.capture_video:
        videos = capture_video(actors, ev_args, order, obs_max, prey, os.path.join(args.eval_from, "videos"))
    return saved.write_evaluation(
        ev_args, run_args, res, {"return": mean, "normalized_score": norm}, videos, time.time() - t0
    )


# ---------------------------------------------------------------------------------------------
# Diagnostics: which part limits a score (behaviour models, critic or extraction)
# ---------------------------------------------------------------------------------------------
NEAR = 0.3  # an action follows a convention of the controlled spread data when it lies this close to its action


def convention_table(obs: np.ndarray, order: list[int]) -> np.ndarray:
    """(K, n, B, act): the scripted action of every convention of the controlled spread data (envs/mpe_data.py)
    at observations obs (n, B, obs) in position order; returned in position order too."""
    agents = np.empty_like(obs)
    agents[order] = obs  # position p holds agent order[p]
    return np.stack([convention_actions(agents, np.tile(c, (obs.shape[1], 1)))[order] for c in CONVENTIONS])


def convention_stats(act: np.ndarray, table: np.ndarray) -> dict:
    """How actions (n, B, act) relate to the conventions' actions (K, n, B, act): per position, the share near any
    convention; the share of joint actions with every agent near one and the same convention, overall
    (`joint_in_one`) and per convention (which one was chosen; they can overlap where conventions coincide)."""
    d = np.linalg.norm(act[None] - table, axis=-1)  # (K, n, B)
    joint = (d < NEAR).all(1)  # (K, B)
    return {
        "near_any": (d.min(0) < NEAR).mean(1).tolist(),
        "joint_in_one": float(joint.any(0).mean()),
        "per_convention": joint.mean(1).tolist(),
    }


def assignment_stats(obs_last: np.ndarray, order: list[int], n_conventions: int) -> dict:
    """Which landmark each agent ends the episode nearest to, from the last observations (n, E, obs) in position
    order: the share of episodes ending in each convention, in one of the data's n_conventions, and with the three
    agents at three different landmarks (any assignment without a shared landmark)."""
    agents = np.empty_like(obs_last)
    agents[order] = obs_last
    nearest = np.linalg.norm(agents[..., 4:10].reshape(*agents.shape[:2], 3, 2), axis=-1).argmin(-1)  # (n, E)
    per = [float((nearest == np.array(c)[:, None]).all(0).mean()) for c in CONVENTIONS]
    distinct = float(np.mean([len(set(nearest[:, e])) == nearest.shape[0] for e in range(nearest.shape[1])]))
    return {"per_convention": per, "in_data_convention": float(sum(per[:n_conventions])), "distinct": distinct}


@torch.no_grad()
def behaviour_fit(score_net, data, held, cond_base, mask, args, order, early=None) -> dict:
    """Held-out denoising loss of every position's model, and where DDIM samples given the dataset's prefix land:
    their distance to the dataset action; on controlled data, at the rows `early`, whether they lie near a
    convention's action and whether it is the convention the data's action is nearest to."""
    g = torch.Generator(held.device).manual_seed(12345)

    def given_prefix(rows):  # the dataset actions of `rows` and DDIM samples given the dataset's prefix actions
        a0 = data["act"][rows].transpose(0, 1)
        z = torch.randn(a0.shape, generator=g, device=a0.device)
        return a0, sample_actions(score_net, cond_base(rows), mask, z, args.sample_steps, a_prev=a0)

    idx = held[:2048]
    a0 = data["act"][idx].transpose(0, 1)
    cond = condition(cond_base(idx), a0, mask)
    loss = torch.stack([diffusion_loss(score_net, a0, cond, g) for _ in range(8)]).mean(0)
    a0, samples = given_prefix(idx)
    out = {
        "heldout_denoising_loss": loss.tolist(),
        "sample_to_data_distance": (samples - a0).norm(dim=-1).mean(1).tolist(),
    }
    if early is not None:  # the first steps of the held-out episodes, where the conventions' actions are far apart
        a0, samples = given_prefix(early)
        samples = samples.cpu().numpy()
        table = convention_table(data["obs"][early].transpose(0, 1).cpu().numpy(), order)
        d_s = np.linalg.norm(samples[None] - table, axis=-1)
        d_a = np.linalg.norm(a0.cpu().numpy()[None] - table, axis=-1)
        out["samples_near_a_convention"] = (d_s.min(0) < NEAR).mean(1).tolist()
        out["samples_follow_data_convention"] = (d_s.argmin(0) == d_a.argmin(0)).mean(1).tolist()
    return out


class BehaviourSampler(nn.Module):
    """The joint behaviour policy stage 1a represents, mu(a|s) = prod_k mu_k(a_k | o_k, a_<k), as a policy: a fresh
    DDIM sample per step, agent by agent, each conditioned on the samples of the agents before it (so it is not
    decentralised: it is a diagnostic of the models, not a policy to deploy)."""

    def __init__(self, score_net, mask, act_dim: int, steps: int, gen):
        super().__init__()
        self.score_net, self.mask, self.act_dim, self.steps, self.gen = score_net, mask, act_dim, steps, gen

    def forward(self, obs):  # (n, E, obs) -> (n, E, act)
        z = torch.randn(*obs.shape[:2], self.act_dim, generator=self.gen)
        return sample_actions(self.score_net, obs, self.mask, z, self.steps)


def sampler_rollout(
    score_net, mask, act_dim: int, args: Args, order: list[int], obs_max: int, prey, n_conventions: int
) -> dict:
    """The behaviour models acting in the final evaluation's episodes (BehaviourSampler): if their return is far
    below the data's, stage 1a limits the score before any extraction. On controlled data (n_conventions > 0) also
    which conventions its episodes end in."""
    record = []
    g = torch.Generator().manual_seed(args.seed * 1000 + 5)
    out = {
        "return": evaluate(
            BehaviourSampler(score_net, mask, act_dim, args.sample_steps, g), args, order, obs_max, prey, record
        )
    }
    score_net.eval()  # evaluate() leaves its policy in train mode
    if n_conventions:
        out["final_assignment"] = assignment_stats(record[-1][2], order, n_conventions)
    return out


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
def critic_quality(q_target, data, arrays, gamma: float, n: int = 10_000) -> dict:
    """Q (mean of the two target heads) of dataset actions against their discounted Monte-Carlo returns to the end
    of the episode, on n evenly spaced transitions."""
    r = data["reward"].cpu().numpy().astype(np.float64)
    ends = np.zeros(len(r), bool)
    ends[episode_ends(arrays)] = True
    G = np.zeros_like(r)
    for t in range(len(r) - 1, -1, -1):
        G[t] = r[t] + (0.0 if ends[t] or t == len(r) - 1 else gamma * G[t + 1])
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


def diagnose(score_net, q_target, actors, data, arrays, meta, split, cond_base, mask, args, order, obs_max, prey):
    """Which part limits a score: the behaviour models' fit on held-out episodes, the critic's Q against Monte-Carlo
    returns, and (MPE) the final policy's distance from the data's support; on the controlled spread data also
    which conventions the samples and the policy follow. Rounded for results.json."""
    t0, device = time.time(), data["obs"].device
    episode, is_held, train_idx, held_idx = split
    N = len(episode)
    controlled = bool(meta.get("behaviour", {}).get("conventions")) and args.env_id == "simple_spread"
    step_in_episode = np.arange(N) - np.concatenate([[0], episode_ends(arrays) + 1])[episode]
    early = torch.as_tensor(np.flatnonzero(is_held & (step_in_episode < 5))).to(device) if controlled else None
    diagnostics = {
        "behaviour": behaviour_fit(score_net, data, held_idx.to(device), cond_base, mask, args, order, early),
        "critic": critic_quality(q_target, data, arrays, args.gamma),
    }
    if args.env_id != "bandit":
        record = []
        evaluate(actors, args, order, obs_max, prey, record)  # the same episodes as the final evaluation
        obs_e = np.concatenate([r[0] for r in record], 1)  # (n, T*E, obs), steps of all episodes
        act_e = np.concatenate([r[1] for r in record], 1)
        pool = train_idx.to(device)
        ref = held_idx[torch.linspace(0, len(held_idx) - 1, min(500, len(held_idx))).long()].to(device)
        d_pol = support_distance(
            torch.as_tensor(obs_e).transpose(0, 1).reshape(obs_e.shape[1], -1).to(device),
            torch.as_tensor(act_e).transpose(0, 1).reshape(act_e.shape[1], -1).to(device),
            data["critic_state"][pool],
            data["act"][pool].reshape(len(pool), -1),
        )
        d_ref = support_distance(
            data["critic_state"][ref],
            data["act"][ref].reshape(len(ref), -1),
            data["critic_state"][pool],
            data["act"][pool].reshape(len(pool), -1),
        )
        diagnostics["policy"] = {
            "support_distance": float(d_pol.mean()),
            "support_distance_data": float(d_ref.mean()),
            "ood_share": float((d_pol > np.quantile(d_ref, 0.95)).mean()),
        }
        if controlled:
            E = args.eval_episodes
            diagnostics["policy"]["conventions_first_step"] = convention_stats(
                act_e[:, :E], convention_table(obs_e[:, :E], order)
            )
            diagnostics["policy"]["final_assignment"] = assignment_stats(
                record[-1][2], order, len(meta["behaviour"]["conventions"])
            )
        if args.condition == "obs":  # the sampler sees only observations; the state is not at hand in evaluate
            K = len(meta["behaviour"]["conventions"]) if controlled else 0
            diagnostics["behaviour"]["sampler"] = sampler_rollout(
                score_net, mask, data["act"].shape[-1], args, order, obs_max, prey, K
            )
    diagnostics["seconds"] = time.time() - t0
    return rounded(diagnostics)


# ---------------------------------------------------------------------------------------------
# Settings: the defaults of --env-id / --dataset, and the checks made before anything is written
# ---------------------------------------------------------------------------------------------
def env_defaults(args: Args) -> Args:
    """Fill the settings left at None with the defaults of --env-id (ENV_DEFAULTS) and --dataset (BETA_DEFAULTS)."""
    for k, v in ENV_DEFAULTS["bandit" if args.env_id == "bandit" else "mpe"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.beta is None:
        args.beta = BETA_DEFAULTS.get(args.env_id, {}).get(args.dataset, 0.05)
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
    if args.env_id != "bandit" and not args.dataset_path and args.dataset not in task_qualities(args.env_id):
        raise RunError(
            f"unknown --dataset {args.dataset!r} for {args.env_id}; choose one of "
            f"{', '.join(task_qualities(args.env_id))} or give --dataset-path"
        )
    env_defaults(args)
    if args.stage1_seed is None:
        args.stage1_seed = args.seed
    check_prey_arg(args)
    n_agents = (
        (bandit.N_AGENTS if args.env_id == "bandit" else env_spec(args.env_id)["n_agents"])
        if args.agent_order
        else None
    )
    check_args(
        args,
        {
            "team_reward": ("agent0", "mean"),
            "actor_init": ("random", "samples", "data"),
            "init_select": ("shared", "per_state"),
        },
        ("init_steps", "init_candidates", "init_states", "sample_steps", "video_episodes"),
        n_agents,
    )
    if args.capture_video and args.env_id == "bandit":
        raise RunError("--capture-video: the bandit has no episodes to draw")
    return args


def main(args: Args) -> dict:
    t_start = time.time()  # wall-clock of the whole run: open_run moves it back by earlier processes' time
    args = resolve_args(args)
    if args.eval_from:
        return evaluate_saved(args)
    check_dirs(args)
    prey, prey_record = load_prey_arg(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays, meta, source = load_data(args)
    n = sum(1 for k in arrays if k.startswith("obs_"))
    order = list(args.agent_order) or list(range(n))
    if sorted(order) != list(range(n)):
        raise RunError(f"--agent-order must be a permutation of 0..{n - 1}, got {order}")
    data = to_tensors(arrays, order, args)
    N, _, obs_max = data["obs"].shape
    split = holdout_split(arrays, args.holdout_every)
    train_idx = split[2]
    act_dim = data["act"].shape[-1]
    S = data["critic_state"].shape[1]

    # normalisation constants, the dataset's own: a generated dataset's are its behaviour policies' evaluation
    # returns, OMAR's published data the paper's (None: no normalized score, e.g. the bandit)
    ref = meta.get("normalization")
    # OMAR's prey itself keys the run, not the path it came from
    prey_key = {"prey_sha256": prey_record["source_sha256"]} if args.prey_path else {}
    run = start_run(args, t_start, ("prey_path", "trust_pickle"), dataset_sha256=meta["sha256"], **prey_key)
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
            idx = train_idx[torch.randint(len(train_idx), (args.diffusion_batch_size,), generator=g)].to(device)
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
                "team_reward",
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
    if args.actor_init != "random" and start == 0:
        init_record = init_from_samples(actors, score_net, q_target, data, cond_base, mask, args, gen(4))
    bar = Progress("stage 2: actors", args.policy_steps, start)
    eval_history = extra.get("eval_history") or [{"step": 0, "return": evaluate(actors, args, order, obs_max, prey)}]
    eval_seconds = extra.get("eval_seconds") or [time.time() - t_start]  # for time-to-score plots

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
            ret = evaluate(actors, args, order, obs_max, prey)
            eval_history.append({"step": step, "return": ret})
            eval_seconds.append(time.time() - t_start)
            writer.add_scalar("eval/episodic_return", ret, step)
            if ref is not None:
                writer.add_scalar("eval/normalized_score", normalized_score(ret, ref), step)
        bar.update(step, f"eval return {eval_history[-1]['return']:.2f}")
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
    diagnostics = None
    if args.diagnostics:
        diagnostics = diagnose(
            score_net, q_target, actors, data, arrays, meta, split, cond_base, mask, args, order, obs_max, prey
        )
        for key, v in flat_scalars(diagnostics).items():
            writer.add_scalar(f"diagnostics/{key}", v, args.policy_steps)
        print(f"diagnostics: {json.dumps(diagnostics)}", file=sys.stderr)

    # ------------------------------------------------------------------ Results
    final = eval_history[-1]["return"]
    norm = {"formula": "100 * (R - R_random) / (R_expert - R_random)", **ref} if ref else None
    paper = paper_comparison(args.env_id, ref)  # the paper's constants, where ours are close to them
    for h in eval_history:
        h["normalized_score"] = normalized_score(h["return"], ref)
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
        "prey": prey_record,
        "final_return": final,
        "final_normalized_score": eval_history[-1]["normalized_score"],
        "normalization": norm,
        "final_paper_normalized_score": normalized_score(final, paper),
        "paper_normalization": paper,
        "metric": "simple_spread: per-step mean over agents, summed over 25 steps; tag/world: predator 0's return;"
        " bandit: a1 * a2",
        "eval_history": eval_history,
        "eval_seconds": eval_seconds,
        "total_seconds": time.time() - t_start,
        "stages": run.stages_of(timing),
        "stage1_cache": cache,
        "actor_init": init_record,
        "diagnostics": diagnostics,
        "args": asdict(args),
    }
    if args.env_id == "bandit":
        with torch.no_grad():
            results["final_actions"] = actors(torch.ones(n, 1, bandit.OBS_DIM))[:, 0, 0].tolist()
    if args.save_model:
        save_atomic({"actors": actors.state_dict(), "order": torch.tensor(order)}, os.path.join(run_dir, "actors.pt"))
    write_json_atomic(results, os.path.join(run_dir, "results.json"))
    if args.capture_video:
        results["videos"] = capture_video(actors, args, order, obs_max, prey, os.path.join(run_dir, "videos"))
        write_json_atomic(results, os.path.join(run_dir, "results.json"))
    writer.close()
    run.close()  # removes the run's checkpoint and marker
    score = ""
    if norm:
        score = (
            f", normalized score {results['final_normalized_score']:.1f} with R_random {ref['random']:.1f}, "
            f"R_expert {ref['expert']:.1f} ({ref['source']})"
        )
    if paper and (paper["random"], paper["expert"]) != (ref["random"], ref["expert"]):
        score += f"; {results['final_paper_normalized_score']:.1f} with the paper's constants"
    print(f"final return {final:.2f}{score} -> {run_dir}/results.json")
    return results


if __name__ == "__main__":
    run_command(main, cli_args())
