"""benchmark/video.py and envs/render.py: GIFs of a saved run's evaluation episodes, headless."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import MPE_TINY, REPO, run_script

VIDEO = os.path.join(REPO, "benchmark", "video.py")


@pytest.fixture(scope="module")
def mpe_run(tmp_path_factory):
    """A finished tiny MPE run (2 evaluation episodes), its directory and results."""
    work = tmp_path_factory.mktemp("video_mpe")
    r = run_script(
        os.path.join(REPO, "oma_sd_mpe.py"), work, "--env-id", "simple_spread", "--dataset", "expert", *MPE_TINY
    )
    run_dir = work / r.stdout.strip().splitlines()[-1].split("-> ")[-1].rsplit("/", 1)[0]
    with open(run_dir / "results.json") as f:
        return work, run_dir, json.load(f)


def video(workdir, *args):
    return subprocess.run(
        [sys.executable, VIDEO, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMSD_DATA_DIR": str(workdir / "data")},
    )


def test_gifs_of_the_evaluation_episodes_reproduce_the_final_return(mpe_run):
    work, run_dir, res = mpe_run
    assert res["args"]["eval_episodes"] == 2
    out = work / "gifs"
    r = video(work, "--run-dir", str(run_dir), "--episodes", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [float(x) for x in re.findall(r"^episode \d \(env seed \d+\): 25 steps, return (\S+?),", r.stdout, re.M)]
    assert len(printed) == 2, r.stdout
    # the same episodes as the run's final evaluation (seeds seed + 100 + k, the same batched actor calls)
    assert (
        f"mean return {res['final_return']!r}; results.json final_return: {res['final_return']!r} (the same)"
        in r.stdout
    ), r.stdout
    assert np.mean(printed) == pytest.approx(res["final_return"], abs=1e-3)
    for k in range(2):
        with Image.open(out / f"episode_{k}.gif") as im:
            assert im.size == (256, 256)
            # the first frame and one after each of the 25 steps, at mpe2's 10 frames per second (a GIF keeps a run
            # of identical frames as one; a tiny run's agents never stand still)
            assert im.n_frames == 26
            durations = []
            for i in range(im.n_frames):
                im.seek(i)
                durations.append(im.info["duration"])
            assert sum(durations) == 26 * 100 and set(durations) == {100}
        assert os.path.getsize(out / f"episode_{k}.gif") < 500_000


def test_weights_that_do_not_fit_the_env(mpe_run, tmp_path):
    _, run_dir, res = mpe_run
    shutil.copy(run_dir / "actors.pt", tmp_path / "actors.pt")
    res = dict(res, env_id="simple_tag", args=dict(res["args"], env_id="simple_tag"))
    (tmp_path / "results.json").write_text(json.dumps(res))
    r = video(tmp_path, "--run-dir", str(tmp_path), "--out", str(tmp_path / "v"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit simple_tag" in r.stderr and "expected (16, 16)" in r.stderr
    assert not (tmp_path / "v").exists()


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
    if r.returncode != 0 and re.search(r"EGL|OpenGL|GL context|glGetError", r.stderr):
        pytest.skip(f"no headless OpenGL here (MUJOCO_GL=egl): {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    n_frames, n_steps = int(r.stdout.split()[0]), int(r.stdout.split()[1])
    assert n_frames == n_steps + 1  # every step drawn (every=1), and the first frame
    assert "(64, 64, 3) uint8" in r.stdout
    assert float(r.stdout.split()[-1]) > 0  # not a blank picture
