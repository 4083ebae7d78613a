"""oma_sd_mpe.py end to end with tiny settings (CleanRL-style subprocess smoke tests) and its bad-input errors."""

import json
import os

import numpy as np
import pytest

import oma_sd_mpe as om
from envs.mpe import normalized_score as paper_score
from envs.mpe import paper_comparison
from omsd_data import mpe_data
from omsd_utils.runs import normalized_score
from tests.helpers import BAD_COMMON, MPE_TINY, rejects, results_of, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "oma_sd_mpe.py")
TINY = MPE_TINY


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("omsd")


def run(workdir, *args, check=True):
    return run_script(SCRIPT, workdir, *args, check=check)


@pytest.mark.parametrize(
    "env_id,extra",
    [
        ("simple_spread", []),
        ("simple_tag", ["--dataset", "medium"]),
        ("simple_world", ["--dataset", "random"]),
        ("simple_spread", ["--decomposition", "independent", "--dataset", "mixture"]),
        ("simple_tag", ["--agent-order", "2", "0", "1", "--dataset", "medium-replay", "--actor-init", "random"]),
        ("simple_world", ["--weighting", "sigma2", "--no-z-baseline", "--no-bootstrap-truncation", "--gamma", "0.99"]),
    ],
)
def test_smoke_every_task(workdir, env_id, extra):
    r = run(workdir, "--env-id", env_id, *TINY, *extra)
    res = results_of(workdir, r.stdout)
    for k in (
        "env_id",
        "dataset",
        "decomposition",
        "beta",
        "seed",
        "final_return",
        "final_normalized_score",
        "eval_history",
        "stages",
    ):
        assert k in res
    assert res["env_id"] == env_id
    assert [h["step"] for h in res["eval_history"]] == [0, 10, 20]
    secs = res["eval_seconds"]  # wall-clock of each evaluation, for time-to-score plots
    assert len(secs) == 3 and 0 < secs[0] < secs[1] < secs[2] < res["total_seconds"]
    assert np.isfinite(res["final_return"]) and np.isfinite(res["final_normalized_score"])
    # normalised with the generated dataset's reference returns, its behaviour checkpoint's random and expert
    ref = mpe_data.normalization(env_id)
    assert (res["normalization"]["random"], res["normalization"]["expert"]) == (ref["random"], ref["expert"])
    assert res["final_normalized_score"] == pytest.approx(normalized_score(res["final_return"], ref))
    paper = paper_comparison(env_id, ref)  # the paper's number beside ours only where the constants are close
    assert (res["final_paper_normalized_score"] is None) == (paper is None)
    if env_id == "simple_spread":  # ours 169.2 / 548.8 against the paper's 159.8 / 516.8
        assert res["final_paper_normalized_score"] == pytest.approx(paper_score(env_id, res["final_return"]))
    for stage in ("diffusion", "critic", "policy"):
        assert "steps_per_s" in res["stages"][stage] or "cached" in res["stages"][stage]
    run_dir = os.path.dirname(r.stdout.strip().splitlines()[-1].split("-> ")[-1])
    assert os.path.exists(workdir / run_dir / "actors.pt")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / run_dir))


def test_bandit_smoke(workdir):
    r = run(workdir, "--env-id", "bandit", *TINY)
    res = results_of(workdir, r.stdout)
    a1, a2 = res["final_actions"]
    assert res["final_return"] == pytest.approx(a1 * a2, abs=1e-6)
    assert res["final_normalized_score"] is None


def test_cache_reuse_and_determinism(workdir):
    args = ["--env-id", "simple_spread", *TINY, "--seed", "7", "--exp-name", "det"]
    first = results_of(workdir, run(workdir, *args).stdout)
    import time

    time.sleep(1.1)  # a new run directory
    second_run = run(workdir, *args)
    second = results_of(workdir, second_run.stdout)
    assert "reusing cached behaviour models" in second_run.stderr and "reusing cached critic" in second_run.stderr
    assert first["eval_history"] == second["eval_history"]
    assert first["final_return"] == second["final_return"]
    # a beta sweep reuses stage 1 too, and changes the result
    third = results_of(workdir, run(workdir, *args, "--beta", "0.5", "--exp-name", "det2").stdout)
    assert third["stages"]["diffusion"].get("cached") and third["stages"]["critic"].get("cached")
    assert third["eval_history"] != first["eval_history"]
    # the critic's learning rate is part of its cache key: another one trains a new critic on the same models
    fourth = results_of(workdir, run(workdir, *args, "--critic-lr", "3e-4", "--exp-name", "det3").stdout)
    assert fourth["stages"]["diffusion"].get("cached") and not fourth["stages"]["critic"].get("cached")
    assert fourth["diagnostics"]["critic"]["q_mean"] != first["diagnostics"]["critic"]["q_mean"]


