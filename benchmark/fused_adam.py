"""Fused vs plain AdamW on the MPE diffusion stage (3 stacked agents, hidden 64, batch 256, one thread): blocks of
200 steps, alternating, in one process, so that load from other jobs hits both alike.

    python benchmark/fused_adam.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oma_sd_mpe as om  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
n, B = 3, 256
a0, cond, gen = torch.randn(n, B, 2), torch.randn(n, B, 18 + 4), torch.Generator().manual_seed(0)
rates = {}
for fused in (False, True):
    net = om.ScoreNet(n, 2, 18 + 4, 64, 2)
    rates[fused] = (net, torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.01, fused=fused), [])
for _block in range(6):
    for _fused, (net, opt, out) in rates.items():
        t0 = time.perf_counter()
        for _ in range(200):
            loss = om.diffusion_loss(net, a0, cond, gen).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(200 / (time.perf_counter() - t0))
for fused, (_, _, out) in rates.items():
    print(f"{'fused' if fused else 'plain'} AdamW: steps/s per block {[round(x) for x in out]}")
