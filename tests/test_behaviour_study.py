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
    run_script(os.path.join(REPO, "benchmark", "behaviour_study.py"), tmp_path, *study_flags, "--out", str(out),
               "--cache", str(tmp_path / "study_cache"))  # fmt: skip
    script_model = torch.load(
        glob.glob(str(tmp_path / "runs/cache/simple_spread-diffusion-*.pt"))[0], weights_only=True
    )
    study_model = torch.load(glob.glob(str(tmp_path / "study_cache/*.pt"))[0], weights_only=True)
    assert all(torch.equal(script_model["model"][k], v) for k, v in study_model.items())
    row = json.loads(out.read_text())
    assert row["changed"] == {"diffusion_steps": 20, "diffusion_batch_size": 32, "diffusion_hidden": 16, "eta": 1.0}
    assert len(row["heldout_denoising_loss"]) == 3 and len(row["samples_near_a_convention"]) == 3
    for k in ("joint_noise_per_step", "joint_noise_per_episode"):
        assert 0 <= row[k]["final_assignment"]["in_data_convention"] <= 1 and row[k]["return"] > 0  # spread's metric
