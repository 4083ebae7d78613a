"""The learned prey of simple_tag / simple_world (co-trained with predators by MATD3, committed), and the one
normalisation rule: scores on a dataset are normalised with the reference returns its metadata carries."""

import json
import os

import numpy as np
import pytest
import torch

from envs.mpe import PAPER_NORMALIZATION, PREY_DIR, PREY_OBS_DIMS, LearnedPrey, MPEEnv, learned_prey, paper_comparison
from omsd_data import generation, mpe_data
from omsd_data.dataset import load_dataset, save_dataset
from omsd_data.policies import actor_from_state_dict
from omsd_data.train_behaviour import PREY_DEFAULTS, TASK_DEFAULTS, Args
from omsd_data.train_behaviour import main as train
from omsd_utils.runs import RunError, normalized_score

PREY_TASKS = tuple(PREY_OBS_DIMS)


@pytest.mark.parametrize("task", PREY_TASKS)
def test_committed_prey_loads_weights_only_and_is_the_trained_actor(task):
    obj = torch.load(os.path.join(PREY_DIR, f"{task}.pt"), weights_only=True)  # plain tensors only
    info = json.loads(obj["info_json"])
    assert info["kind"] == "omsd-learned-prey" and info["task"] == task and info["obs_dim"] == PREY_OBS_DIMS[task]
    assert info["args"]["train_prey"] and info["step"] == info["curve"][-1][0]  # the prey of the last evaluation
    for k, v in {**TASK_DEFAULTS[task], **PREY_DEFAULTS}.items():  # so the default command remakes it
        assert info["args"][k] == v
    prey = learned_prey(task)
    obs = np.random.default_rng(0).standard_normal((64, prey.obs_dim)).astype(np.float32)
    with torch.no_grad():
        want = actor_from_state_dict(obj["policy"])(torch.as_tensor(obs)[None])[0].numpy()
    assert np.allclose(prey(obs), want, atol=1e-5)  # the numpy forward is the trained torch actor
    assert np.allclose(prey(obs[3]), want[3], atol=1e-5)
    # the behaviour predators were trained against this prey, and the data made by both are named by both
    assert mpe_data.load_behaviour(task, 0)[1]["prey_sha256"] == prey.sha256
    other = mpe_data.default_path(task, "expert")
    assert mpe_data.default_path("simple_spread", "expert").split("-b")[1] != other.split("-b")[1]


def _trajectory(task, prey, seed=3, steps=10):
    env = MPEEnv(task, prey=prey)
    env.reset(seed=seed)
    rng = np.random.default_rng(0)
    pos, acts = [], []
    for _ in range(steps):
        obs_prey = env.scenario.observation(env.world.agents[-1], env.world).astype(np.float32)
        acts.append(env._prey_action(env.world.agents[-1]))
        if prey is None:
            assert np.array_equal(acts[-1], learned_prey(task)(obs_prey))
        env.step({a: rng.uniform(-1, 1, 2) for a in env.possible_agents})
        pos.append(env.world.agents[-1].state.p_pos.copy())
    return np.array(pos), np.array(acts)


@pytest.mark.parametrize("task", PREY_TASKS)
def test_learned_prey_is_the_default_and_drives_the_env_deterministically(task):
    pos, acts = _trajectory(task, None)
    pos2, _ = _trajectory(task, None)
    assert np.array_equal(pos, pos2)  # same seed, same episode
    assert np.abs(np.diff(pos, axis=0)).max() > 1e-3 and np.abs(acts).max() <= 1  # the prey moves
    scripted, _ = _trajectory(task, "scripted")
    assert not np.allclose(pos, scripted)  # the scripted flee rule stays available, and is another prey
    with pytest.raises(ValueError, match="'scripted' or a policy"):
        MPEEnv(task, prey="omar")


def test_co_training_writes_a_prey_the_env_runs(tmp_path):
    tiny = dict(total_steps=320, learning_starts=80, eval_every=160, eval_episodes=2, batch_size=32, num_envs=4)
    out = tmp_path / "simple_tag_prey.pt"
    train(Args(task="simple_tag", train_prey=True, actor_hidden=16, critic_hidden=16, out=str(out), **tiny))
    prey = LearnedPrey(str(out))
    assert prey.task == "simple_tag" and prey.obs_dim == 14 and prey.layers[0][0].shape == (14, 16)
    assert [c[0] for c in prey.info["curve"]] == [0, 160, 320]  # (step, predators' return, prey's return)
    assert all(np.isfinite(c[1:]).all() for c in prey.info["curve"])
    env = MPEEnv("simple_tag", prey=prey)
    env.reset(seed=0)
    _, rew, *_ = env.step({a: np.zeros(2) for a in env.possible_agents})
    assert len(rew) == 3  # the predators are the controlled agents again
    co = MPEEnv("simple_tag", control_prey=True)
    assert co.possible_agents[-1] == "agent_0" and co.observation_space("agent_0").shape == (14,)
    with pytest.raises(RunError, match="--train-prey is for simple_tag and simple_world"):
        train(Args(task="simple_spread", train_prey=True, out=str(tmp_path / "x.pt"), **tiny))
    msg = r"is the learned prey of simple_tag \(seed 0\), not the checkpoint of simple_tag seed 0"
    with pytest.raises(RunError, match=msg):
        train(Args(task="simple_tag", train_prey=False, out=str(out), **tiny))  # a prey is not a behaviour file


def test_reference_returns_of_a_file_made_before_they_were_stored(tmp_path):
    arrays, meta = mpe_data.generate("simple_spread", "unimodal", 50, workers=1, verbose=False)
    assert meta["normalization"] == mpe_data.normalization("simple_spread")  # scripted data: the task's checkpoint
    path = str(tmp_path / "old.npz")
    save_dataset(path, arrays, {k: v for k, v in meta.items() if k != "normalization"})
    assert "normalization" not in load_dataset(path)[1]
    _, m, _ = mpe_data.ensure_dataset("simple_spread", "unimodal", 50, path=path)
    assert m["normalization"] == mpe_data.normalization("simple_spread")  # filled in from the checkpoint
    path = str(tmp_path / "own.npz")
    save_dataset(path, arrays, {**meta, "normalization": {"random": 1.0, "expert": 2.0, "source": "x"}})
    _, m, _ = generation.ensure(path, None, mpe_data.env_spec("simple_spread"), None, lambda: 1 / 0)
    assert m["normalization"]["source"] == "x"  # a file's own constants are kept


def test_normalized_score_and_the_paper_comparison():
    ref = {"random": 100.0, "expert": 300.0}
    assert normalized_score(100.0, ref) == 0 and normalized_score(300.0, ref) == 100
    assert normalized_score(250.0, ref) == pytest.approx(75.0) and normalized_score(250.0, None) is None
    c = PAPER_NORMALIZATION["simple_tag"]  # expert 185.6, random -4.1: 15 % of the range is 28.5
    assert paper_comparison("simple_tag", {"random": c["random"] + 28, "expert": c["expert"] - 28})["expert"] == 185.6
    assert paper_comparison("simple_tag", {"random": c["random"], "expert": c["expert"] - 29}) is None
    assert paper_comparison("simple_tag", {"random": c["random"] - 29, "expert": c["expert"]}) is None
    assert paper_comparison("bandit", ref) is None and paper_comparison("simple_tag", None) is None
