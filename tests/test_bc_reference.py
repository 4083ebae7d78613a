"""benchmark/bc_reference.py: behaviour cloning with the scripts' stage-2 settings. On the bandit's two-mode data it
regresses onto the mean of the modes and earns nothing (the failure the sequential conditionals exist to avoid);
on generated MPE data its row normalises with the dataset's own constants and repeats with the same seed; a call
without --family gets one error line and exit 2."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from omsd_data.bandit_data import make_dataset
from omsd_utils.runs import normalized_score
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("bc_reference", os.path.join(REPO, "benchmark", "bc_reference.py"))
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)


def test_bc_of_the_two_mode_bandit_lands_between_the_modes():
    row = bc.run("mpe", ["--env-id", "bandit", "--seed", "1", "--policy-steps", "300", "--eval-every", "100"])
    arrays, _ = make_dataset()
    a = np.concatenate([arrays["actions_0"], arrays["actions_1"]])
    # the least-squares fit of one action to both modes is their mean, at an error of the data's variance
    assert row["mse"] == pytest.approx(a.var(), abs=0.03)
    assert abs(row["final_return"]) < 0.05 < 0.5 < arrays["rewards_0"].mean()  # a1 * a2 of two near-zero actions
    assert [h["step"] for h in row["eval_history"]] == [0, 100, 200, 300]
    assert row["final_normalized_score"] is None  # the bandit has no reference returns


def test_bc_row_on_generated_tag_data(tmp_path, monkeypatch):
    monkeypatch.setenv("OMSD_DATA_DIR", str(tmp_path))
    argv = "--env-id simple_tag --dataset medium --seed 2 --dataset-transitions 250 --actor-hidden 16"
    argv = (argv + " --policy-batch-size 32 --policy-steps 20 --eval-every 10 --eval-episodes 2 --threads 1").split()
    row = bc.run("mpe", argv)
    ref = row["normalization"]
    assert ref["source"] and ref["expert"] > ref["random"]  # the dataset's constants, not the paper's
    assert [h["step"] for h in row["eval_history"]] == [0, 10, 20]
    for h in row["eval_history"]:
        assert h["normalized_score"] == pytest.approx(normalized_score(h["return"], ref))
    assert row["final_return"] == row["eval_history"][-1]["return"]
    assert row["final_paper_normalized_score"] is None  # tag's constants are not within 15 % of the paper's
    again = bc.run("mpe", argv)
    assert again["eval_history"] == row["eval_history"] and again["mse"] == row["mse"]


def test_call_without_family_is_one_error_line():
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmark", "bc_reference.py"), "--env-id", "simple_tag"],
        capture_output=True,
        text=True,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--family mpe|mamujoco" in err[0]
