"""The critic study of docs/studies.md: train one variant of oma_sd_mpe.py's stage-1b critic on simple_spread data
(no behaviour models, no stage 2) and grade its action gradient against the Monte-Carlo truth
(omsd_utils/critic_gradient.py). Appends one JSON row to --out. `--env-id HalfCheetah-2x3` (any Multi-agent MuJoCo
configuration) does the same with oma_sd_mamujoco.py's critic (γ 0.99 unless --gamma; its truth covers the first
--truth-steps steps, 10 by default).

With no variant flags this is the script's stage 1b step for step (the same TwinQ and mlp, seeding, IQL losses,
data tensors and Polyak target) at the authors' learning rate 3e-4, the base of the study's rows; `--critic-lr 1e-3`
is the script's default. The script's fused Adam rounds differently, so a run's diagnostics grade its critic within
a few hundredths of this tool's (seed 0, random: 0.362 against 0.355). Each flag changes one thing; the first seven
are the script's own options:

  --gamma, --bootstrap-truncation, --expectile, --critic-steps, --critic-batch-size, --critic-hidden, --critic-lr
  --polyak           the target critic's Polyak rate (the script's POLYAK)
  --standardize      Q's and V's inputs standardised with the data's mean and std (inside the module, so grad_a is
                     still taken in raw action units)
  --layernorm        LayerNorm after each hidden layer of Q and V
  --cql-alpha A      + A E[logsumexp_j Q(s, u_j) - Q(s, a)], u_j ~ U[-1, 1]^(n act), 10 draws (CQL)
  --cfcql-alpha A    CFCQL's counterfactual form: per agent i, u_j = the data's joint action with agent i's action
                     uniform (4 draws); logsumexp per agent, averaged over agents, minus Q(s, a)
  --target-norm      Q = mu + sd * net(s, a) and V = mu + sd * net(s) (om.q_scale: the reward's mean and std over
                     1 - gamma), so that the nets fit targets of unit scale from the first step (the script's
                     --critic-target-norm)
  --fourier F        F random Fourier features of the standardised inputs, [x, sin(2 pi x W), cos(2 pi x W)] with
                     W ~ N(0, fourier_scale^2), in front of Q's and V's first layer (against ReLU's bias to smooth
                     functions; implies --standardize)

    python benchmark/critic_study.py --dataset random --name default
    python benchmark/critic_study.py --dataset random --name authors --gamma 0.99 --no-bootstrap-truncation
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from omsd_data import mamujoco_data, mpe_data  # noqa: E402
from omsd_data.dataset import episode_ends  # noqa: E402
from omsd_utils.critic_gradient import critic_truth, grade  # noqa: E402
from omsd_utils.diagnostics import critic_quality  # noqa: E402
from omsd_utils.files import append_row  # noqa: E402

DEFAULTS = dict(seed=0, gamma=0.95, bootstrap_truncation=True, expectile=0.7, critic_steps=10_000,
                critic_batch_size=256, critic_hidden=256, critic_lr=3e-4, polyak=0.005, standardize=False,
                layernorm=False, cql_alpha=0.0, cfcql_alpha=0.0, target_norm=False, fourier=0,
                fourier_scale=1.0)  # fmt: skip


class TwinQLN(nn.Module):
    """TwinQ with LayerNorm after each hidden layer: two heads, forward -> (2, B)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(ln_mlp(in_dim, hidden, 1) for _ in range(2))

    def forward(self, s, a):
        x = torch.cat([s, a], -1)
        return torch.stack([h(x).squeeze(-1) for h in self.heads])


class TwinQCat(nn.Module):
    """The script's TwinQ's two heads on an already concatenated input: forward(x) -> (2, B)."""

    def __init__(self, twin: nn.Module):
        super().__init__()
        self.twin = twin

    def forward(self, x):
        return self.twin(x, x[:, :0])


def ln_mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.LayerNorm(h), nn.ReLU(), nn.Linear(h, h), nn.LayerNorm(h), nn.ReLU(),
                         nn.Linear(h, o))  # fmt: skip


