"""benchmark/behaviour_study.py: its stage 1a is the script's bit for bit, its stochastic sampler draws from the
behaviour an exact score describes, and a run appends a graded row."""

import glob
import importlib.util
import json
import os
import sys

import pytest
import torch

import oma_sd_mpe as om
from tests.helpers import REPO, run_script
from tests.test_conventions import GaussianScore

spec = importlib.util.spec_from_file_location("behaviour_study", os.path.join(REPO, "benchmark", "behaviour_study.py"))
study = sys.modules["behaviour_study"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_ddim_draws_the_chain_rule_of_an_exact_gaussian_score(eta):
    """N(0.5, 0.05^2) for position 0, later positions copy its sample: with DDIM's eta the same mean and spread as the
    deterministic sampler (too much or too little injected noise would widen or narrow it)."""
    n, B = 3, 4000
    g = torch.Generator().manual_seed(0)
    z, xi = torch.randn(n, B, 1, generator=g), torch.randn(n, 100, n, B, 1, generator=g)
    a = study.sample_actions(
        GaussianScore(), torch.zeros(n, B, 3), om.prefix_mask(n, "sequential"), z, 100, eta=eta, xi=xi
    )
    assert a[0].mean().item() == pytest.approx(0.5, abs=0.01)
    assert a[0].std().item() == pytest.approx(GaussianScore.s, rel=0.1)
    assert (a[1] - a[0]).abs().mean().item() < 0.06 and (a[2] - a[0]).abs().mean().item() < 0.06
    # eta 0 is the script's own sampler
    mask = om.prefix_mask(n, "sequential")
    assert torch.equal(study.sample_actions(GaussianScore(), torch.zeros(n, 8, 3), mask, z[:, :8], 10),
                       om.sample_actions(GaussianScore(), torch.zeros(n, 8, 3), mask, z[:, :8], 10))  # fmt: skip


def test_a_variant_is_trained_as_the_script_trains_stage_1a_and_graded(tmp_path):
    tiny = ["--diffusion-steps", "20", "--diffusion-batch-size", "32", "--diffusion-hidden", "16", "--seed", "0"]
    flags = ["--dataset", "multimodal-3", "--dataset-transitions", "500", "--threads", "1", *tiny]
    run_script(os.path.join(REPO, "oma_sd_mpe.py"), tmp_path, *flags, "--critic-steps", "2", "--policy-steps", "2",
               "--eval-every", "2", "--eval-episodes", "1", "--actor-init", "random", "--no-diagnostics")  # fmt: skip
    out = tmp_path / "rows.jsonl"
    study_flags = [*flags, "--name", "tiny", "--episodes", "2", "--eta", "1", "--t-power", "1"]
    study_flags += ["--shared-draws", "2", "--run-draw"]
    run_script(os.path.join(REPO, "benchmark", "behaviour_study.py"), tmp_path, *study_flags, "--out", str(out),
               "--cache", str(tmp_path / "study_cache"))  # fmt: skip
    script_model = torch.load(
        glob.glob(str(tmp_path / "runs/cache/simple_spread-diffusion-*.pt"))[0], weights_only=True
    )
    study_model = torch.load(glob.glob(str(tmp_path / "study_cache/*.pt"))[0], weights_only=True)
    assert all(torch.equal(script_model["model"][k], v) for k, v in study_model.items())
    row = json.loads(out.read_text())
    assert row["changed"] == {"diffusion_steps": 20, "diffusion_batch_size": 32, "diffusion_hidden": 16, "eta": 1.0,
                              "shared_draws": 2, "run_draw": True}  # fmt: skip
    assert len(row["heldout_denoising_loss"]) == 3 and len(row["samples_near_a_convention"]) == 3
    for k in ("joint_noise_per_step", "joint_noise_per_episode"):
        assert 0 <= row[k]["final_assignment"]["in_data_convention"] <= 1 and row[k]["return"] > 0  # spread's metric
    shared = row["joint_noise_shared"]
    assert len(shared["returns"]) == 2 and shared["mean"] == pytest.approx(sum(shared["returns"]) / 2)
    assert row["joint_noise_of_the_run"] > 0


def test_select_acts_with_the_states_most_common_joint_mode(monkeypatch):
    """--select K: of K joint samples per state the densest is taken: the majority mode, not a lone sample."""
    n, E, K, act = 3, 2, 5, 2
    modes = torch.tensor([[1.0, 1.0, 1.0, -1.0, 0.0], [1.0, -1.0, -1.0, 1.0, -1.0]])  # (E, K): majority +1, then -1
    draws = modes[:, :, None, None].expand(E, K, n, act) + 0.01 * torch.randn(E, K, n, act)
    fake = lambda net, base, mask, z, steps, eta, xi: draws.permute(2, 0, 1, 3).reshape(n, E * K, act)  # noqa: E731
    monkeypatch.setattr(study, "sample_actions", fake)
    policy = study.JointSampler(None, None, act, dict(study.DEFAULTS, select=K), torch.Generator(), "step")
    a = policy(torch.zeros(n, E, 4))
    assert a.shape == (n, E, act)
    assert (a[:, 0] - 1).abs().max() < 0.05 and (a[:, 1] + 1).abs().max() < 0.05


def test_shared_noise_is_a_deterministic_policy_of_the_state():
    """noise "shared": the same state gives the same action in every episode and at every call; "step" does not."""
    n, E = 3, 4
    mask, obs = om.prefix_mask(n, "sequential"), torch.zeros(n, E, 3)
    shared = study.JointSampler(GaussianScore(), mask, 1, dict(study.DEFAULTS, select=4), torch.Generator(), "shared")
    a, b = shared(obs), shared(obs)
    assert torch.equal(a, b) and torch.equal(a, a[:, :1].expand_as(a))
    step = study.JointSampler(GaussianScore(), mask, 1, dict(study.DEFAULTS), torch.Generator(), "step")
    assert not torch.equal(step(obs), step(obs))
