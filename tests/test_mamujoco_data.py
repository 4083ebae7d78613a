"""MaMuJoCo dataset generation and the behaviour trainer on MaMuJoCo (tiny runs)."""

import glob
import os

import numpy as np
import pytest
import torch

from envs.mamujoco import ENV_IDS, env_spec
from omsd_data import mamujoco_data as md
from omsd_data.dataset import DatasetError, checksum, load_dataset, save_dataset, validate
from omsd_data.train_behaviour import Args
from omsd_data.train_behaviour import main as train


def _episodes_are_consistent(a):
    n = sum(1 for k in a if k.startswith("obs_"))
    ends = a["terminals"] | a["truncations"]
    assert ends[-1] and not (a["terminals"] & a["truncations"]).any()
    for i in range(n):  # inside an episode, next_obs is the next row's obs
        assert np.array_equal(a[f"next_obs_{i}"][:-1][~ends[:-1]], a[f"obs_{i}"][1:][~ends[:-1]])
    assert np.array_equal(a["next_state"][:-1][~ends[:-1]], a["state"][1:][~ends[:-1]])
    assert all(np.array_equal(a["rewards_0"], a[f"rewards_{i}"]) for i in range(n))  # one team reward


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_random_dataset_of_every_config(tmp_path, env_id):
    arrays, meta = md.generate(env_id, "random", 300, workers=1, verbose=False)
    assert len(arrays["obs_0"]) == 300  # exactly the transitions asked for: the last episode is cut
    _episodes_are_consistent(arrays)
    path = str(tmp_path / "d.npz")
    save_dataset(path, arrays, meta)
    _, m = load_dataset(path, expect=env_spec(env_id))
    assert m["quality"] == "random" and m["env_family"] == "mamujoco" and "mujoco" in m["packages"]


def test_hopper_terminals_are_not_truncations():
    a, _ = md.generate("Hopper-3x1", "random", 2000, workers=1, verbose=False)
    lengths = np.diff(np.concatenate([[-1], np.flatnonzero(a["terminals"] | a["truncations"])]))
    assert a["terminals"].sum() > 5 and lengths.max() < 1000  # unhealthy falls end episodes early
    assert [a[f"obs_{i}"].shape[1] for i in range(3)] == [8, 9, 8]  # different obs sizes kept apart


def test_same_seed_same_data_whatever_the_workers():
    a1, _ = md.generate("HalfCheetah-6x1", "random", 400, seed=2, workers=1, verbose=False)
    a2, _ = md.generate("HalfCheetah-6x1", "random", 400, seed=2, workers=2, verbose=False)
    a3, _ = md.generate("HalfCheetah-6x1", "random", 400, seed=3, workers=1, verbose=False)
    assert checksum(a1) == checksum(a2) != checksum(a3)


def test_missing_behaviour_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "BEHAVIOUR_DIR", str(tmp_path))
    with pytest.raises(
        DatasetError,
        match="behaviour checkpoint .*HalfCheetah-2x3_seed0.pt is missing.*"
        "python -m omsd_data.train_behaviour --task HalfCheetah-2x3 --seed 0",
    ):
        md.generate("HalfCheetah-2x3", "expert", 300, workers=1, verbose=False)
    assert md.reference_returns("HalfCheetah-2x3") is None


def test_unknown_env_and_quality():
    with pytest.raises(DatasetError, match="unknown MaMuJoCo env id 'Walker-2x3'"):
        md.generate("Walker-2x3", "random", 300)
    with pytest.raises(DatasetError, match="unknown dataset quality 'medium-random'"):
        md.generate("Hopper-3x1", "medium-random", 300)


def test_trainer_checkpoints_feed_every_quality(tmp_path, monkeypatch):
    """Three tiny training runs (seeds 0-2) on Hopper 3x1, then every quality made from them."""
    monkeypatch.setattr(md, "BEHAVIOUR_DIR", str(tmp_path))
    for seed in md.mixture_seeds("Hopper-3x1"):
        train(
            Args(
                task="Hopper-3x1",
                seed=seed,
                total_steps=480,
                learning_starts=160,
                eval_every=80,
                eval_episodes=2,
                batch_size=32,
                critic_hidden=32,
                num_envs=4,
                out=str(tmp_path / f"Hopper-3x1_seed{seed}.pt"),
            )
        )
    policies, info = md.load_behaviour("Hopper-3x1", 0)
    assert {"random", "medium", "expert", "replay_0"} <= set(policies)
    assert [s for s, _ in info["curve"]] == list(range(0, 481, 80))
    assert info["eval_return"]["expert"] == max(r for _, r in info["curve"])
    ref = md.reference_returns("Hopper-3x1")
    assert ref["expert"] == info["eval_return"]["expert"] and ref["random"] == info["eval_return"]["random"]
    for quality in md.QUALITIES:
        a, meta = md.generate("Hopper-3x1", quality, 200, workers=1, verbose=False)
        validate(a, quality)
        _episodes_are_consistent(a)
        assert meta["normalization"] == ref  # every generated dataset carries its reference returns
        names = [name for name, _ in meta["behaviour"]["policies"]]
        if quality == "mixture":
            assert names == ["seed0/expert", "seed2/expert", "seed3/expert"]
        if quality == "medium-expert":
            assert names == ["seed0/medium", "seed0/expert"] and [k for _, k in meta["behaviour"]["policies"]] == [
                100,
                100,
            ]


COMMITTED = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(md.BEHAVIOUR_DIR, "*_seed*.pt")))


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_behaviour_checkpoint(name):
    """Every committed checkpoint loads weights-only, fits its configuration and picked its snapshots as documented."""
    env_id, seed = name.rsplit("_seed", 1)
    policies, info = md.load_behaviour(env_id, int(seed))
    spec = env_spec(env_id)
    assert info["task"] == env_id and info["seed"] == int(seed) and info["env_version"] == md.ENV_VERSION
    curve = dict((int(s), r) for s, r in info["curve"])
    assert info["eval_return"]["expert"] == max(curve.values()) == curve[info["steps"]["expert"]]
    assert info["steps"]["random"] == 0 and {"random", "medium", "expert", "replay_0"} <= set(policies)
    actor = md.actor_from_state_dict(policies["expert"])
    n, obs_dim = policies["expert"]["l1.weight"].shape[:2]
    assert n == spec["n_agents"] and obs_dim == max(spec["obs_dims"])
    out = actor(torch.zeros(n, 5, obs_dim))
    assert out.shape == (n, 5, spec["act_dims"][0]) and out.abs().max() <= 1


@pytest.mark.parametrize("env_id", ["HalfCheetah-2x3", "Hopper-3x1"])
def test_committed_mixture_is_three_independent_experts(env_id):
    """A configuration with all mixture seeds committed makes its mixture from three different expert networks
    (Hopper's from seeds 0, 2 and 3: its seed 1 did not learn to hop)."""
    assert md.mixture_seeds(env_id) == ((0, 2, 3) if env_id == "Hopper-3x1" else (0, 1, 2))
    experts = [md.load_behaviour(env_id, s)[0]["expert"]["l1.weight"] for s in md.mixture_seeds(env_id)]
    assert not any(torch.equal(experts[i], experts[j]) for i in range(3) for j in range(i))
    a, meta = md.generate(env_id, "mixture", 300, workers=1, verbose=False)
    validate(a, "mixture")
    _episodes_are_consistent(a)
    assert [name for name, _ in meta["behaviour"]["policies"]] == [f"seed{s}/expert" for s in md.mixture_seeds(env_id)]
    assert [k for _, k in meta["behaviour"]["policies"]] == [100, 100, 100]
