"""Speed of every training stage of oma_sd_mpe.py, in one run on this machine:

    python benchmark/speed.py                 # about 2 minutes
    python benchmark/speed.py --threads 2 --seconds 5

For simple_spread (3 agents), spread-like shapes with 6 and 9 agents, and HalfCheetah 6x1's shapes, with the
script's default network sizes and batch sizes, it prints
  * steps/s of each stage (diffusion behaviour models, IQL critic, actors with the one-pass surrogate),
  * the achieved GFLOP/s (matmul FLOPs of forward + backward, counted by torch's FlopCounterMode) against the
    matmul peak measured at the start of the same run,
  * all agents batched (what the script does) vs a straightforward loop over per-agent networks, each with
    its own optimiser, and the time per agent per step.
Data are random tensors of the right shapes (speed does not depend on the values); the 6/9-agent spreads use
the observation size an N-agent spread has (4 + 2N + 4(N - 1)), HalfCheetah 6x1 the sizes of mamujoco_v1
(agent_obsk=1: obs 9 or 8, action 1). The networks, losses and optimisers are the script's own.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import oma_sd_mpe as om  # noqa: E402

SHAPES = {  # name: (agents, obs size (padded to the largest), action size)
    "simple_spread (3 agents)": (3, 18, 2),
    "spread, 6 agents": (6, 36, 2),
    "spread, 9 agents": (9, 54, 2),
    "HalfCheetah 6x1": (6, 9, 1),
}


@dataclass
class Cfg:
    threads: int = 1
    """torch threads (the script's default is 1)"""
    seconds: float = 3.0
    """timing budget per measurement"""
    shapes: tuple[str, ...] = tuple(SHAPES)
    """which of the shapes to measure"""


def timed(step, seconds: float) -> tuple[float, float]:
    """(steps/s, FLOPs per step) of a training step function."""
    for _ in range(5):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0), flops


