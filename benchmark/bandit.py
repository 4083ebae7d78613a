"""The paper's 2-agent bandit: sequential (OMSD) vs independent regularisation over 10 seeds at one beta,
and the learned score field against the analytic one of the data mixture.

    python benchmark/bandit.py --beta 0.05
writes benchmark/results/bandit_<weighting>_beta<beta>.json and benchmark/figures/bandit_score_field.png;
`python benchmark/bandit.py --report` prints the table of docs/results.md from all such files.
Stage 1 (behaviour models, critic) is trained once per decomposition (--stage1-seed 0) and shared by the
10 policy seeds, which is what varies the actors' initialisation.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import oma_sd_mpe as om  # noqa: E402
from omsd_data.bandit_data import MODE, MODE_STD  # noqa: E402

SEEDS = (0, 37, 42, 99, 400, 1000, 32987, 50000, 77777, 9000000)  # the authors' bandit seeds


@dataclass
class Cfg:
    beta: float = 0.05
    """beta of both decompositions (authors' convention)"""
    weighting: str = "alpha_over_sigma"
    """w(t) of the actor loss"""
    seeds: tuple[int, ...] = SEEDS
    """policy seeds"""
    diffusion_steps: int = 4000
    critic_steps: int = 1000
    policy_steps: int = 3000
    diffusion_hidden: int = 64
    diffusion_batch_size: int = 512
    actor_hidden: int = 64
    threads: int = 1
    """torch threads (these networks are too small to gain from two)"""
    figure: bool = True
    """also plot the learned score field against the analytic one"""
    report: bool = False
    """only print the markdown table of every benchmark/results/bandit_*.json"""


def analytic_eps(x, t):
    """eps*(x, t) = -sigma_t d/dx log p_t(x) for one agent's marginal (two modes +-0.8, std 0.1; clipping ignored)."""
    alpha_t, sigma_t = om.vp_sde(torch.as_tensor(t, dtype=torch.float64))
    var = alpha_t**2 * MODE_STD**2 + sigma_t**2
    mus = torch.tensor([MODE, -MODE], dtype=torch.float64) * alpha_t
    x = torch.as_tensor(x, dtype=torch.float64)[:, None]
    logw = -((x - mus) ** 2) / (2 * var)
    resp = torch.softmax(logw, 1)
    score = (resp * (mus - x) / var).sum(1)
    return (-sigma_t * score).numpy()


def plot_field(score_net_path: str, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpt = torch.load(score_net_path, map_location="cpu", weights_only=True)
    fields = json.loads(ckpt["fields"])
    net = om.ScoreNet(2, 1, 5 + 1, fields["diffusion_hidden"])
    net.load_state_dict(ckpt["model"])
    net.eval()
    x = np.linspace(-1.5, 1.5, 121)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, t in zip(axes, (0.05, 0.2, 0.5)):
        xt = torch.tensor(x, dtype=torch.float32).view(1, -1, 1).expand(2, -1, -1)
        cond = torch.cat([torch.ones(2, len(x), 5), torch.zeros(2, len(x), 1)], -1)  # position 0: marginal
        with torch.no_grad():
            eps = net(xt, torch.full((2, len(x), 1), t), cond)[0, :, 0].numpy()
        ax.plot(x, analytic_eps(x, t), "k-", label="analytic (data mixture)")
        ax.plot(x, eps, "r--", label="learned, agent 1 marginal")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"t = {t}")
        ax.set_xlabel("noised action x_t")
    axes[0].set_ylabel("eps(x_t, t)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=80)
    print("wrote", out)


def main(cfg: Cfg):
    os.chdir(REPO)
    rows = {}
    for dec in ("sequential", "independent"):
        rows[dec] = []
        for seed in cfg.seeds:
            res = om.main(
                om.Args(
                    env_id="bandit",
                    decomposition=dec,
                    seed=seed,
                    stage1_seed=0,
                    beta=cfg.beta,
                    z_baseline=False,
                    weighting=cfg.weighting,
                    diffusion_steps=cfg.diffusion_steps,
                    critic_steps=cfg.critic_steps,
                    policy_steps=cfg.policy_steps,
                    diffusion_hidden=cfg.diffusion_hidden,
                    diffusion_batch_size=cfg.diffusion_batch_size,
                    actor_hidden=cfg.actor_hidden,
                    threads=cfg.threads,
                    exp_name="bandit_benchmark",
                )
            )
            rows[dec].append({"seed": seed, "reward": res["final_return"], "actions": res["final_actions"]})
            cache = res["stage1_cache"]["diffusion"]
        r = np.array([x["reward"] for x in rows[dec]])
        print(
            f"{dec:12s} beta {cfg.beta}: mean {r.mean():.3f} ± {r.std():.3f}; "
            f"coordinated (> 0.5) {np.sum(r > 0.5)}/{len(r)}, "
            f"miscoordinated (< 0) {np.sum(r < 0)}/{len(r)}; per seed {np.round(r, 3).tolist()}"
        )
        if dec == "independent" and cfg.figure:
            plot_field(cache, os.path.join(REPO, "benchmark", "figures", "bandit_score_field.png"))
    out = os.path.join(REPO, "benchmark", "results", f"bandit_{cfg.weighting}_beta{cfg.beta}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"config": vars(cfg), "runs": rows}, f, indent=1)
    print("wrote", out)


def report():
    rows = [
        "| w(t) | β | sequential: mean ± std | coordinated (> 0.5) | independent: mean ± std | miscoordinated (< 0) "
        "| per-seed rewards, sequential / independent |",
        "|---|---|---|---|---|---|---|",
    ]
    results_dir = os.path.join(REPO, "benchmark", "results")
    found = []
    for name in os.listdir(results_dir):
        if name.startswith("bandit_") and name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                found.append(json.load(f))
    for res in sorted(found, key=lambda r: (r["config"]["weighting"], r["config"]["beta"])):
        seq = np.array([x["reward"] for x in res["runs"]["sequential"]])
        ind = np.array([x["reward"] for x in res["runs"]["independent"]])
        rows.append(
            f"| {res['config']['weighting']} | {res['config']['beta']} | {seq.mean():.3f} ± {seq.std():.3f} | "
            f"{np.sum(seq > 0.5)}/{len(seq)} | {ind.mean():.3f} ± {ind.std():.3f} | {np.sum(ind < 0)}/{len(ind)} | "
            f"{' '.join(f'{x:.2f}' for x in seq)} / {' '.join(f'{x:.2f}' for x in ind)} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    cfg = tyro.cli(Cfg)
    report() if cfg.report else main(cfg)
