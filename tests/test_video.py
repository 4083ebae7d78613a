"""--capture-video and --eval-from in both scripts (omsd_utils/saved.py, envs/render.py): GIFs of evaluation episodes,
headless, that are the evaluation's own episodes; a saved run evaluated again without training."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import MAMUJOCO_TINY, MPE_TINY, REPO, results_of, run_script

MPE = os.path.join(REPO, "oma_sd_mpe.py")
MAMUJOCO = os.path.join(REPO, "oma_sd_mamujoco.py")
NO_GL = r"EGL|OpenGL|GL context|glGetError"


@pytest.fixture(scope="module")
def mpe_run(tmp_path_factory):
    """A finished tiny MPE run with --capture-video (2 evaluation episodes, both drawn)."""
    work = tmp_path_factory.mktemp("video_mpe")
    r = run_script(MPE, work, "--env-id", "simple_spread", "--dataset", "expert", *MPE_TINY, "--capture-video", "2")
    res = results_of(work, r.stdout)
    return work, work / os.path.dirname(r.stdout.strip().splitlines()[-1].split("-> ")[-1]), res, r.stdout


def test_capture_video_draws_the_final_evaluations_episodes(mpe_run):
    work, run_dir, res, stdout = mpe_run
    videos = res["videos"]
    assert videos["eval_episodes"] == 2 and videos["return"] == res["final_return"]
    printed = [float(x) for x in re.findall(r"^episode \d \(env seed \d+\): 25 steps, return (\S+?);", stdout, re.M)]
    assert len(printed) == 2, stdout
    # the drawn episodes are the final evaluation's (env seeds seed + 100 + k, the same actions)
    assert printed == [round(v["return"], 4) for v in videos["episodes"]]
    assert np.mean([v["return"] for v in videos["episodes"]]) == pytest.approx(res["final_return"], abs=1e-9)
    assert [v["env_seed"] for v in videos["episodes"]] == [101, 102]
    for k in range(2):
        gif = run_dir / "videos" / f"episode_{k}.gif"
        with Image.open(gif) as im:
            assert im.size == (256, 256)
            # the first frame and one after each of the 25 steps, at mpe2's 10 frames per second (a GIF keeps a
            # run of identical frames as one; a tiny run's agents never stand still)
            assert im.n_frames == 26
            durations = []
            for i in range(im.n_frames):
                im.seek(i)
                durations.append(im.info["duration"])
            assert sum(durations) == 26 * 100 and set(durations) == {100}
        assert os.path.getsize(gif) < 500_000


def test_eval_from_reproduces_the_final_return_and_trains_nothing(mpe_run, tmp_path):
    work, run_dir, res, _ = mpe_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("videos"))
    old = json.loads((copy / "results.json").read_text())  # a run made before options were retired: evaluated too
    old["args"].update(diffusion_ema=0.0, holdout_every=50, save_model=True, capture_video=False, video_episodes=2)
    (copy / "results.json").write_text(json.dumps(old))
    r = run_script(MPE, work, "--eval-from", str(copy), "--eval-episodes", "2", "--capture-video", "1")
    with open(copy / "eval_2_episodes.json") as f:
        ev = json.load(f)
    assert ev["return"] == res["final_return"] and ev["same_protocol_as_run"] is True
    assert ev["env_seeds"] == [101, 102] and "(the same episodes)" in r.stdout
    assert sorted(os.listdir(copy / "videos")) == ["episode_0.gif"]
    assert "stage 1a" not in r.stderr  # nothing trained
    # more episodes: a different mean, said so
    r = run_script(MPE, work, "--eval-from", str(copy), "--eval-episodes", "3")
    with open(copy / "eval_3_episodes.json") as f:
        ev3 = json.load(f)
    assert ev3["env_seeds"] == [101, 102, 103] and ev3["same_protocol_as_run"] is False
    assert f"the run's final evaluation: {res['final_return']:.2f} over 2 episodes" in r.stdout  # rounded, as ours


def one_error_line(r, *parts):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for p in parts:
        assert p in r.stderr, r.stderr


def test_eval_from_bad_runs(mpe_run, tmp_path):
    work, run_dir, res, _ = mpe_run
    one_error_line(run_script(MPE, work, "--eval-from", str(tmp_path / "nope"), check=False), "no such directory")
    one_error_line(run_script(MPE, work, "--eval-from", str(tmp_path), check=False), "has no results.json")
    # weights of another env
    bad = tmp_path / "tag"
    bad.mkdir()
    shutil.copy(run_dir / "actors.pt", bad / "actors.pt")
    (bad / "results.json").write_text(
        json.dumps(dict(res, env_id="simple_tag", args=dict(res["args"], env_id="simple_tag")))
    )
    one_error_line(
        run_script(MPE, work, "--eval-from", str(bad), check=False), "does not fit simple_tag", "expected (16, 16)"
    )
    assert sorted(os.listdir(bad)) == ["actors.pt", "results.json"]  # nothing written
    # a pickle that is not weights only is never unpickled
    import torch

    torch.save({"actors": object()}, bad / "actors.pt")
    (bad / "results.json").write_text(json.dumps(res))
    one_error_line(
        run_script(MPE, work, "--eval-from", str(bad), check=False), "a pickle of Python objects, never unpickled here"
    )
    # a run of the other script
    one_error_line(run_script(MAMUJOCO, work, "--eval-from", str(run_dir), check=False), "does not know")


def test_mamujoco_capture_video_and_eval_from(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    r = subprocess.run(
        [
            sys.executable,
            MAMUJOCO,
            "--env-id",
            "Hopper-3x1",
            *MAMUJOCO_TINY,
            "--capture-video",
            "2",
            "--video-every",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMSD_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": REPO},
    )
    if r.returncode != 0 and re.search(NO_GL, r.stderr):
        pytest.skip(f"no headless OpenGL here (MUJOCO_GL=egl): {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = results_of(tmp_path, r.stdout)
    eps = res["videos"]["episodes"]
    assert len(eps) == 2 and res["videos"]["return"] == res["final_return"]
    ev = res["eval_history"][-1]
    for k, v in enumerate(eps):
        # the replay is the evaluation's episode: its length and return, exactly (omsd_utils/saved.py checks both)
        assert v["steps"] == ev["episode_lengths"][k] and v["return"] == ev["episode_returns"][k]
        # the first frame, one every 2 steps, and the last
        assert v["frames"] == 1 + v["steps"] // 2 + (v["steps"] % 2 > 0)
        with Image.open(v["gif"] if os.path.isabs(v["gif"]) else tmp_path / v["gif"]) as im:
            assert im.size == (320, 320)
            im.seek(im.n_frames - 1)
            assert np.asarray(im.convert("RGB")).std() > 0  # not a blank picture
    run_dir = tmp_path / os.path.dirname(r.stdout.strip().splitlines()[-1].split("-> ")[-1])
    r2 = run_script(MAMUJOCO, tmp_path, "--eval-from", str(run_dir), "--eval-episodes", "2")
    with open(run_dir / "eval_2_episodes.json") as f:
        assert json.load(f)["episode_returns"] == ev["episode_returns"]
    assert "(the same episodes)" in r2.stdout


MAMUJOCO_FRAMES = """
import numpy as np
from envs.mamujoco import make_env
from envs.render import mamujoco_frames
env = make_env("Hopper-3x1")
rng = np.random.default_rng(0)
rewards = []
frames = mamujoco_frames(env, lambda obs: {a: rng.uniform(-1, 1, env.action_space(a).shape) for a in obs}, 100,
                         size=64, rewards=rewards)
print(len(frames), len(rewards), frames[0].shape, frames[0].dtype, float(np.std(frames[-1])))
"""


def test_mamujoco_frames_of_a_random_policy():
    # in a process of its own: MUJOCO_GL and PyOpenGL's platform are fixed once per process
    r = subprocess.run(
        [sys.executable, "-c", MAMUJOCO_FRAMES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")},
    )
    if r.returncode != 0 and re.search(NO_GL, r.stderr):
        pytest.skip(f"no headless OpenGL here (MUJOCO_GL=egl): {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    n_frames, n_steps = int(r.stdout.split()[0]), int(r.stdout.split()[1])
    assert n_frames == n_steps + 1  # every step drawn (every=1), and the first frame
    assert "(64, 64, 3) uint8" in r.stdout
    assert float(r.stdout.split()[-1]) > 0  # not a blank picture
