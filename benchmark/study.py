"""Run a study: a named list of oma_sd_mpe.py settings on given datasets and seeds, one results row per run
(return, eval history, diagnostics, times) appended to benchmark/results/<study>.jsonl; then a markdown table.

    python benchmark/study.py --study mode_selection --seeds 0 --shard 0/2 &   # two processes share the grid
    python benchmark/study.py --study mode_selection --seeds 0 --shard 1/2
    python benchmark/study.py --study mode_selection --report
    python benchmark/study.py --diagnostics runs/tables/mode/mpe.jsonl   # diagnostics of a table's rows

A run whose command is already in the results file is skipped (checked again before each run), so an
interrupted study continues where it stopped; stage-1 models are cached and shared between settings.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BIG = "--diffusion-hidden 128 --diffusion-steps 30000"
# study -> (datasets, decompositions, {setting name: flags, or {dataset: flags}})
STUDIES = {
    "mode_selection": (
        ("multimodal-2", "unimodal", "multimodal-3"),
        ("sequential", "independent"),
        {
            "authors' extraction": "--actor-init random --weighting sigma2",
            "+ alpha_over_sigma, z-baseline": "--actor-init random --weighting alpha_over_sigma --z-baseline",
            "+ big behaviour models": f"--actor-init random --weighting sigma2 {BIG}",
            "+ big, alpha_over_sigma, z-baseline": (
                f"--actor-init random --weighting alpha_over_sigma --z-baseline {BIG}"
            ),
            "+ sample init": "--actor-init samples --weighting sigma2",
            "+ big, sample init": f"--actor-init samples --weighting sigma2 {BIG}",
            "+ big, sample init, alpha_over_sigma, z-baseline": (
                f"--actor-init samples --weighting alpha_over_sigma --z-baseline {BIG}"
            ),
            "the same, behaviour models trained 15,000 steps": (
                "--actor-init samples --weighting alpha_over_sigma --z-baseline --diffusion-hidden 128 "
                "--diffusion-steps 15000"
            ),
            "the same, 30,000 steps, 8 noise candidates picked by Q": (
                f"--actor-init samples --weighting alpha_over_sigma --z-baseline {BIG} --init-candidates 8"
            ),
        },
    ),
    "three_conventions": (
        ("multimodal-3",),
        ("sequential", "independent"),
        {"behaviour models trained 30,000 steps": "--diffusion-steps 30000"},
    ),
    # beta per dataset quality, with the MPE defaults (stage 1 cached): the authors' value and smaller ones
    "beta_spread": (
        ("random", "medium-replay", "medium", "mixture"),
        ("sequential",),
        {
            "authors' beta": {
                "random": "--beta 0.5",
                "medium-replay": "--beta 0.05",
                "medium": "--beta 0.02",
                "mixture": "--beta 0.005",
            },
            "beta / 5": {
                "random": "--beta 0.1",
                "medium-replay": "--beta 0.01",
                "medium": "--beta 0.005",
                "mixture": "--beta 0.001",
            },
            "beta / 25": {
                "random": "--beta 0.02",
                "medium-replay": "--beta 0.002",
                "medium": "--beta 0.001",
                "mixture": "--beta 0.0003",
            },
        },
    ),
    # three conventions (mixture: the expert's roles permuted): what changes the joint samples the actors start from
    "mixture_probes": (
        ("mixture",),
        ("sequential",),
        {
            "defaults": "",
            "DDIM 100 steps (beta 0.005, 500 actor steps)": (
                "--beta 0.005 --sample-steps 100 --policy-steps 500 --eval-every 500"
            ),
            "behaviour models conditioned on the state": "--condition state",
            "best of 8 joint samples per state (5,000 states)": (
                "--init-select per_state --init-candidates 8 --init-states 5000"
            ),
            "behaviour models 256 wide": "--diffusion-hidden 256",
            "behaviour models trained on batches of 1024": "--diffusion-batch-size 1024",
        },
    ),
    # the critic-limited random data: ten times the transitions at the same training budget (OMAR's datasets hold
    # 1M), with the chosen beta and weaker ones (stage 1 cached across beta)
    "dataset_size": (
        ("random",),
        ("sequential",),
        {
            "1,000,000 transitions": "--dataset-transitions 1000000",
            "1,000,000 transitions, beta x5": "--dataset-transitions 1000000 --beta 0.1",
            "1,000,000 transitions, authors' beta": "--dataset-transitions 1000000 --beta 0.5",
        },
    ),
    # stage 2's start: behaviour cloning (the dataset's actions) instead of one joint behaviour sample per state
    "actor_init": (
        ("multimodal-3", "mixture", "medium-replay", "multimodal-2"),
        ("sequential",),
        {"start from the dataset's actions": "--actor-init data"},
    ),
    # three conventions: what stage 1a needs to act at the data's level (diagnostics.behaviour.sampler)
    "behaviour_models": (
        ("multimodal-3",),
        ("sequential",),
        {
            "defaults (128 wide, 2 blocks, 15,000 steps, batch 256, lr 3e-4)": "",
            "learning rate 1e-3": "--diffusion-lr 1e-3",
            "4 residual blocks": "--diffusion-blocks 4",
            "batch 1024": "--diffusion-batch-size 1024",
            "60,000 steps": "--diffusion-steps 60000",
            "1,000,000 transitions (40,000 episodes)": "--dataset-transitions 1000000",
            "weight average (EMA 0.999)": "--diffusion-ema 0.999",
            "EDM's noise levels (lognormal)": "--diffusion-t-sampling lognormal",
        },
    ),
}


@dataclass
class Cfg:
    study: str = "mode_selection"
    """a study of STUDIES"""
    seeds: tuple[int, ...] = (0,)
    """training seeds (settings are chosen on seed 0; seeds 1-3 are reported)"""
    datasets: tuple[str, ...] = ()
    """subset of the study's datasets (default: all)"""
    settings: tuple[str, ...] = ()
    """subset of the study's settings, by name (default: all)"""
    decompositions: tuple[str, ...] = ()
    """subset of the study's decompositions (default: all)"""
    shard: str = "0/1"
    """i/k: run every k-th run starting at the i-th, so k processes share a grid"""
    report: bool = False
    """only print the table of what the results file holds"""
    diagnostics: str = ""
    """only print the diagnostics per cell (mean over seeds) of a rows file, e.g. a table.py --out directory's
    mpe.jsonl"""
    sampler: str = ""
    """only evaluate the behaviour models of a rows file's runs (their cached stage 1a) as a joint policy, a fresh
    sample per step (the scripts' sampler_rollout), and print per cell the return against the data's mean"""


