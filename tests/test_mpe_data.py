"""Dataset generation from the committed behaviour policies: every task x quality, determinism, concurrency."""

import os
import subprocess
import sys

import numpy as np
import pytest

from envs.mpe import TASKS
from omsd_data import mpe_data
from omsd_data.dataset import load_dataset, save_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("quality", mpe_data.QUALITIES)
def test_every_task_and_quality(tmp_path, task, quality):
    arrays, meta = mpe_data.generate(task, quality, 250, workers=1, verbose=False)
    path = str(tmp_path / "d.npz")
    save_dataset(path, arrays, meta)
    b, m = load_dataset(path, expect=mpe_data.env_spec(task))
    assert m["n_transitions"] == 250 and m["n_episodes"] == 10
    assert m["task"] == task and m["quality"] == quality and m["env_version"]
    assert set(m["packages"]) >= {"mpe2", "pettingzoo", "numpy", "torch"}
    assert sum(k for _, k in m["behaviour"]["policies"]) == 10
    # the reference returns every score on these data is normalised with: the behaviour checkpoint's own
    info = mpe_data.load_behaviour(task, 0)[1]
    assert (m["normalization"]["random"], m["normalization"]["expert"]) == (
        info["eval_return"]["random"],
        info["eval_return"]["expert"],
    )
    assert np.all(np.abs(b["actions_0"]) <= 1)
    assert b["truncations"].sum() == 10 and not b["terminals"].any()
    # within an episode, next_obs is the next row's obs
    inner = ~b["truncations"][:-1]
    assert np.array_equal(b["next_obs_2"][:-1][inner], b["obs_2"][1:][inner])


def test_same_seed_same_file_whatever_the_workers(tmp_path):
    a1, m1 = mpe_data.generate("simple_tag", "expert", 500, seed=3, workers=1, verbose=False)
    a2, m2 = mpe_data.generate("simple_tag", "expert", 500, seed=3, workers=2, verbose=False)
    a3, _ = mpe_data.generate("simple_tag", "expert", 500, seed=4, workers=1, verbose=False)
    p1 = save_dataset(str(tmp_path / "1.npz"), a1, m1)
    p2 = save_dataset(str(tmp_path / "2.npz"), a2, m2)
    assert p1["sha256"] == p2["sha256"]
    assert not np.array_equal(a1["obs_0"], a3["obs_0"])


def test_concurrent_generation_of_one_dataset(tmp_path):
    out = str(tmp_path / "same.npz")
    flags = "--task simple_spread --quality medium --n-transitions 1000 --workers 1 --out".split()
    cmd = [sys.executable, "-m", "omsd_data.mpe_data", *flags, out]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-1000:] for p in procs]
    load_dataset(out)  # valid, complete, checksum verified
    assert [f for f in os.listdir(tmp_path) if f != "same.npz"] == []  # no temporary files left


def test_missing_behaviour_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(mpe_data, "BEHAVIOUR_DIR", str(tmp_path))
    with pytest.raises(mpe_data.DatasetError, match="behaviour checkpoint .* is missing"):
        mpe_data.generate("simple_spread", "expert", 250, workers=1, verbose=False)


def test_a_retrained_checkpoint_gets_new_default_files(tmp_path, monkeypatch):
    """Default dataset names carry a hash of the behaviour checkpoint: data made by an old one is not reused."""
    from omsd_data import mamujoco_data

    for mod, task in ((mpe_data, "simple_spread"), (mamujoco_data, "HalfCheetah-2x3")):
        monkeypatch.setattr(mod, "BEHAVIOUR_DIR", str(tmp_path))
        ckpt = tmp_path / f"{task}_seed0.pt"
        ckpt.write_bytes(b"first run")
        before = mod.default_path(task, "expert")
        assert before == mod.default_path(task, "expert")  # stable
        ckpt.write_bytes(b"retrained")
        assert mod.default_path(task, "expert") != before
    assert "-b" not in os.path.basename(mamujoco_data.default_path("HalfCheetah-2x3", "random"))  # no checkpoint


def test_a_retrained_prey_gets_new_default_files(tmp_path, monkeypatch):
    """tag/world data are named by the prey they were collected against too, not only by the predators."""
    monkeypatch.setattr(mpe_data, "PREY_DIR", str(tmp_path))
    (tmp_path / "simple_tag.pt").write_bytes(b"first prey")
    before = mpe_data.default_path("simple_tag", "expert")
    (tmp_path / "simple_tag.pt").write_bytes(b"retrained prey")
    assert mpe_data.default_path("simple_tag", "expert") != before
