"""OMAR's pretrained prey: conversion of its legacy pickle (only on request), the converted file's policy,
MPEEnv driven by it, and oma_sd_mpe.py's --prey-path / --trust-pickle, on fake OMAR files built here."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from envs.mpe import PREY_DIR, PREY_OBS_DIMS, MPEEnv, PreyError
from envs.omar_prey import convert_omar_prey, load_prey, prey_file_kind
from omsd_utils.runs import normalized_score
from tests.helpers import MPE_TINY, run_script
from tests.helpers import results_of as results_of_stdout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "oma_sd_mpe.py")
TINY = MPE_TINY
PRED_OBS = {"simple_tag": 16, "simple_world": 24}


def _net(rng, d_in, d_out, out_scale=0.5):
    """State dict of OMAR's MLPNetwork (BatchNorm1d in_fn, fc1..fc3) with non-trivial running statistics."""
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return OrderedDict(
        [
            ("in_fn.weight", t(rng.uniform(0.5, 1.5, d_in))),
            ("in_fn.bias", t(rng.normal(0, 0.2, d_in))),
            ("in_fn.running_mean", t(rng.normal(0, 0.5, d_in))),
            ("in_fn.running_var", t(rng.uniform(0.05, 3.0, d_in))),
            ("in_fn.num_batches_tracked", torch.tensor(12345)),
            ("fc1.weight", t(rng.normal(0, 1 / np.sqrt(d_in), (64, d_in)))),
            ("fc1.bias", t(rng.normal(0, 0.1, 64))),
            ("fc2.weight", t(rng.normal(0, 1 / 8, (64, 64)))),
            ("fc2.bias", t(rng.normal(0, 0.1, 64))),
            ("fc3.weight", t(rng.normal(0, out_scale, (d_out, 64)))),
            ("fc3.bias", t(rng.normal(0, 0.1, d_out))),
        ]
    )


def fake_omar_file(path, task="simple_tag", seed=0, n_agents=4, drop=()):
    """OMAR's pretrained_adv_model.pt layout: a legacy (non-zip) torch pickle of init_dict + agent_params."""
    rng = np.random.default_rng(seed)
    obs = [PRED_OBS[task]] * 3 + [PREY_OBS_DIMS[task]]
    critic_in = sum(obs) + 2 * len(obs)
    agents = []
    for i in range(n_agents):
        d = obs[min(i, 3)]
        entry = {
            "policy": _net(rng, d, 2),
            "critic": _net(rng, critic_in, 1),
            "target_policy": _net(rng, d, 2),
            "target_critic": _net(rng, critic_in, 1),
            "policy_optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": list(range(10))}]},
            "critic_optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": list(range(10))}]},
        }
        agents.append(entry)
    for k in drop:
        del agents[-1]["policy"][k]
    init_dict = {
        "gamma": 0.95,
        "tau": 0.01,
        "lr": 0.01,
        "hidden_dim": 64,
        "alg_types": ["MADDPG"] * 3 + ["DDPG"],
        "agent_init_params": [{"num_in_pol": d, "num_out_pol": 2, "num_in_critic": critic_in} for d in obs],
        "discrete_action": False,
        "gaussian_noise_std": 0.1,
    }
    torch.save({"init_dict": init_dict, "agent_params": agents}, path, _use_new_zipfile_serialization=False)
    return agents[-1]["policy"] if n_agents else None