def rows_of(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def runs(cfg):
    datasets, decs, settings = STUDIES[cfg.study]
    out = []
    for ds in cfg.datasets or datasets:
        for name, flags in settings.items():
            if isinstance(flags, dict):  # flags per dataset; datasets without an entry do not run this setting
                if ds not in flags:
                    continue
                flags = flags[ds]
            if cfg.settings and name not in cfg.settings:
                continue
            for seed in cfg.seeds:
                for dec in cfg.decompositions or decs:
                    cmd = f"python oma_sd_mpe.py --dataset {ds} --decomposition {dec} --seed {seed} {flags}".rstrip()
                    out.append((name, ds, dec, seed, cmd))
    return out


def main(cfg):
    path = os.path.join(REPO, "benchmark", "results", f"{cfg.study}.jsonl")
    if cfg.diagnostics:
        diagnostics_table(rows_of(cfg.diagnostics))
        return
    if cfg.report:
        report(rows_of(path))
        return
    if cfg.sampler:
        sampler_table(rows_of(cfg.sampler))
        return
    import oma_sd_mpe as om

    os.chdir(REPO)
    i, k = map(int, cfg.shard.split("/"))
    for j, (name, ds, dec, seed, cmd) in enumerate(runs(cfg)):
        if j % k != i or cmd in {r["command"] for r in rows_of(path)}:
            continue
        print(">>", cmd, flush=True)
        res = om.main(om.cli_args(shlex.split(cmd)[2:]))
        row = {
            "command": cmd,
            "setting": name,
            "dataset": ds,
            "decomposition": dec,
            "seed": seed,
            **{
                k: res[k]
                for k in (
                    "beta",
                    "final_return",
                    "final_normalized_score",
                    "eval_history",
                    "total_seconds",
                    "stages",
                    "actor_init",
                    "diagnostics",
                )
            },
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def report(rows):
    """setting x dataset: sequential / independent final return (mean ± std over seeds, ddof=1 when > 1 seed),
    and, where measured, the share of evaluation episodes that end in one of the data's conventions."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["setting"], r["dataset"], r["decomposition"])].append(r)
    datasets = sorted({r["dataset"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    print("| setting | " + " | ".join(f"{d} seq | {d} ind" for d in datasets) + " |")
    print("|---|" + "---|---|" * len(datasets))
    for s in settings:
        out = []
        for d in datasets:
            for dec in ("sequential", "independent"):
                rs = cells.get((s, d, dec), [])
                if not rs:
                    out.append("–")
                    continue
                ret = np.array([r["final_return"] for r in rs])
                agree = [
                    ((r.get("diagnostics") or {}).get("policy") or {})
                    .get("final_assignment", {})
                    .get("in_data_convention")
                    for r in rs
                ]
                agree = [a for a in agree if a is not None]
                txt = f"{ret.mean():.1f}" + (f" ± {ret.std(ddof=1):.1f}" if len(ret) > 1 else "")
                out.append(txt + (f" ({100 * np.mean(agree):.0f} %)" if agree else ""))
        print(f"| {s} | " + " | ".join(out) + " |")


def diagnostics_table(rows):
    """Per (dataset, decomposition), means over seeds: the share of evaluation episodes ending in a data convention,
    the behaviour samples following the data's convention (agents 0/1/2), held-out denoising loss, the critic's
    correlation with Monte-Carlo returns, and the policy's support distance against the data's own."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r.get("quality") or r.get("dataset"), r["decomposition"])].append(r["diagnostics"])
    print(
        "| dataset | decomposition | episodes ending in a data convention | behaviour samples follow the data's "
        "convention (agents 0/1/2) | held-out denoising loss | critic: Pearson r (Q, MC return) | support "
        "distance: policy / data |"
    )
    print("|---|---|---|---|---|---|---|")
    mean = lambda xs: np.mean(np.array(xs, dtype=float), 0)
    for (ds, dec), ds_rows in sorted(cells.items()):
        pol, beh = [d["policy"] for d in ds_rows], [d["behaviour"] for d in ds_rows]
        conv = [p["final_assignment"]["in_data_convention"] for p in pol if "final_assignment" in p]
        follow = [b["samples_follow_data_convention"] for b in beh if "samples_follow_data_convention" in b]
        print(
            f"| {ds} | {dec} | "
            + (f"{100 * mean(conv):.0f} %" if conv else "–")
            + " | "
            + ("/".join(f"{100 * x:.0f} %" for x in mean(follow)) if follow else "–")
            + " | "
            + "/".join(f"{x:.3f}" for x in mean([b["heldout_denoising_loss"] for b in beh]))
            + " | "
            + f"{mean([d['critic']['pearson_r'] for d in ds_rows]):.2f} | "
            + f"{mean([p['support_distance'] for p in pol]):.3f} / "
            + f"{mean([p['support_distance_data'] for p in pol]):.3f} |"
        )


def sampler_table(rows):
    """Per (dataset, decomposition), over the rows' seeds: the return of the behaviour models acting as a joint
    policy in the rows' evaluation episodes (either script's rows), against the data's mean (mean ± std, ddof=1)."""
    import importlib

    import torch

    from envs.mpe import paper_metric
    from omsd_data.dataset import episode_returns
    from omsd_data.mamujoco_data import team_return
    from omsd_data.mpe_data import CONTROLLED
    from omsd_utils.runs import cache_path, load_cached

    os.chdir(REPO)
    torch.set_num_threads(1)
    cells, data_mean, loaded = defaultdict(list), {}, {}
    for r in rows:
        argv = shlex.split(r["command"])
        om = importlib.import_module(os.path.basename(argv[1])[: -len(".py")])
        args = om.resolve_args(om.cli_args(argv[2:]))
        if args.condition != "obs":
            print(f"skipped (--condition state: the sampler sees observations only): {r['command']}", file=sys.stderr)
            continue
        data_key = (args.env_id, args.dataset, args.dataset_path, args.dataset_transitions)
        if data_key not in loaded:  # consecutive rows of a cell share their data: keep the last dataset only
            loaded = {data_key: om.load_data(args)[:2]}
        arrays, meta = loaded[data_key]
        n = sum(1 for k in arrays if k.startswith("obs_"))
        order = list(args.agent_order) or list(range(n))
        obs_max, act_dim = max(arrays[f"obs_{i}"].shape[1] for i in range(n)), arrays["actions_0"].shape[1]
        fields = om.diffusion_fields(args, om.stage1_fields(args, meta, n, order))
        cached = load_cached(cache_path(args, "diffusion", fields), fields)
        if cached is None:
            print(f"skipped (its behaviour models are not in the cache): {r['command']}", file=sys.stderr)
            continue
        mask = om.prefix_mask(n, args.decomposition)
        net = om.ScoreNet(n, act_dim, obs_max + mask.shape[1] * act_dim, args.diffusion_hidden, args.diffusion_blocks)
        net.load_state_dict(cached["model"])
        net.eval().requires_grad_(False)
        if om.__name__ == "oma_sd_mpe":
            K = CONTROLLED[args.dataset][0] if args.dataset in CONTROLLED else 0
            res = om.sampler_rollout(net, mask, act_dim, args, order, obs_max, om.load_prey_arg(args)[0], K)
            metric = lambda rw, env_id=args.env_id: paper_metric(env_id, rw)  # noqa: E731
        else:
            res = om.sampler_rollout(net, mask, act_dim, args, order, obs_max)
            metric = team_return
        ds = (args.env_id, r.get("quality") or r.get("dataset"))
        cells[(*ds, args.decomposition)].append(res)
        data_mean[ds] = float(np.mean(episode_returns(arrays, metric)))
        print(f"{r['command']}: behaviour models' return {res['return']:.1f}", file=sys.stderr, flush=True)
    print(
        "| task | dataset (data mean) | decomposition | behaviour models as a joint policy: return "
        "| episodes ending in a data convention | seeds |"
    )
    print("|---|---|---|---|---|---|")
    for (task, ds, dec), res in sorted(cells.items()):
        ret = np.array([np.nan if x["return"] is None else x["return"] for x in res])  # None: a failed episode
        conv = [x["final_assignment"]["in_data_convention"] for x in res if "final_assignment" in x]
        std = f" ± {ret.std(ddof=1):.1f}" if len(ret) > 1 else ""
        agree = f"{100 * np.mean(conv):.0f} %" if conv else "–"
        print(f"| {task} | {ds} ({data_mean[(task, ds)]:.1f}) | {dec} | {ret.mean():.1f}{std} | {agree} | {len(ret)} |")


if __name__ == "__main__":
    main(tyro.cli(Cfg))