def _bad(workdir, *args, creates_run=False):
    return rejects(run, workdir, *args, creates_run=creates_run)


@pytest.mark.parametrize(
    "args,msg",
    BAD_COMMON
    + [
        (["--env-id", "simple_world_comm"], "unknown --env-id"),
        (["--dataset", "best"], "unknown --dataset"),
        (["--diffusion-steps", "-5"], "--diffusion-steps must be a positive integer"),
        (["--decomposition", "joint"], "--decomposition must be one of"),
        (["--agent-order", "0", "0", "1"], "--agent-order must be a permutation"),
        (["--dataset-path", "/nonexistent/x.npz"], "does not exist"),
    ],
)
def test_bad_input(workdir, args, msg):
    assert msg in _bad(workdir, *TINY, *args)


def test_dataset_of_another_env(workdir):
    # make a tiny spread dataset, then give it to simple_tag
    run(workdir, "--env-id", "simple_spread", *TINY)
    path = next((workdir / "data" / "mpe").glob("simple_spread-expert-*.npz"))
    line = _bad(workdir, *TINY, "--env-id", "simple_tag", "--dataset-path", str(path))
    assert "the env needs" in line


def test_dataset_path_takes_the_beta_of_the_quality_the_data_record(workdir):
    """A --dataset-path run without --beta uses the default of the data's recorded quality, not --dataset's, and
    says so; a file with no known quality falls back to --dataset's default, --beta always wins."""
    from omsd_data.dataset import load_dataset, save_dataset

    run(workdir, *TINY, "--dataset", "medium", "--policy-steps", "1", "--no-diagnostics")
    path = next((workdir / "data" / "mpe").glob("simple_spread-medium-*.npz"))
    r = run(workdir, *TINY, "--dataset-path", str(path), "--policy-steps", "1", "--no-diagnostics")
    medium = mpe_data_beta("medium")
    assert f"beta {medium}: the default of medium data" in r.stderr and results_of(workdir, r.stdout)["beta"] == medium
    arrays, meta = load_dataset(str(path))
    unknown = workdir / "unknown_quality.npz"
    save_dataset(str(unknown), arrays, {**{k: v for k, v in meta.items() if k != "sha256"}, "quality": None})
    r = run(workdir, *TINY, "--dataset-path", str(unknown), "--dataset", "random", "--policy-steps", "1",
            "--no-diagnostics")  # fmt: skip
    assert f"beta {mpe_data_beta('random')}: the default of --dataset random" in r.stderr
    r = run(workdir, *TINY, "--dataset-path", str(path), "--beta", "0.3", "--policy-steps", "1", "--no-diagnostics")
    assert "beta 0.3: given" in r.stderr and results_of(workdir, r.stdout)["beta"] == 0.3


def mpe_data_beta(quality: str) -> float:
    import oma_sd_mpe

    return oma_sd_mpe.BETA_DEFAULTS["simple_spread"][quality]


def test_non_finite_data(workdir):
    from omsd_data.dataset import load_dataset

    run(workdir, "--env-id", "simple_spread", *TINY)
    src = next((workdir / "data" / "mpe").glob("simple_spread-expert-*.npz"))
    arrays, meta = load_dataset(str(src))
    arrays["rewards_1"][7] = np.nan
    bad = workdir / "nan.npz"
    np.savez(bad, metadata=np.array(json.dumps(meta)), **arrays)  # bypasses the writer's checks on purpose
    assert "non-finite" in _bad(workdir, *TINY, "--dataset-path", str(bad))


def test_nan_loss_stops_with_stage_and_step(workdir):
    # rewards of 1e30 overflow the critic's squared TD error; a run that fails mid-way keeps its own (new) run
    # directory with the logs so far
    from omsd_data.dataset import load_dataset, save_dataset

    run(workdir, "--env-id", "simple_spread", *TINY)
    arrays, meta = load_dataset(str(next((workdir / "data" / "mpe").glob("simple_spread-expert-*.npz"))))
    for i in range(3):
        arrays[f"rewards_{i}"] = arrays[f"rewards_{i}"] * np.float32(1e30)
    huge = workdir / "huge.npz"
    save_dataset(str(huge), arrays, {k: v for k, v in meta.items() if k != "sha256"})
    line = _bad(workdir, *TINY, "--dataset-path", str(huge), "--critic-steps", "50", creates_run=True)
    assert "stage 1b (IQL critic)" in line and "at step" in line


