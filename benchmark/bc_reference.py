"""Behaviour cloning on a cell's data, as a reference point for the OMSD scripts: the same stacked actors, batch,
learning rate and its cosine schedule, number of steps and evaluation as their stage 2, with the stage-2 loss
replaced by plain MSE to the dataset actions. What OMSD adds over imitating its data is the gap between the two.

    python benchmark/bc_reference.py --family mamujoco --env-id HalfCheetah-2x3 --dataset expert --seed 1
    python benchmark/bc_reference.py --family mpe --env-id simple_tag --dataset medium --seed 1
    python benchmark/table.py --family mpe --decompositions bc --out DIR     # a BC row per cell and seed

Every other flag is the family's script's own (`python oma_sd_mpe.py --help`): BC reads the data flags
(--dataset, --dataset-path, ...), --seed, --policy-steps, --policy-batch-size, --actor-hidden, --actor-lr,
--eval-every, --eval-episodes, --threads and, on tag/world, --prey / --prey-path; the rest (β, the behaviour models,
the critic) do not enter BC and are accepted so that a table's --extra can serve both. Prints the evaluation
return at every --eval-every steps and ends with the final one; nothing is written (the table launcher keeps the
row). Not part of OMSD: a baseline.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from omsd_data.dataset import DatasetError  # noqa: E402
from omsd_data.mamujoco_data import normalization  # noqa: E402
from omsd_utils import runs  # noqa: E402
from omsd_utils.runs import RunError, normalized_score  # noqa: E402

SCRIPTS = {"mpe": "oma_sd_mpe", "mamujoco": "oma_sd_mamujoco"}
USAGE = "usage: python benchmark/bc_reference.py --family mpe|mamujoco [flags of that family's script]"


def split_family(argv: list[str]) -> tuple[str, list[str]]:
    """(--family value, the other flags). --family is this script's only own flag; it must come first."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\nBehaviour cloning with the stage-2 settings of the family's script; its flags: "
              f"python oma_sd_mpe.py --help, python oma_sd_mamujoco.py --help")  # fmt: skip
        sys.exit(0)
    if argv[:1] and argv[0].startswith("--family="):
        argv = ["--family", argv[0].split("=", 1)[1], *argv[1:]]
    if len(argv) < 2 or argv[0] != "--family":
        print(f"error: {USAGE}", file=sys.stderr)
        sys.exit(2)
    if argv[1] not in SCRIPTS:
        print(f"error: --family must be mpe or mamujoco, got {argv[1]!r}; {USAGE}", file=sys.stderr)
        sys.exit(2)
    return argv[1], argv[2:]


def run(family: str, argv: list[str]) -> dict:
    """Train and evaluate BC with the family script's settings `argv`; returns the table launcher's row fields."""
    t_start = time.time()
    om = importlib.import_module(SCRIPTS[family])
    args = om.resolve_args(om.cli_args(argv))
    if args.eval_from or args.capture_video:
        raise RunError("behaviour cloning trains and evaluates its own actors: --eval-from and --capture-video are the "
                       "training scripts' (evaluate a BC run's numbers from its row instead)")  # fmt: skip
    runs.set_threads(args.threads)
    if family == "mpe":
        from omsd_data.sources import load_prey_arg

        prey, _ = load_prey_arg(args.env_id, args.prey_path, args.trust_pickle, args.cache_dir)
        evaluate = lambda actors, order, obs_max, E: om.evaluate(actors, args, order, obs_max, prey, episodes=E)  # noqa: E731
    else:

        def evaluate(actors, order, obs_max, E):  # a diverged episode ends the run, as in the script
            ev = om.evaluate(actors, args, order, obs_max, E)
            if ev["failed_episodes"]:
                f = ev["failed_episodes"][0]
                raise RunError(
                    f"BC evaluation: {len(ev['failed_episodes'])} of {E} episodes diverged (first: "
                    f"env seed {f['env_seed']}, env step {f['env_step']}: {f['what']}); no mean return is reported"
                )
            return ev["return"]

    arrays, meta, source = om.load_data(args)
    n = sum(1 for k in arrays if k.startswith("obs_"))
    order = list(range(n))
    data = om.to_tensors(arrays, order, args.bootstrap_truncation)
    del arrays
    obs, act = data["obs"].transpose(0, 1).contiguous(), data["act"].transpose(0, 1).contiguous()  # (n, N, .)
    N, obs_max = obs.shape[1], obs.shape[2]
    ref = meta.get("normalization") if family == "mpe" else normalization(args.env_id, meta)  # as the script's

    torch.manual_seed(args.seed * 1000 + 3)  # the actors' initialisation of the script's stage 2
    actors = om.Actors(n, obs_max, act.shape[-1], args.actor_hidden)
    opt = torch.optim.Adam(actors.parameters(), lr=args.actor_lr, fused=True)  # per parameter, as one Adam per agent is
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.policy_steps, eta_min=0.0)
    g = torch.Generator().manual_seed(args.seed * 1000 + 3)
    periodic = min(args.periodic_eval_episodes, args.eval_episodes)  # the final evaluation has --eval-episodes
    history = [{"step": 0, "return": evaluate(actors, order, obs_max, periodic)}]
    seconds = [time.time() - t_start]
    t0, last = time.time(), []
    for step in range(1, args.policy_steps + 1):
        idx = torch.randint(N, (args.policy_batch_size,), generator=g)
        loss = ((actors(obs[:, idx]) - act[:, idx]) ** 2).sum(-1).mean()  # summed over agents' dims, mean over batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = (last + [loss.item()])[-100:]
        if step % args.eval_every == 0 or step == args.policy_steps:
            E = args.eval_episodes if step == args.policy_steps else periodic
            history.append({"step": step, "return": evaluate(actors, order, obs_max, E)})
            seconds.append(time.time() - t_start)
            print(
                f"[bc] {step}/{args.policy_steps}  mse {loss.item():.4f}  eval return {history[-1]['return']:.2f}  "
                f"{step / (time.time() - t0):.0f} steps/s (evaluations included)",
                file=sys.stderr,
                flush=True,
            )
    for h in history:
        h["normalized_score"] = normalized_score(h["return"], ref)
    final = history[-1]
    norm = {"formula": "100 * (R - R_random) / (R_expert - R_random)", **ref} if ref else None
    paper = om.paper_comparison(args.env_id, ref) if family == "mpe" else None  # as oma_sd_mpe.py's results
    print(
        f"bc on {source}: final return {final['return']:.2f}"
        + (f", normalized score {final['normalized_score']:.1f}" if final["normalized_score"] is not None else "")
    )
    return {
        "beta": None,
        "final_return": final["return"],
        "final_eval_episodes": args.eval_episodes,
        "final_normalized_score": final["normalized_score"],
        "normalization": norm,
        "final_paper_normalized_score": normalized_score(final["return"], paper),
        "eval_history": history,
        "eval_seconds": seconds,
        "total_seconds": time.time() - t_start,
        "stages": {"policy": {"seconds": time.time() - t0, "steps_per_s": args.policy_steps / (time.time() - t0)}},
        "diagnostics": None,
        "mse": sum(last) / len(last),  # the training loss over the last 100 steps: how closely BC fits the data
    }


def main(argv: list[str]):
    """Bad input: one line, exit 2. Ctrl-C / SIGTERM stop at once (BC keeps no checkpoint to stop at)."""
    try:
        run(*split_family(argv))
    except (RunError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