class Evil:
    """Unpickling this creates a marker file: what a hostile pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prey")
    tag_sd = fake_omar_file(d / "tag_adv.pt", "simple_tag", seed=1)
    world_sd = fake_omar_file(d / "world_adv.pt", "simple_world", seed=2)
    convert_omar_prey(str(d / "tag_adv.pt"), str(d / "tag_prey.pt"), trust_pickle=True)
    convert_omar_prey(str(d / "world_adv.pt"), str(d / "world_prey.pt"), trust_pickle=True, task="simple_world")
    return {"dir": d, "tag_sd": tag_sd, "world_sd": world_sd}


def test_prey_observation_is_what_omars_network_takes():
    for task, d in PREY_OBS_DIMS.items():
        env = MPEEnv(task)
        env.reset(seed=0)
        prey = env.world.agents[3]
        obs = env.scenario.observation(prey, env.world)
        assert len(obs) == d == env.state().shape[0] - 3 * PRED_OBS[task]  # state = 3 predators' obs + the prey's
        assert np.allclose(obs[:4], np.concatenate([prey.state.p_vel, prey.state.p_pos]))  # OMAR/mpe2 layout start


def test_refuses_pickle_without_trust(tmp_path):
    src, dst = tmp_path / "adv.pt", tmp_path / "out.pt"
    fake_omar_file(src)
    with pytest.raises(PreyError) as e:
        convert_omar_prey(str(src), str(dst))
    msg = str(e.value)
    assert "\n" not in msg and "pickle" in msg and "arbitrary code" in msg and "--trust-pickle" in msg
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["adv.pt"]
    # a hostile pickle, legacy or zip format, is never unpickled without the opt-in
    marker = tmp_path / "pwned"
    for i, zipped in enumerate((False, True)):
        torch.save({"agent_params": [Evil(marker)]}, tmp_path / f"evil{i}.pt", _use_new_zipfile_serialization=zipped)
        assert prey_file_kind(str(tmp_path / f"evil{i}.pt")) == "pickle"
        with pytest.raises(PreyError, match="--trust-pickle"):
            convert_omar_prey(str(tmp_path / f"evil{i}.pt"), str(dst))
        with pytest.raises(PreyError, match="not a converted prey file"):
            load_prey(str(tmp_path / f"evil{i}.pt"))
    assert not marker.exists()


def test_conversion_keeps_only_tensors(files, tmp_path, capsys):
    d = files["dir"]
    obj = torch.load(d / "tag_prey.pt", weights_only=True)  # no unpickling of code needed any more
    assert set(obj) == {"policy", "info"} and isinstance(obj["info"], str)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in obj["policy"].values())
    assert "in_fn.num_batches_tracked" not in obj["policy"]
    info = json.loads(obj["info"])
    assert info["source_sha256"] == hashlib.sha256((d / "tag_adv.pt").read_bytes()).hexdigest()
    assert info["task"] == "simple_tag" and info["obs_dim"] == 14  # taken from the network's input size
    for k, v in obj["policy"].items():
        assert torch.equal(v, files["tag_sd"][k])
    assert prey_file_kind(str(d / "tag_prey.pt")) == "converted"
    # the opt-in prints a warning; an existing output is never replaced; a converted file is not converted again
    out = tmp_path / "again.pt"
    convert_omar_prey(str(d / "tag_adv.pt"), str(out), trust_pickle=True)
    assert capsys.readouterr().err.startswith("warning: unpickling")
    before = out.read_bytes()
    with pytest.raises(PreyError, match="already exists"):
        convert_omar_prey(str(d / "world_adv.pt"), str(out), trust_pickle=True)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["again.pt"]
    with pytest.raises(PreyError, match="already a converted prey file"):
        convert_omar_prey(str(out), str(tmp_path / "x.pt"), trust_pickle=True)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(drop=("fc2.bias", "in_fn.running_var")), "lacks in_fn.running_var, fc2.bias"),
        (dict(n_agents=3), "found 3 entries"),
    ],
)
def test_bad_prey_network(tmp_path, kw, msg):
    fake_omar_file(tmp_path / "adv.pt", **kw)
    with pytest.raises(PreyError, match=msg):
        convert_omar_prey(str(tmp_path / "adv.pt"), str(tmp_path / "out.pt"), trust_pickle=True)
    assert not (tmp_path / "out.pt").exists()


def test_bad_prey_shapes(tmp_path):
    src = tmp_path / "adv.pt"
    torch.save(
        {"init_dict": {}, "agent_params": [{}] * 3 + [{"policy": _net(np.random.default_rng(0), 14, 3)}]},
        src,
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(PreyError, match=r"fc3.weight has shape \(3, 64\), expected \(2, 64\)"):
        convert_omar_prey(str(src), str(tmp_path / "out.pt"), trust_pickle=True)


def test_policy_equals_hand_computed_forward(files):
    prey = load_prey(str(files["dir"] / "tag_prey.pt"), task="simple_tag")
    p = {k: v.double().numpy() for k, v in files["tag_sd"].items()}
    rng = np.random.default_rng(5)
    obs = rng.normal(0, 1.5, (6, 14)).astype(np.float32)
    x = (obs - p["in_fn.running_mean"]) / np.sqrt(p["in_fn.running_var"] + 1e-5) * p["in_fn.weight"] + p["in_fn.bias"]
    h = np.maximum(x @ p["fc1.weight"].T + p["fc1.bias"], 0)
    h = np.maximum(h @ p["fc2.weight"].T + p["fc2.bias"], 0)
    want = np.tanh(h @ p["fc3.weight"].T + p["fc3.bias"])
    assert np.abs(want).max() > 0.2  # a non-trivial output
    assert np.allclose(prey(obs), want, atol=1e-5)  # a batch
    for o, w in zip(obs, want):
        assert np.allclose(prey(o), w, atol=1e-5)  # one observation, as MPEEnv calls it
    # the same as torch's own BatchNorm1d in eval mode (OMAR's network)
    bn = torch.nn.BatchNorm1d(14).eval()
    bn.load_state_dict({k[6:]: v for k, v in files["tag_sd"].items() if k.startswith("in_fn.")})
    assert np.allclose(bn(torch.tensor(obs)).detach().numpy(), x, atol=1e-5)


def _place(env, positions):
    env.reset(seed=0)
    for ag, pos in zip(env.world.agents, positions):
        ag.state.p_pos, ag.state.p_vel = np.array(pos, dtype=float), np.zeros(2)
    for lm in env.world.landmarks:
        lm.state.p_pos = np.array([5.0, 5.0])  # far away: no contact forces


def test_env_moves_prey_by_the_policy(files):
    policy = load_prey(str(files["dir"] / "tag_prey.pt"))
    seen = []

    def prey(o):
        seen.append(o)
        return policy(o)

    start = [(-0.5, 0.0), (0.5, 0.5), (0.5, -0.5), (0.1, 0.2)]
    env, scripted = MPEEnv("simple_tag", prey=prey), MPEEnv("simple_tag")
    _place(env, start)
    _place(scripted, start)
    state = env.state()
    zero = {a: np.zeros(2) for a in env.possible_agents}
    env.step(zero)
    scripted.step(zero)
    assert len(seen) == 1 and seen[0].dtype == np.float32 and np.array_equal(seen[0], state[48:])  # the prey's obs
    a = policy(seen[0])
    v = 4.0 * 4.0 * a * 0.1  # OMAR's double accel (prey accel 4), dt 0.1, from rest
    v = v / max(np.linalg.norm(v) / 1.3, 1.0)  # prey max speed 1.3
    prey_agent = env.world.agents[3]
    assert prey_agent.state.p_vel == pytest.approx(v, abs=1e-6)
    assert prey_agent.state.p_pos == pytest.approx(np.array(start[3]) + v * 0.1, abs=1e-7)
    assert not np.allclose(prey_agent.state.p_pos, scripted.world.agents[3].state.p_pos)
    # a whole episode runs; the predators are unaffected by the choice of prey in this first step
    assert np.allclose(env.world.agents[0].state.p_pos, scripted.world.agents[0].state.p_pos)
    for _ in range(24):
        env.step(zero)
    assert len(seen) == 25 and env.agents == []


def test_wrong_task_refused(files, tmp_path):
    world = str(files["dir"] / "world_prey.pt")
    with pytest.raises(PreyError, match="holds the prey of simple_world .*not of simple_tag"):
        load_prey(world, task="simple_tag")
    with pytest.raises(ValueError, match="takes observations of 22 values, but the prey of simple_tag observes 14"):
        MPEEnv("simple_tag", prey=load_prey(world))
    with pytest.raises(ValueError, match="simple_spread has no prey"):
        MPEEnv("simple_spread", prey=load_prey(world))
    MPEEnv("simple_world", prey=load_prey(world, task="simple_world")).reset(seed=0)
    with pytest.raises(PreyError, match="takes 22 inputs, but the prey of simple_tag observes 14"):
        convert_omar_prey(
            str(files["dir"] / "world_adv.pt"), str(tmp_path / "x.pt"), trust_pickle=True, task="simple_tag"
        )
    assert not (tmp_path / "x.pt").exists()


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "envs.omar_prey", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )


def test_cli(files, tmp_path):
    src = str(files["dir"] / "tag_adv.pt")
    r = _cli(src, "--out", str(tmp_path / "p.pt"), "--task", "simple_tag", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "--trust-pickle" in lines[0], r.stderr
    assert not (tmp_path / "p.pt").exists()
    r = _cli(src, "--out", str(tmp_path / "p.pt"), "--task", "simple_tag", "--trust-pickle", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: unpickling" in r.stderr and "simple_tag prey" in r.stdout
    assert load_prey(str(tmp_path / "p.pt"), task="simple_tag").obs_dim == 14


# --------------------------------------------------------------------------------- oma_sd_mpe.py, end to end
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("omsd_prey")


def run(workdir, *args):
    return run_script(SCRIPT, workdir, *args, check=False)


def results_of(workdir, r):
    assert r.returncode == 0, r.stderr[-3000:]
    return results_of_stdout(workdir, r.stdout)


def test_script_with_omar_prey(files, workdir):
    src = str(files["dir"] / "tag_adv.pt")
    args = ["--env-id", "simple_tag", *TINY, "--dataset", "medium", "--exp-name", "prey"]
    learned = results_of(workdir, run(workdir, *args))  # the default: the env's learned prey, named by content
    want = hashlib.sha256(open(os.path.join(PREY_DIR, "simple_tag.pt"), "rb").read()).hexdigest()
    assert learned["prey"] == {"kind": "learned", "file": "envs/prey/simple_tag.pt", "source_sha256": want}
    # --eval-from evaluates against the run's own prey, also with the constants as {"constants": ...} (older runs)
    r = run(workdir, *args, "--seed", "2")
    run_dir = workdir / os.path.dirname(r.stdout.strip().splitlines()[-1].split("-> ")[-1])
    second = results_of(workdir, r)
    old = workdir / "old_run"
    shutil.copytree(run_dir, old)
    res = json.loads((old / "results.json").read_text())
    res["normalization"] = {"constants": {"expert": 185.6, "random": -4.1}, "source": "the OMSD paper's MPE constants"}
    (old / "results.json").write_text(json.dumps(res))
    for d, ref in ((run_dir, second["normalization"]), (old, {"expert": 185.6, "random": -4.1})):
        ev = run(workdir, "--eval-from", str(d), "--eval-episodes", "2")
        assert ev.returncode == 0, ev.stderr[-2000:]
        out = json.loads((d / "eval_2_episodes.json").read_text())
        assert out["return"] == pytest.approx(second["final_return"])
        assert out["normalized_score"] == pytest.approx(normalized_score(out["return"], ref))
    r = run(workdir, *args, "--prey-path", src, "--trust-pickle")
    first = results_of(workdir, r)
    sha = hashlib.sha256(open(src, "rb").read()).hexdigest()
    converted = workdir / "runs" / "cache" / f"omar_prey_{sha[:16]}.pt"
    assert "warning: unpickling" in r.stderr and converted.exists()
    assert first["prey"]["source_sha256"] == sha and os.path.samefile(first["prey"]["file"], converted)
    assert first["eval_history"] != learned["eval_history"]  # evaluated against another prey
    # the converted file needs no opt-in, and gives the same numbers; the cached conversion is reused
    r = run(workdir, *args, "--prey-path", str(files["dir"] / "tag_prey.pt"))
    again = results_of(workdir, r)
    assert again["eval_history"] == first["eval_history"] and again["prey"]["source_sha256"] == sha
    r = run(workdir, *args, "--prey-path", src, "--trust-pickle", "--exp-name", "prey2")
    assert "warning: unpickling" not in r.stderr and results_of(workdir, r)["eval_history"] == first["eval_history"]


@pytest.mark.parametrize(
    "case,msg",
    [
        ("pickle", "--trust-pickle"),
        ("spread", "--prey-path is for simple_tag and simple_world"),
        ("world", "holds the prey of simple_world"),
        ("missing", "does not exist"),
    ],
)
def test_script_prey_errors(files, workdir, case, msg):
    path = {"pickle": "tag_adv.pt", "spread": "tag_prey.pt", "world": "world_prey.pt", "missing": "nope.pt"}
    env_id = "simple_spread" if case.startswith("spread") else "simple_tag"
    runs = workdir / "runs"
    before = sorted(runs.rglob("*")) if runs.exists() else []
    flags = ["--prey-path", str(files["dir"] / path.get(case, "tag_prey.pt"))]
    r = run(workdir, "--env-id", env_id, *TINY, *flags)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr[-2000:]
    assert (sorted(runs.rglob("*")) if runs.exists() else []) == before  # nothing written