def test_sample_init_and_diagnostics_on_controlled_data(workdir):
    """--actor-init samples fits the actors to joint behaviour samples before stage 2; the diagnostics of a run on
    controlled data report the behaviour fit, the critic and the policy's conventions."""
    r = run(workdir, *TINY, "--dataset", "multimodal-3", "--actor-init", "samples", "--sample-steps", "4")
    assert "actors start from behaviour samples" in r.stderr
    res = results_of(workdir, r.stdout)
    assert np.isfinite(res["actor_init"]["mean_q"]) and len(res["actor_init"]["regression_loss"]) == 3
    d = res["diagnostics"]
    assert len(d["behaviour"]["heldout_denoising_loss"]) == 3 and len(d["behaviour"]["samples_near_a_convention"]) == 3
    assert set(d["critic"]) == {"q_mean", "mc_return_mean", "abs_error", "pearson_r"}  # scripted data: no truth
    assert d["policy"]["support_distance"] >= 0 and 0 <= d["policy"]["ood_share"] <= 1
    first = d["policy"]["conventions_first_step"]
    assert 0 <= first["joint_in_one"] <= 1 and len(first["per_convention"]) == 3
    end = d["policy"]["final_assignment"]
    assert (
        end["in_data_convention"] == pytest.approx(sum(end["per_convention"]))
        and end["distinct"] >= end["in_data_convention"] - 1e-9
    )  # a convention's assignment has the agents at three different landmarks
    sampler = d["behaviour"]["sampler"]  # the behaviour models as a joint policy, with the conventions they end in
    assert sampler["return"] > 0 and len(sampler["final_assignment"]["per_convention"]) == 3
    # an ordinary quality has no conventions; --no-diagnostics skips them all
    res = results_of(workdir, run(workdir, *TINY, "--dataset", "medium").stdout)
    assert (
        "conventions_first_step" not in res["diagnostics"]["policy"]
        and "samples_near_a_convention" not in res["diagnostics"]["behaviour"]
        and set(res["diagnostics"]["behaviour"]["sampler"]) == {"return"}
    )
    gradient = res["diagnostics"]["critic"]["gradient"]  # one behaviour policy: its Monte-Carlo truth is known
    assert -1 <= gradient["cosine"] <= 1 and gradient["truth"]["M"] == 8 and gradient["truth"]["K"] == 64
    assert results_of(workdir, run(workdir, *TINY, "--no-diagnostics").stdout)["diagnostics"] is None


def test_data_of_three_joint_modes_get_four_times_the_batch_and_a_closer_actor_start():
    """Spread data of three joint modes get stage 1a's batch 1024, the critic's 256 and the actors' start on 100,000
    states for 6000 steps (docs/omsd.md); everything else, a user's own data included, 256, 1024, 20,000 and 2000;
    a flag wins."""
    keys = ("diffusion_batch_size", "critic_batch_size", "init_states", "init_steps")
    get = lambda *argv: tuple(getattr(om.resolve_args(om.cli_args(list(argv))), k) for k in keys)  # noqa: E731
    for q in ("multimodal-3", "multimodal-3-soft", "mixture"):
        assert get("--dataset", q) == (1024, 256, 100_000, 6000) == tuple(om.THREE_MODES_DEFAULTS[k] for k in keys)
    for q in ("expert", "multimodal-2", "unimodal-soft", "miscoordinated"):
        assert get("--dataset", q) == (256, 1024, 20_000, 2000)
    assert get("--env-id", "simple_tag", "--dataset", "mixture") == (256, 1024, 20_000, 2000)
    assert get("--dataset", "mixture", "--dataset-path", "x.npz") == (256, 1024, 20_000, 2000)
    flags = ("--diffusion-batch-size", "64", "--critic-batch-size", "512", "--init-steps", "10")
    assert get("--dataset", "mixture", *flags) == (64, 512, 100_000, 10)
    with pytest.raises(om.RunError, match="--init-states must be a positive integer"):
        om.resolve_args(om.cli_args(["--init-states", "0"]))
