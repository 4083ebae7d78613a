"""The three-mode study of docs/studies.md: train one variant of oma_sd_mpe.py's stage-1a behaviour models on
simple_spread data and grade them without a critic or actors: the held-out denoising loss per position; where
samples given the data's prefix land (near a convention, in the data's convention; controlled data only); and the
models acting alone as a joint policy over --episodes episodes, with a fresh noise every step (as a run's
diagnostics) and with one noise per episode. Appends one JSON row to --out.

With no variant flags this is the script's stage 1a step for step (the same ScoreNet, seeding, loss, held-out
episodes, AdamW, schedule and bfloat16 autocast) and its DDIM sampler. The trained models are kept under --cache,
keyed by the training settings, so that sampler variants reuse them.

  --diffusion-steps, --diffusion-batch-size, --diffusion-hidden, --diffusion-bf16, --sample-steps: the script's
  --t-power P   training times t = 1e-3 + (1 - 1e-3) u^P, u ~ U(0, 1): P > 1 spends more of the training at small t,
                where alpha_t is large and the modes are apart (P = 1: the script's uniform t)
  --eta E       DDIM's eta (sampler only): 0 the script's deterministic sampler, 1 ancestral sampling
  --select K    the joint policy (sampler only) draws K joint samples per state and acts with the one of highest
                kernel density among them (Gaussian, bandwidth --bandwidth): the state's most common joint mode
                instead of a random one (K = 1: one sample, as the script's diagnostics)
  --shared-draws D  also the joint policy with one noise for every state of every episode (a deterministic policy,
                what the actors' start imitates), for D draws of that noise
  --run-draw    also that policy with the noise the script's start draws for --seed (as `oma_sd_mpe.py
                --init-candidates K` at commit a320a87 with K = --select): the return of the actors' targets

    python benchmark/behaviour_study.py --dataset multimodal-3 --name default
    python benchmark/behaviour_study.py --dataset multimodal-3 --name eta1 --eta 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import oma_sd_mpe as om  # noqa: E402
from omsd_data import mpe_data  # noqa: E402
from omsd_data.dataset import episode_ends  # noqa: E402
from omsd_data.mpe_data import DEFAULT_TRANSITIONS, ensure_dataset  # noqa: E402
from omsd_utils import runs  # noqa: E402
from omsd_utils.diagnostics import behaviour_fit, held_out, rounded  # noqa: E402
from omsd_utils.files import append_row  # noqa: E402

DEFAULTS = dict(seed=0, diffusion_steps=15_000, diffusion_batch_size=256, diffusion_hidden=128, diffusion_bf16=True,
                t_power=1.0, sample_steps=20, eta=0.0, select=1, bandwidth=0.2, shared_draws=0,
                run_draw=False)  # fmt: skip
TRAINING = ("seed", "diffusion_steps", "diffusion_batch_size", "diffusion_hidden", "diffusion_bf16", "t_power")


def diffusion_loss(score_net, a0, cond, gen, t_power: float):
    """The script's noise-prediction loss with t = 1e-3 + (1 - 1e-3) u^t_power (t_power 1: the script's own)."""
    if t_power == 1.0:
        return om.diffusion_loss(score_net, a0, cond, gen)
    u = torch.rand((a0.shape[0], a0.shape[1], 1), generator=gen, device=a0.device)
    t = u**t_power * (1 - 1e-3) + 1e-3
    z = torch.randn(a0.shape, generator=gen, device=a0.device)
    alpha_t, sigma_t = om.vp_sde(t)
    return ((score_net(alpha_t * a0 + sigma_t * z, t, cond) - z) ** 2).sum(-1).mean(-1)


def train(cfg: dict, data: dict, train_idx, mask):
    """The script's stage-1a loop with the variant's t-sampling; returns the behaviour models."""
    n, act_dim, obs_max = data["act"].shape[1], data["act"].shape[2], data["obs"].shape[2]
    torch.manual_seed(cfg["seed"] * 1000 + 1)
    score_net = om.ScoreNet(n, act_dim, obs_max + mask.shape[1] * act_dim, cfg["diffusion_hidden"])
    opt = torch.optim.AdamW(score_net.parameters(), lr=om.DIFFUSION_LR, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["diffusion_steps"], eta_min=1e-5)
    g, bf16 = (
        torch.Generator().manual_seed(cfg["seed"] * 1000 + 1),
        cfg["diffusion_bf16"] and runs.native_bf16(mask.device),
    )
    bar = runs.Progress("stage 1a", cfg["diffusion_steps"])
    for step in range(1, cfg["diffusion_steps"] + 1):
        idx = train_idx[torch.randint(len(train_idx), (cfg["diffusion_batch_size"],), generator=g)]
        a0 = data["act"][idx].transpose(0, 1)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(
                score_net, a0, om.condition(data["obs"][idx].transpose(0, 1), a0, mask), g, cfg["t_power"]
            )
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        bar.update(step, f"loss {loss.mean():.3f}")
    return score_net.eval().requires_grad_(False)


@torch.no_grad()
def sample_actions(score_net, base, mask, z, steps: int, a_prev=None, eta: float = 0.0, xi=None):
    """The script's sample_actions with DDIM's eta: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c xi_i,
    c = eta sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2); xi (passes, steps, n, B, act)."""
    if eta == 0.0:
        return om.sample_actions(score_net, base, mask, z, steps, a_prev)
    n, B, _ = z.shape
    ts = om.logsnr_grid(1.0, 1e-3, steps).to(z.device)
    passes = 1 if a_prev is not None or not mask.any() else n
    xi = torch.randn(passes, steps, *z.shape) if xi is None else xi
    out = torch.zeros_like(z)
    for k in range(passes):
        cond = om.condition(base, out if a_prev is None else a_prev, mask)
        x = z
        for i in range(steps):
            alpha_t, sigma_t = om.vp_sde(ts[i])
            alpha_s, sigma_s = om.vp_sde(ts[i + 1])
            x0 = ((x - sigma_t * score_net(x, ts[i].expand(n, B, 1), cond)) / alpha_t).clamp(-1.0, 1.0)
            eps = (x - alpha_t * x0) / sigma_t
            c = eta * sigma_s / sigma_t * torch.sqrt(1 - (alpha_t / alpha_s) ** 2)  # eta 1: the DDPM posterior's std
            x = alpha_s * x0 + torch.sqrt((sigma_s**2 - c**2).clamp(min=0)) * eps + c * xi[k, i]
        if passes == 1:
            return x0
        out[k] = x0[k]
    return out


def densest(cands, bandwidth: float = 0.2):
    """(n, B, K, act) joint samples -> (n, B, act): per state the one with the largest Gaussian kernel density."""
    n, B, K, act_dim = cands.shape
    joint = cands.permute(1, 2, 0, 3).reshape(B, K, n * act_dim)
    density = torch.exp(-(torch.cdist(joint, joint) ** 2) / (2 * bandwidth**2)).sum(-1)  # (B, K)
    return cands[:, torch.arange(B, device=cands.device), density.argmax(-1)]


class JointSampler(torch.nn.Module):
    """The behaviour models acting alone (agent k's sample given those of agents < k), with noise (z and the
    sampler's) drawn afresh every step ("step"), once per episode at its first step ("episode"), or once for every
    state of every episode ("shared": a deterministic policy, what the actors' start imitates); with --select K, K
    noises per state and the densest sample."""

    def __init__(self, score_net, mask, act_dim: int, cfg: dict, gen, noise: str, z=None):
        super().__init__()
        self.score_net, self.mask, self.act_dim, self.cfg, self.gen = score_net, mask, act_dim, cfg, gen
        self.mode, self.noise = noise, None if z is None else (z[:, None], torch.zeros(0))  # z (n, K, act): given

    def forward(self, obs):  # (n, E, obs) -> (n, E, act)
        n, E, K = *obs.shape[:2], self.cfg["select"]
        if self.mode == "shared":  # one draw of K noises, the same in every state
            if self.noise is None:
                z = torch.randn(n, 1, K, self.act_dim, generator=self.gen)
                xi = torch.randn(n, self.cfg["sample_steps"], n, 1, K, self.act_dim, generator=self.gen)
                self.noise = (z, xi)
            z = self.noise[0].expand(n, E, K, self.act_dim).reshape(n, E * K, self.act_dim)
            xi = None  # (eta 0) or the drawn one, the same in every state
            if self.noise[1].numel():
                xi = self.noise[1].expand(-1, -1, -1, E, -1, -1).reshape(n, self.cfg["sample_steps"], n, E * K, -1)
        else:
            if self.noise is None or self.mode == "step":
                z = torch.randn(n, E * K, self.act_dim, generator=self.gen)
                xi = torch.randn(n, self.cfg["sample_steps"], n, E * K, self.act_dim, generator=self.gen)
                self.noise = (z, xi)
            z, xi = self.noise
        a = sample_actions(self.score_net, obs.repeat_interleave(K, 1), self.mask, z, self.cfg["sample_steps"],
                           eta=self.cfg["eta"], xi=xi)  # fmt: skip
        if K == 1:
            return a
        # K joint samples per state, the densest: the state's most common joint mode instead of a random one
        return densest(a.reshape(n, E, K, self.act_dim), self.cfg["bandwidth"])


def grade(score_net, cfg: dict, data, arrays, meta, mask, episodes: int) -> dict:
    """The behaviour models' fit on the held-out episodes, and their return acting alone."""
    order, ends, N = [0, 1, 2], episode_ends(arrays), len(data["obs"])
    K = len(meta.get("behaviour", {}).get("conventions") or [])
    is_ref = held_out(ends, N)
    rows = torch.as_tensor(np.flatnonzero(is_ref))[:2048]
    step_in_episode = np.arange(N) - np.concatenate([[0], ends + 1])[np.searchsorted(ends, np.arange(N))]
    early = torch.as_tensor(np.flatnonzero(is_ref & (step_in_episode < 5))) if K else None
    sampler = lambda net, base, m, z, steps, a_prev=None: sample_actions(net, base, m, z, steps, a_prev, cfg["eta"])  # noqa: E731
    fns = dict(sample_actions=sampler, diffusion_loss=om.diffusion_loss, condition=om.condition)
    measures = mpe_data.conventions_of(meta)  # with the data's controller
    fit = behaviour_fit(fns, score_net, data, rows, lambda idx: data["obs"][idx].transpose(0, 1), mask,
                        cfg["sample_steps"], order, early, measures if K else None)  # fmt: skip
    out = {"heldout_denoising_loss": fit.pop("denoising_loss"), **fit}
    ev_args = om.Args(env_id="simple_spread", seed=cfg["seed"], eval_episodes=episodes)
    for noise in ("step", "episode"):
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 5)
        policy = JointSampler(score_net, mask, data["act"].shape[-1], cfg, g, noise)
        ret, obs_e, act_e, obs_last = om.evaluate(policy, ev_args, order, data["obs"].shape[2], None, record=True)
        row = {"return": ret}
        if K:
            table = measures.convention_table(obs_e[:, :episodes], order)
            row["first_step"] = measures.convention_stats(act_e[:, :episodes], table)
            row["final_assignment"] = measures.assignment_stats(obs_last, order, K)
        out[f"joint_noise_per_{noise}"] = row
    shared = []  # --shared-draws draws of one noise for all states: how much the draw an actors' start gets matters
    for d in range(cfg["shared_draws"]):
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 6 + d)
        policy = JointSampler(score_net, mask, data["act"].shape[-1], cfg, g, "shared")
        shared.append(om.evaluate(policy, ev_args, order, data["obs"].shape[2], None))
    if shared:
        out["joint_noise_shared"] = {"returns": shared, "mean": float(np.mean(shared))}
    if cfg["run_draw"]:  # the noise the script's start draws (init_from_samples, stage-1 seed --seed): its targets
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 4)
        torch.randperm(N, generator=g)
        z = torch.randn((len(order), cfg["select"], data["act"].shape[-1]), generator=g)
        policy = JointSampler(score_net, mask, data["act"].shape[-1], cfg, None, "shared", z)
        out["joint_noise_of_the_run"] = om.evaluate(policy, ev_args, order, data["obs"].shape[2], None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the variant's label in the rows")
    p.add_argument("--dataset", default="multimodal-3", choices=mpe_data.task_qualities("simple_spread"))
    p.add_argument("--dataset-transitions", type=int, default=DEFAULT_TRANSITIONS)
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(v, bool) else {"type": type(v)}
        p.add_argument(flag, default=v, **kind)
    p.add_argument("--episodes", type=int, default=50, help="episodes of the joint-policy grade")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=os.path.join(REPO, "runs", "cache", "behaviour_study"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmark", "results", "behaviour_study.jsonl"))
    a = p.parse_args(argv)
    runs.set_threads(a.threads)
    torch.manual_seed(a.seed)  # the sampler's noise in the fit's samples
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    arrays, meta, _ = ensure_dataset("simple_spread", a.dataset, a.dataset_transitions)
    data = om.to_tensors(arrays, [0, 1, 2], True)
    mask = om.prefix_mask(3, "sequential")
    train_idx = torch.as_tensor(np.flatnonzero(~held_out(episode_ends(arrays), len(data["obs"]))))
    key = json.dumps({"sha256": meta["sha256"], **{k: cfg[k] for k in TRAINING}}, sort_keys=True)
    path = os.path.join(a.cache, hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
    t0 = time.time()
    if os.path.exists(path):  # a model this tool saved for the same data and training settings
        score_net = om.ScoreNet(3, 2, data["obs"].shape[2] + 2 * 2, cfg["diffusion_hidden"])
        score_net.load_state_dict(torch.load(path, weights_only=True))
        score_net.eval().requires_grad_(False)
    else:
        score_net = train(cfg, data, train_idx, mask)
        os.makedirs(a.cache, exist_ok=True)
        torch.save(score_net.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    seconds = time.time() - t0
    row = {"setting": a.name, "dataset": a.dataset, "changed": {k: v for k, v in cfg.items() if v != DEFAULTS[k]}}
    row.update(rounded(grade(score_net, cfg, data, arrays, meta, mask, a.episodes)))
    row["train_seconds"] = round(seconds, 1)
    append_row(a.out, row)  # two studies may write one file at a time
    print(json.dumps(row))


if __name__ == "__main__":
    main()