def matmul_peak(seconds: float) -> float:
    """GFLOP/s of a large square fp32 matmul with the current thread count."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    sps, flops = timed(lambda: a @ b, seconds)
    return sps * flops / 1e9


def stages(n: int, obs: int, act: int, a: om.Args, per_agent: bool):
    """Training-step closures of the three stages with the script's modules. per_agent: one network and one
    optimiser per agent, called in a Python loop (the diffusion and actor stages; the critic is joint)."""
    B1, B2, B3 = a.diffusion_batch_size, a.critic_batch_size, a.policy_batch_size
    g = torch.Generator().manual_seed(0)
    mask = om.prefix_mask(n, "sequential")
    cond_dim = obs + mask.shape[1] * act
    a0, base = torch.rand(n, B1, act) * 2 - 1, torch.randn(n, B1, obs)
    nets = (
        [om.ScoreNet(1, act, cond_dim, a.diffusion_hidden, a.diffusion_blocks) for _ in range(n)]
        if per_agent
        else [om.ScoreNet(n, act, cond_dim, a.diffusion_hidden, a.diffusion_blocks)]
    )
    d_opts = [torch.optim.AdamW(m.parameters(), lr=3e-4) for m in nets]
    cond = om.condition(base, a0, mask)

    def diffusion():
        chunks = [(a0[k : k + 1], cond[k : k + 1]) for k in range(n)] if per_agent else [(a0, cond)]
        for m, o, (x, c) in zip(nets, d_opts, chunks):
            loss = om.diffusion_loss(m, x, c, g)
            o.zero_grad(set_to_none=True)
            loss.sum().backward()
            o.step()

    S = n * obs
    q_net, q_target, v_net = (
        om.TwinQ(S + n * act, a.critic_hidden),
        om.TwinQ(S + n * act, a.critic_hidden),
        om.mlp(S, a.critic_hidden, 1),
    )
    q_opt, v_opt = torch.optim.Adam(q_net.parameters()), torch.optim.Adam(v_net.parameters())
    s, joint, r = torch.randn(B2, S), torch.rand(B2, n * act), torch.randn(B2)

    def critic():
        with torch.no_grad():
            q_t = q_target(s, joint).min(0).values
        v_loss = om.expectile_loss(q_t - v_net(s).squeeze(-1), 0.7)
        v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        v_opt.step()
        with torch.no_grad():
            y = r + 0.99 * v_net(s).squeeze(-1)
        q_loss = 0.5 * ((q_net(s, joint) - y) ** 2).mean(1).sum()
        q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        q_opt.step()
        with torch.no_grad():
            for p, pt in zip(q_net.parameters(), q_target.parameters()):
                pt.lerp_(p, 0.005)

    q_target.requires_grad_(False)
    actors = om.Actors(n, obs, act, a.actor_hidden)
    a_opts = [torch.optim.Adam(net.parameters(), lr=3e-4) for net in actors.nets]
    o3, s3 = torch.randn(n, B3, obs), torch.randn(B3, S)

    @torch.no_grad()  # the script freezes the behaviour models: no graph through them
    def eps_hat(m, x, c):
        t = torch.rand(x.shape[0], B3, 1, generator=g) * 0.96 + 0.02
        alpha_t, sigma_t = om.vp_sde(t)
        return m(alpha_t * x + sigma_t * torch.randn(x.shape, generator=g), t, c), sigma_t**2

    def policy():
        if per_agent:  # each agent: its own critic backward and its own diffusion model
            with torch.no_grad():
                cur = actors(o3)
            c = om.condition(o3, cur, mask)
            for k in range(n):
                a_k = actors.one(k, o3[k])
                grad_q = om.q_grad(q_target, s3, cur)[k]
                e, w = eps_hat(nets[k], cur[k : k + 1], c[k : k + 1])
                loss = om.actor_surrogate(a_k[None], e, grad_q[None], w, 0.01)
                a_opts[k].zero_grad(set_to_none=True)
                loss.sum().backward()
                a_opts[k].step()
        else:  # the script's default: one critic backward and one batched diffusion forward serve every agent
            a_all = actors(o3)
            cur = a_all.detach()
            grad_q = om.q_grad(q_target, s3, cur)
            e, w = eps_hat(nets[0], cur, om.condition(o3, cur, mask))
            loss = om.actor_surrogate(a_all, e, grad_q, w, 0.01)
            for o in a_opts:
                o.zero_grad(set_to_none=True)
            loss.sum().backward()
            for o in a_opts:
                o.step()

    return {"diffusion": diffusion, "critic": critic, "policy": policy}


def main(cfg: Cfg):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    a = om.resolve_args(om.Args())  # the script's defaults (MPE)
    peak = matmul_peak(cfg.seconds)
    print(f"torch {torch.__version__}, {cfg.threads} thread(s); matmul peak (1024^3 fp32): {peak:.1f} GFLOP/s")
    print(
        f"networks: diffusion hidden {a.diffusion_hidden} x {a.diffusion_blocks} blocks, batch "
        f"{a.diffusion_batch_size}; critic hidden {a.critic_hidden}, batch {a.critic_batch_size}; actors hidden "
        f"{a.actor_hidden}, batch {a.policy_batch_size}\n"
    )
    print(
        "| shape | stage | batched steps/s | GFLOP/s | % of peak | per-agent loop steps/s | batched speed-up "
        "| batched ms per agent-step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in cfg.shapes:
        n, obs, act = SHAPES[name]
        batched, loop = stages(n, obs, act, a, False), stages(n, obs, act, a, True)
        for stage in ("diffusion", "critic", "policy"):
            sps, flops = timed(batched[stage], cfg.seconds)
            gf = sps * flops / 1e9
            if stage == "critic":  # one joint network: nothing to loop over
                cols = ["–", "–"]
            else:
                sps_loop, _ = timed(loop[stage], cfg.seconds)
                cols = [f"{sps_loop:.0f}", f"{sps / sps_loop:.2f}×"]
            print(
                f"| {name} | {stage} | {sps:.0f} | {gf:.1f} | {100 * gf / peak:.0f} % | {cols[0]} | {cols[1]} | "
                f"{1000 / sps / n:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(tyro.cli(Cfg))
