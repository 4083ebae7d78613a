"""What the script tests share: running a top-level script in a work directory, reading its results.json,
and the tiny settings of the MPE smoke runs."""

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPE_TINY = (
    "--diffusion-steps 20 --critic-steps 20 --policy-steps 20 --eval-every 10 --eval-episodes 2 "
    "--dataset-transitions 250 --diffusion-hidden 16 --critic-hidden 16 --actor-hidden 16 "
    "--diffusion-batch-size 32 --critic-batch-size 32 --policy-batch-size 32 --threads 1"
).split()
# the MaMuJoCo script's tiny runs: a whole run on 200 random transitions, and a 5-step one for checks of its inputs
MAMUJOCO_TINY = (
    "--diffusion-steps 20 --critic-steps 20 --policy-steps 20 --eval-every 10 --eval-episodes 2 --dataset random "
    "--dataset-transitions 200 --diffusion-hidden 16 --critic-hidden 16 --actor-hidden 16 --diffusion-batch-size 32 "
    "--critic-batch-size 32 --policy-batch-size 32 --sample-steps 2 --threads 1"
).split()
MAMUJOCO_5_STEPS = (
    "--diffusion-steps 5 --critic-steps 5 --policy-steps 5 --eval-every 5 --eval-episodes 1 --diffusion-hidden 16 "
    "--critic-hidden 16 --actor-hidden 16 --threads 1"
).split()


def run_script(script: str, workdir, *args, check: bool = True):
    """`python <script> args` in workdir, datasets under workdir/data; check: assert it succeeded."""
    env = {**os.environ, "OMSD_DATA_DIR": str(workdir / "data"), "PYTHONPATH": REPO}
    r = subprocess.run(
        [sys.executable, script, *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def results_of(workdir, stdout: str) -> dict:
    """The results.json named on a finished run's last line ('... -> runs/<name>/results.json')."""
    with open(workdir / stdout.strip().splitlines()[-1].split("-> ")[-1]) as f:
        return json.load(f)


class ConstQ(torch.nn.Module):
    """A twin critic that gives the value v to every (state, joint action): (2, B)."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, s, a):
        return torch.full((2, len(s)), self.v)


def rejects(run, workdir, *args, creates_run: bool = False) -> str:
    """The one `error:` line of run(workdir, *args, check=False), which must exit 2 without changing anything in
    workdir/runs (creates_run: a run that fails mid-way may add its own new run directory)."""
    root = workdir / "runs"
    files = lambda: {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}  # noqa: E731
    before = files()
    r = run(workdir, *args, check=False)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    after = files()
    assert {k: after.get(k) for k in before} == before  # nothing in runs/ overwritten
    assert creates_run or after == before  # bad input is rejected before anything is written
    return lines[0]


# bad values both scripts refuse at once, with the message's start
BAD_COMMON = [
    (["--beta", "0"], "--beta must be > 0"),
    (["--beta", "-1"], "--beta must be > 0"),
    (["--policy-steps", "0"], "--policy-steps must be a positive integer"),
]
