"""oma_sd_mamujoco.py end to end with tiny settings (CleanRL-style subprocess smoke tests), its bad-input errors,
and evaluation of a diverged simulation."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import oma_sd_mamujoco as om
from envs.mamujoco import ENV_IDS, EPISODE_LEN
from omsd_data import mamujoco_data as md
from omsd_utils import diagnostics, runs
from tests.helpers import BAD_COMMON, MAMUJOCO_TINY, ConstQ, rejects, results_of, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "oma_sd_mamujoco.py")
N_DATA = 200  # transitions of the tiny random datasets (MAMUJOCO_TINY's --dataset-transitions)
TINY = MAMUJOCO_TINY


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("omsd_mamujoco")


def run(workdir, *args, check=True, script=SCRIPT):
    return run_script(script, workdir, *args, check=check)


def check_results(res, env_id, steps, episodes):
    for k in (
        "env_id",
        "dataset",
        "dataset_sha256",
        "decomposition",
        "agent_order",
        "beta",
        "seed",
        "status",
        "final_return",
        "final_normalized_score",
        "normalization",
        "metric",
        "failed_episodes",
        "eval_history",
        "stages",
        "stage1_cache",
        "args",
    ):
        assert k in res
    assert res["env_id"] == env_id and res["dataset"] == "random" and res["status"] == "ok"
    assert res["failed_episodes"] == []
    assert res["beta"] == om.BETA_DEFAULTS["random"]
    assert res["args"]["bootstrap_truncation"] is True  # the MaMuJoCo default
    assert [h["step"] for h in res["eval_history"]] == steps
    secs = res["eval_seconds"]
    assert (
        len(secs) == len(steps) and all(0 < a < b for a, b in zip(secs, secs[1:])) and secs[-1] < res["total_seconds"]
    )
    for h in res["eval_history"]:
        assert len(h["episode_returns"]) == len(h["episode_lengths"]) == episodes
        assert all(1 <= t <= EPISODE_LEN for t in h["episode_lengths"])
        if env_id.startswith("HalfCheetah"):  # never unhealthy: every episode runs to the time limit
            assert h["episode_lengths"] == [EPISODE_LEN] * episodes
        assert h["return"] == pytest.approx(np.mean(h["episode_returns"]))
    assert np.isfinite(res["final_return"]) and res["final_return"] == res["eval_history"][-1]["return"]
    ref = md.reference_returns(env_id)
    if ref is None:  # no behaviour checkpoint yet: no normalized score, and results.json says why
        assert res["final_normalized_score"] is None and res["normalization"] is None and res["normalization_note"]
    else:
        assert res["normalization"]["random"] == ref["random"] and res["normalization"]["expert"] == ref["expert"]
        assert res["final_normalized_score"] == pytest.approx(
            100 * (res["final_return"] - ref["random"]) / (ref["expert"] - ref["random"])
        )
    for stage in ("diffusion", "critic", "policy"):
        assert "steps_per_s" in res["stages"][stage] or "cached" in res["stages"][stage]
    d = res["diagnostics"]
    n = len(res["agent_order"])
    assert len(d["behaviour"]["denoising_loss"]) == n and len(d["behaviour"]["sample_to_data_distance"]) == n
    assert all(np.isfinite(d["behaviour"]["denoising_loss"])) and d["critic"]["mc_return_mean"] != 0
    gradient = d["critic"]["gradient"]  # random data: one behaviour policy, whose Monte-Carlo truth is known
    assert -1 <= gradient["cosine"] <= 1 and (gradient["truth"]["M"], gradient["truth"]["H"]) == (2 * n, 10)
    assert d["policy"]["support_distance"] > 0 and d["policy"]["support_distance_data"] > 0
    assert 0 <= d["policy"]["ood_share"] <= 1
    # the behaviour models as a joint policy, in the final evaluation's episodes (they see observations only)
    assert len(d["behaviour"]["sampler"]["episode_lengths"]) == episodes
    assert np.isfinite(d["behaviour"]["sampler"]["return"])


def test_critic_quality_monte_carlo_returns():
    # two episodes of 3 steps, reward 1 each step, gamma 0.5: returns-to-go 1.75, 1.5, 1 in each
    data = {"reward": torch.ones(6), "act": torch.zeros(6, 1, 1), "critic_state": torch.zeros(6, 1)}
    out = diagnostics.critic_quality(ConstQ(1.5), data, np.array([2, 5]), 0.5)
    assert out["mc_return_mean"] == pytest.approx((1.75 + 1.5 + 1) / 3)
    assert out["q_mean"] == pytest.approx(1.5) and out["abs_error"] == pytest.approx((0.25 + 0 + 0.5) / 3)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_smoke_every_env(workdir, env_id):
    r = run(workdir, "--env-id", env_id, *TINY)
    res = results_of(workdir, r.stdout)
    check_results(res, env_id, [0, 10, 20], 2)
    assert "steps/s" in r.stderr
    run_dir = workdir / os.path.dirname(r.stdout.strip().splitlines()[-1].split("-> ")[-1])
    assert os.path.basename(run_dir).startswith(f"{env_id}__random__oma_sd_mamujoco__sequential__1__")
    assert os.path.exists(run_dir / "actors.pt")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))


@pytest.mark.parametrize(
    "env_id,extra",
    [
        ("Ant-2x4-nocf", ["--decomposition", "independent", "--weighting", "alpha_over_sigma"]),
        (
            "HalfCheetah-6x1",
            ["--agent-order", "5", "3", "1", "0", "2", "4", "--no-z-baseline", "--actor-init", "samples"],
        ),
    ],
)
def test_variants(workdir, env_id, extra):
    r = run(workdir, "--env-id", env_id, *TINY, "--eval-every", "20", "--eval-episodes", "1", *extra)
    res = results_of(workdir, r.stdout)
    check_results(res, env_id, [0, 20], 1)
    if "--decomposition" in extra:
        assert res["decomposition"] == "independent" and "__independent__" in r.stdout
    else:
        assert res["agent_order"] == [5, 3, 1, 0, 2, 4]
        assert res["args"]["z_baseline"] is False
        # the actors were first fitted to joint behaviour samples, one regression loss per agent
        assert "actors start from behaviour samples" in r.stderr
        assert len(res["actor_init"]["regression_loss"]) == 6 and np.isfinite(res["actor_init"]["mean_q"])


def test_resume_after_ctrl_c_gives_the_uninterrupted_result(workdir):
    args = [
        "--env-id",
        "HalfCheetah-2x3",
        *TINY,
        "--policy-steps",
        "40",
        "--checkpoint-every",
        "10",
        "--eval-episodes",
        "1",
        "--exp-name",
        "resume",
    ]
    reference = results_of(workdir, run(workdir, *args, "--cache-dir", "cache_ref").stdout)
    env = {**os.environ, "OMSD_DATA_DIR": str(workdir / "data")}
    p = subprocess.Popen(
        [sys.executable, SCRIPT, *args, "--cache-dir", "cache_int"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while (
        not glob.glob(str(workdir / "cache_int" / "*-run-*.partial.pt")) and p.poll() is None and time.time() < deadline
    ):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "checkpoint saved, run the same command again to continue" in err
    r = run(workdir, *args, "--cache-dir", "cache_int")
    assert "continuing the interrupted run" in r.stderr
    assert 0 < int(r.stderr.split("resuming from step ")[1].split()[0]) < 40
    assert "reusing cached behaviour models" in r.stderr and "reusing cached critic" in r.stderr
    resumed = results_of(workdir, r.stdout)
    assert resumed["eval_history"] == reference["eval_history"]
    secs = resumed["eval_seconds"]  # the run's clock goes on across the two processes
    assert all(a < b for a, b in zip(secs, secs[1:])) and resumed["total_seconds"] > secs[-1]
    for stage in ("diffusion", "critic"):  # trained by the interrupted process of this run: not "cached"
        assert "seconds" in resumed["stages"][stage] and "cached" not in resumed["stages"][stage]


def _bad(workdir, *args):
    return rejects(run, workdir, *args)


@pytest.mark.parametrize(
    "args,msg",
    BAD_COMMON
    + [
        (["--env-id", "Walker-2x3"], "unknown --env-id"),
        (["--dataset", "good"], "unknown --dataset"),
        (["--critic-steps", "0"], "--critic-steps must be a positive integer"),
        (["--agent-order", "0", "0"], "--agent-order must be a permutation"),
    ],
)
def test_bad_input(workdir, args, msg):
    assert msg in _bad(workdir, *TINY, *args)


def test_dataset_of_another_env(workdir):
    path = workdir / "data" / "mamujoco" / os.path.basename(md.default_path("HalfCheetah-6x1", "random", N_DATA))
    line = _bad(workdir, *TINY, "--env-id", "HalfCheetah-2x3", "--dataset-path", str(path))
    assert "the env needs" in line


# ------------------------------------------------------------------------------ a diverged simulation
class Diverging:
    """A real env that diverges at env step `at` of the episodes reset with `seed`: a NaN observation, an
    infinite reward, or a real blow-up (a huge velocity, which MuJoCo detects and resets by itself)."""

    def __init__(self, env, seed, at, what):
        self.env, self.bad_seed, self.at, self.what, self.t, self.seed = env, seed, at, what, 0, None

    def __getattr__(self, k):
        return getattr(self.env, k)

    def reset(self, seed=None, **kw):
        self.seed, self.t = seed, 0
        return self.env.reset(seed=seed, **kw)

    def step(self, actions):
        bad = self.seed == self.bad_seed and self.t + 1 == self.at
        if bad and self.what == "qvel":
            self.env.single_agent_env.unwrapped.data.qvel[:] = 1e200
        obs, rew, term, trunc, info = self.env.step(actions)
        self.t += 1
        if bad:
            if self.what == "obs":
                obs = {**obs, "agent_1": obs["agent_1"] * np.nan}
            elif self.what == "reward":
                rew = {a: np.inf for a in rew}
        return obs, rew, term, trunc, info


def tiny_args(**kw):
    return om.resolve_args(om.Args(**{"env_id": "HalfCheetah-2x3", "eval_episodes": 3, "seed": 1, **kw}))


@pytest.mark.parametrize(
    "what,expect",
    [
        ("obs", "non-finite observation of agent_1"),
        ("reward", "non-finite reward inf"),
        ("qvel", "unstable simulation (MuJoCo warning mjWARN_BADQVEL; MuJoCo reset it)"),
    ],
)
def test_evaluate_records_a_diverged_episode(monkeypatch, tmp_path, what, expect):
    monkeypatch.chdir(tmp_path)  # MUJOCO_LOG.TXT
    real = om.make_env
    monkeypatch.setattr(om, "make_env", lambda env_id: Diverging(real(env_id), seed=102, at=7, what=what))
    torch.manual_seed(0)
    actors = om.Actors(2, 12, 3, 8)
    ev = om.evaluate(actors, tiny_args(), [0, 1], 12)
    assert ev["return"] is None  # never a mean over diverged episodes
    assert ev["failed_episodes"] == [{"episode": 1, "env_seed": 102, "env_step": 7, "what": expect}]
    assert ev["episode_returns"][1] is None and all(np.isfinite(ev["episode_returns"][e]) for e in (0, 2))
    assert ev["episode_lengths"] == [EPISODE_LEN, 7, EPISODE_LEN]  # the others ran to the end


def test_evaluate_non_finite_actions_fail_every_episode(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # MUJOCO_LOG.TXT
    actors = om.Actors(2, 12, 3, 8)
    with torch.no_grad():
        actors.nets[1][4].bias.fill_(float("nan"))
    ev = om.evaluate(actors, tiny_args(eval_episodes=2), [0, 1], 12)
    assert ev["return"] is None
    assert [f["what"] for f in ev["failed_episodes"]] == ["non-finite action of agent_1"] * 2
    assert [f["env_step"] for f in ev["failed_episodes"]] == [1, 1]


def test_stage2_length_defaults_per_env_and_flags_win():
    hc, hop = tiny_args(), tiny_args(env_id="Hopper-3x1")
    assert (hc.policy_steps, hc.eval_every) == (5_000, 1_000)
    assert (hop.policy_steps, hop.eval_every) == (20_000, 2_500)  # Hopper needs the longer stage 2 (docs/studies.md)
    mine = tiny_args(env_id="Hopper-3x1", policy_steps=300, eval_every=100)
    assert (mine.policy_steps, mine.eval_every) == (300, 100)


def test_beta_defaults_per_quality_with_per_task_exceptions_and_the_flag_wins():
    # Hopper's, Ant's and HalfCheetah 6x1's own seed 0 pick another beta on some qualities (docs/results.md)
    assert tiny_args(env_id="Hopper-3x1", dataset="medium-expert").beta == 0.005
    assert tiny_args(env_id="Hopper-3x1", dataset="mixture").beta == 0.0003
    assert tiny_args(env_id="Hopper-3x1", dataset="expert").beta == 0.001
    assert tiny_args(env_id="HalfCheetah-6x1", dataset="mixture").beta == om.BETA_DEFAULTS["mixture"] == 0.001
    assert tiny_args(env_id="HalfCheetah-6x1", dataset="expert").beta == 0.0001
    assert tiny_args(dataset="expert").beta == om.BETA_DEFAULTS["expert"] == 0.0003
    assert tiny_args(env_id="Ant-2x4", dataset="medium").beta == 0.0003
    assert tiny_args(env_id="Ant-2x4", dataset="medium-replay").beta == 0.0003
    assert tiny_args(env_id="Ant-2x4", dataset="medium-expert").beta == 0.001
    assert tiny_args(env_id="Hopper-3x1", dataset="medium").beta == om.BETA_DEFAULTS["medium"] == 0.001
    assert tiny_args(dataset="medium-expert").beta == om.BETA_DEFAULTS["medium-expert"] == 0.001
    assert tiny_args(env_id="Hopper-3x1", dataset="medium-expert", beta=0.02).beta == 0.02


WRAPPER = """
import runpy, sys
import envs.mamujoco as mj
sys.path.insert(0, {tests!r})
from test_oma_sd_mamujoco import Diverging