class Standardized(nn.Module):
    """core((s - mu_s) / sd_s[, (a - mu_a) / sd_a]) with the data's constants as buffers."""

    def __init__(self, core, stats: dict, with_action: bool):
        super().__init__()
        self.core, self.with_action = core, with_action
        for k, v in stats.items():
            self.register_buffer(k, v)

    def forward(self, s, a=None):
        s = (s - self.mu_s) / self.sd_s
        return self.core(s, (a - self.mu_a) / self.sd_a) if self.with_action else self.core(s)


class Fourier(nn.Module):
    """core([x, sin(2 pi x W), cos(2 pi x W)]) for x = cat(s[, a]), W fixed."""

    def __init__(self, core, in_dim: int, features: int, scale: float, seed: int):
        super().__init__()
        self.core = core
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(in_dim, features // 2, generator=g) * scale * 2 * torch.pi)

    def forward(self, s, a=None):
        x = s if a is None else torch.cat([s, a], -1)
        z = x @ self.W
        return self.core(torch.cat([x, z.sin(), z.cos()], -1))


def train(cfg: dict, data: dict, om):
    """The script `om`'s stage-1b loop with the variant's changes; returns the target critic (2, B)."""
    N, n, act_dim = data["act"].shape
    S, A, h = data["critic_state"].shape[1], n * act_dim, cfg["critic_hidden"]
    joint = data["act"].reshape(N, -1)
    torch.manual_seed(cfg["seed"] * 1000 + 2)
    if cfg["fourier"]:
        cfg["standardize"] = True
        F_, sc = cfg["fourier"], cfg["fourier_scale"]
        twin = lambda: Fourier(TwinQCat(om.TwinQ(S + A + F_, h)), S + A, F_, sc, cfg["seed"])  # noqa: E731
        q_net, v_net, q_target = twin(), Fourier(om.mlp(S + F_, h, 1), S, F_, sc, cfg["seed"] + 1), twin()
    elif cfg["layernorm"]:
        q_net, v_net, q_target = TwinQLN(S + A, h), ln_mlp(S, h, 1), TwinQLN(S + A, h)
    else:
        q_net, v_net, q_target = om.TwinQ(S + A, h), om.mlp(S, h, 1), om.TwinQ(S + A, h)
    if cfg["standardize"]:
        cs = data["critic_state"]
        stats = dict(mu_s=cs.mean(0), sd_s=cs.std(0).clamp_min(1e-3), mu_a=joint.mean(0), sd_a=joint.std(0))
        q_net, q_target = Standardized(q_net, stats, True), Standardized(q_target, stats, True)
        v_net = Standardized(v_net, {k: stats[k] for k in ("mu_s", "sd_s")}, False)
    if cfg["target_norm"]:
        mu, sd = om.q_scale(data["reward"], data["done"], cfg["gamma"])  # the script's --critic-target-norm
        q_net, q_target, v_net = om.Scaled(q_net, mu, sd), om.Scaled(q_target, mu, sd), om.Scaled(v_net, mu, sd)
    q_target.load_state_dict(q_net.state_dict())
    q_opt, v_opt = (torch.optim.Adam(m.parameters(), lr=cfg["critic_lr"]) for m in (q_net, v_net))
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 2)
    t0 = time.time()
    for step in range(1, cfg["critic_steps"] + 1):
        idx = torch.randint(N, (cfg["critic_batch_size"],), generator=g)
        s, a, s2 = data["critic_state"][idx], joint[idx], data["next_critic_state"][idx]
        with torch.no_grad():
            q_t = q_target(s, a).min(0).values
        v_loss = om.expectile_loss(q_t - v_net(s).squeeze(-1), cfg["expectile"])
        v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        v_opt.step()
        with torch.no_grad():
            y = data["reward"][idx] + cfg["gamma"] * (1 - data["done"][idx]) * v_net(s2).squeeze(-1)
        q_data = q_net(s, a)
        loss = 0.5 * ((q_data - y) ** 2).mean(1).sum()
        B = len(idx)
        if cfg["cql_alpha"] > 0:  # uniform joint actions
            u = torch.rand(B * 10, A, generator=g) * 2 - 1
            q_u = q_net(s.repeat_interleave(10, 0), u).reshape(2, B, 10)
            loss = loss + cfg["cql_alpha"] * (torch.logsumexp(q_u, -1) - q_data).mean(1).sum()
        if cfg["cfcql_alpha"] > 0:  # one agent's action uniform, the others the data's
            u = a.reshape(B, 1, 1, n, act_dim).repeat(1, n, 4, 1, 1)
            for i in range(n):
                u[:, i, :, i] = torch.rand(B, 4, act_dim, generator=g) * 2 - 1
            q_u = q_net(s.repeat_interleave(n * 4, 0), u.reshape(B * n * 4, A)).reshape(2, B, n, 4)
            loss = loss + cfg["cfcql_alpha"] * (torch.logsumexp(q_u, -1).mean(-1) - q_data).mean(1).sum()
        om.check_finite(loss, "critic", step)
        q_opt.zero_grad(set_to_none=True)
        loss.backward()
        q_opt.step()
        with torch.no_grad():
            for p, pt in zip(q_net.parameters(), q_target.parameters()):
                pt.lerp_(p, cfg["polyak"])
        if step % 2000 == 0:
            print(f"  step {step}: {step / (time.time() - t0):.1f} steps/s", file=sys.stderr, flush=True)
    return q_target.eval().requires_grad_(False), time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the variant's label in the rows")
    p.add_argument("--env-id", default="simple_spread", choices=("simple_spread",) + mamujoco_data.ENV_IDS)
    p.add_argument("--dataset", default="random", choices=("random", "medium", "expert"))
    p.add_argument("--dataset-transitions", type=int, default=None, help="default: the family's (1M MaMuJoCo)")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        kind = {"action": argparse.BooleanOptionalAction, "default": v} if isinstance(v, bool) else {"type": type(v)}
        p.add_argument(flag, **{"default": v, **kind})
    p.set_defaults(gamma=None)  # each script's: 0.95 on simple_spread, 0.99 on MaMuJoCo
    p.add_argument("--truth-steps", type=int, default=10, help="MaMuJoCo: the truth's horizon (steps)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmark", "results", "critic_study.jsonl"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mpe = a.env_id == "simple_spread"
    om = importlib.import_module("oma_sd_mpe" if mpe else "oma_sd_mamujoco")
    source = mpe_data if mpe else mamujoco_data
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    base = {**DEFAULTS, "gamma": DEFAULTS["gamma"] if mpe else 0.99}
    cfg["gamma"] = base["gamma"] if a.gamma is None else a.gamma
    transitions = a.dataset_transitions or source.DEFAULT_TRANSITIONS
    arrays, meta, _ = source.ensure_dataset(a.env_id, a.dataset, transitions)
    order = list(range(sum(k.startswith("obs_") for k in arrays)))
    # the truths first, so that data without one fail before training (a gamma-0.95 spread critic is also graded
    # against the gamma-0.99 truth)
    gammas = sorted({cfg["gamma"], 0.99})
    truths = {g: critic_truth(a.env_id, arrays, meta, g, order, steps=a.truth_steps) for g in gammas}
    if any(t is None for t in truths.values()):
        print(f"error: no Monte-Carlo truth for {a.env_id} {a.dataset}: it needs this code's data of one behaviour"
              " policy (random, medium, expert)", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    data = om.to_tensors(arrays, order, cfg["bootstrap_truncation"])
    q_target, seconds = train(cfg, data, om)
    q_fn = lambda s, act: q_target(s, act).mean(0)  # noqa: E731  (the actors' critic)
    row = {"setting": a.name, "dataset": a.dataset, "changed": {k: v for k, v in cfg.items() if v != base[k]}}
    row = row if mpe else {"env_id": a.env_id, **row}
    if not mpe and a.truth_steps != 10:
        row["truth_steps"] = a.truth_steps
    if transitions != source.DEFAULT_TRANSITIONS:
        row["dataset_transitions"] = transitions
    for gamma, truth in truths.items():
        row[f"gamma{gamma}"] = {k: round(v, 4) for k, v in grade(q_fn, truth).items()}
        row[f"gamma{gamma}"]["truth_split_half"] = round(truth["info"].get("split_half_cosine", float("nan")), 4)
        row[f"gamma{gamma}"]["truth_seconds"] = round(truth["info"].get("seconds", float("nan")), 1)
    row["pearson_r"] = round(critic_quality(q_target, data, episode_ends(arrays), cfg["gamma"])["pearson_r"], 4)
    row["seconds"] = round(seconds, 1)
    append_row(a.out, row)  # two studies may write one file at a time
    print(json.dumps(row))


if __name__ == "__main__":
    main()