real, resets = mj.make_env, {{"n": 0}}


class SecondEvaluation(Diverging):  # diverges in the second evaluation only (policy step 10)
    def reset(self, seed=None, **kw):
        resets["n"] += seed == 102
        self.bad_seed = 102 if resets["n"] == 2 else None
        return super().reset(seed=seed, **kw)


mj.make_env = lambda env_id, **kw: SecondEvaluation(real(env_id, **kw), 102, 5, "obs")
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_diverged_evaluation_stops_the_run_and_is_recorded(workdir):
    wrapper = workdir / "diverging.py"
    wrapper.write_text(WRAPPER.format(tests=os.path.dirname(os.path.abspath(__file__)), script=SCRIPT))
    r = run(
        workdir,
        "--env-id",
        "HalfCheetah-2x3",
        *TINY,
        "--exp-name",
        "diverged",
        "--cache-dir",
        "cache_div",
        check=False,
        script=str(wrapper),
    )
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "evaluation at policy step 10" in lines[0] and "diverged" in lines[0], r.stderr[-2000:]
    assert "non-finite observation of agent_1" in lines[0]
    path = lines[0].split("see ")[-1]
    with open(workdir / path) as f:
        res = json.load(f)
    assert res["status"] == "failed" and res["final_return"] is None and res["final_normalized_score"] is None
    assert res["failed_episodes"] == [
        {"episode": 1, "env_seed": 102, "env_step": 5, "policy_step": 10, "what": "non-finite observation of agent_1"}
    ]
    assert [h["step"] for h in res["eval_history"]] == [0, 10]
    assert np.isfinite(res["eval_history"][0]["return"]) and res["eval_history"][1]["return"] is None
    assert not glob.glob(str(workdir / "cache_div" / "*-run-*"))  # the run is over: nothing left to resume


def test_normalized_score():
    ref = {"random": -300.0, "expert": 3700.0, "source": "test"}
    assert runs.normalized_score(-300.0, ref) == 0.0
    assert runs.normalized_score(3700.0, ref) == 100.0
    assert runs.normalized_score(1700.0, ref) == pytest.approx(50.0)
    assert runs.normalized_score(1700.0, None) is None and runs.normalized_score(None, ref) is None
