"""Runs that survive: resume after SIGKILL / Ctrl-C with the same numbers, bit-identical reruns, atomic writes,
and the bad-input cases not covered by test_dataset.py / test_oma_sd_mpe_script.py."""

import filecmp
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from omsd_data import dataset as ds
from omsd_utils import runs
from tests.helpers import MAMUJOCO_5_STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "oma_sd_mpe.py")
# long enough that a stage is still running a moment after its first checkpoint, short enough for CI
SMALL = (
    "--diffusion-steps 600 --critic-steps 600 --policy-steps 600 --eval-every 200 --eval-episodes 2 "
    "--dataset-transitions 250 --diffusion-hidden 16 --critic-hidden 16 --actor-hidden 16 "
    "--diffusion-batch-size 32 --critic-batch-size 32 --policy-batch-size 32 --threads 1 "
    "--checkpoint-every 50"
).split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


def env_of(workdir):
    return {**os.environ, "OMSD_DATA_DIR": str(workdir / "data")}


def run(workdir, *args, check=True):
    r = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=workdir, capture_output=True, text=True, env=env_of(workdir), timeout=300
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def outcome(workdir, stdout):
    """results.json of a finished run and its final actors."""
    path = workdir / stdout.strip().splitlines()[-1].split("-> ")[-1]
    with open(path) as f:
        res = json.load(f)
    actors = torch.load(path.parent / "actors.pt", weights_only=True)["actors"]
    return res, actors, path.parent


def same(a, b):
    (ra, aa, _), (rb, ab, _) = a, b
    assert ra["eval_history"] == rb["eval_history"]
    assert ra["final_return"] == rb["final_return"]
    assert aa.keys() == ab.keys() and all(torch.equal(aa[k], ab[k]) for k in aa)


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run (its own cache, so every stage is trained)."""
    return outcome(workdir, run(workdir, *SMALL, "--cache-dir", "cache_ref").stdout)


def test_same_command_from_scratch_gives_identical_results(workdir, reference):
    again = outcome(workdir, run(workdir, *SMALL, "--cache-dir", "cache_again").stdout)
    same(reference, again)
    for a in glob.glob(str(workdir / "cache_ref" / "*.pt")):  # the cached stage-1 models too
        b = torch.load(a.replace("cache_ref", "cache_again"), weights_only=True)
        a = torch.load(a, weights_only=True)
        for k in a:
            if isinstance(a[k], dict):
                assert all(torch.equal(a[k][p], b[k][p]) for p in a[k])


@pytest.mark.parametrize(
    "stage,sig",
    [
        ("diffusion", signal.SIGKILL),
        ("critic", signal.SIGKILL),
        ("run", signal.SIGKILL),  # run = stage 2
        ("critic", signal.SIGINT),
        ("run", signal.SIGTERM),
    ],
    ids=["diffusion-SIGKILL", "critic-SIGKILL", "policy-SIGKILL", "critic-Ctrl-C", "policy-SIGTERM"],
)
def test_resume_after_interruption_gives_the_uninterrupted_result(workdir, reference, stage, sig):
    cache = f"cache_{stage}_{sig.name}"
    args = [*SMALL, "--cache-dir", cache]
    p = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_of(workdir),
    )
    pattern = str(workdir / cache / f"*-{stage}-*.partial.pt")
    deadline = time.time() + 240
    while not glob.glob(pattern) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert glob.glob(pattern), "the stage never wrote a checkpoint"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:  # Ctrl-C / SIGTERM: checkpoint at the end of the step, one line, exit 130
        assert p.returncode == 130, err[-2000:]
        assert "checkpoint saved, run the same command again to continue" in err
    # killed mid-stage: that stage did not finish
    assert stage == "run" or not glob.glob(str(workdir / cache / f"*-{stage}-*[0-9a-f].pt"))
    assert not glob.glob(str(workdir / cache / "*.tmp*"))  # no half-written file left behind

    r = run(workdir, *args)
    step = int(r.stderr.split("resuming from step ")[1].split()[0])
    assert 0 < step < 600
    resumed = outcome(workdir, r.stdout)
    same(reference, resumed)
    assert "continuing the interrupted run" in r.stderr  # in its own run directory
    assert not glob.glob(str(workdir / cache / "*partial*")) and not glob.glob(str(workdir / cache / "*-run-*"))


def test_no_resume_starts_over(workdir, reference):
    cache = "cache_noresume"
    p = subprocess.Popen(
        [sys.executable, SCRIPT, *SMALL, "--cache-dir", cache],
        cwd=workdir,
        env=env_of(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not glob.glob(str(workdir / cache / "*-diffusion-*.partial.pt")) and p.poll() is None:
        time.sleep(0.01)
    p.kill()
    p.wait()
    r = run(workdir, *SMALL, "--cache-dir", cache, "--no-resume")
    assert "resuming" not in r.stderr and "continuing" not in r.stderr
    same(reference, outcome(workdir, r.stdout))


# ------------------------------------------------------------------------------------ checkpoints as bad input
def _error(workdir, *args):
    r = run(workdir, *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def test_checkpoint_of_another_configuration(workdir, reference):
    # a cached critic swapped for the behaviour models' file: right name, other configuration
    cache = workdir / "cache_swapped"
    cache.mkdir()
    for f in glob.glob(str(workdir / "cache_ref" / "*.pt")):
        os.link(f, cache / os.path.basename(f))
    critic = glob.glob(str(cache / "*-critic-*.pt"))[0]
    diffusion = glob.glob(str(cache / "*-diffusion-*.pt"))[0]
    os.remove(critic)
    os.link(diffusion, critic)
    before = os.stat(critic).st_mtime_ns
    line = _error(workdir, *SMALL, "--cache-dir", str(cache))
    assert "is a checkpoint of another configuration (stage: 'diffusion' there, 'critic' here)" in line
    assert "delete it or use another --cache-dir" in line
    assert os.stat(critic).st_mtime_ns == before  # left untouched


def test_corrupted_checkpoint(workdir, reference):
    cache = workdir / "cache_corrupt"
    cache.mkdir()
    for f in glob.glob(str(workdir / "cache_ref" / "*.pt")):
        data = open(f, "rb").read()
        (cache / os.path.basename(f)).write_bytes(data[: len(data) // 2] if "-diffusion-" in f else data)
    line = _error(workdir, *SMALL, "--cache-dir", str(cache))
    assert "-diffusion-" in line and "is not a readable checkpoint of this script" in line and "delete it" in line


def test_foreign_pickle_is_never_unpickled(workdir, reference, tmp_path):
    # a checkpoint-named file holding an arbitrary pickled object: weights_only loading refuses it
    import pickle

    cache = workdir / "cache_pickle"
    cache.mkdir()
    name = os.path.basename(glob.glob(str(workdir / "cache_ref" / "*-diffusion-*.pt"))[0])
    marker = tmp_path / "was_unpickled"
    with open(cache / name, "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    line = _error(workdir, *SMALL, "--cache-dir", str(cache))
    assert "is not a readable checkpoint" in line
    assert not marker.exists()


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unwritable_run_and_cache_directories(workdir, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "runs").write_text("a file where the runs/ directory should be")
    r = subprocess.run(
        [sys.executable, SCRIPT, *SMALL], cwd=blocked, capture_output=True, text=True, env=env_of(workdir), timeout=300
    )
    assert r.returncode == 2 and "cannot create a run directory" in r.stderr and "writable" in r.stderr
    assert (blocked / "runs").read_text().startswith("a file")
    line = _error(workdir, *SMALL, "--cache-dir", str(blocked / "runs" / "cache"))
    assert "cannot write to --cache-dir" in line


def test_wrong_agent_count(workdir, reference):
    src = glob.glob(str(workdir / "data" / "mpe" / "simple_spread-expert-*.npz"))[0]
    arrays, meta = ds.load_dataset(src)
    for k in ("obs_2", "actions_2", "rewards_2", "next_obs_2"):
        del arrays[k]
    meta.update(agent_names=meta["agent_names"][:2])
    two = str(workdir / "two_agents.npz")
    ds.save_dataset(two, arrays, meta)
    line = _error(workdir, *SMALL, "--dataset-path", two)
    assert "n_agents" in line and "2" in line and "3" in line


@pytest.mark.parametrize(
    "damage,msg",
    [
        ("truncate", "truncated or corrupted"),
        ("flip", "truncated or corrupted"),
        ("edit", "checksum mismatch"),
    ],
)
def test_damaged_dataset_file(workdir, reference, damage, msg):
    src = glob.glob(str(workdir / "data" / "mpe" / "simple_spread-expert-*.npz"))[0]
    bad = workdir / f"{damage}.npz"
    data = bytearray(open(src, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    if damage == "edit":  # a well-formed file whose arrays changed after the checksum was written
        arrays, meta = ds.load_dataset(src)
        arrays["rewards_0"] = arrays["rewards_0"] + 1
        with open(bad, "wb") as f:
            ds.write_npz(f, {"metadata": np.array(json.dumps(meta)), **arrays})
    else:
        bad.write_bytes(bytes(data))
    assert msg in _error(workdir, *SMALL, "--dataset-path", str(bad))


# ------------------------------------------------------------------------------------ dataset files
def test_same_seed_gives_byte_identical_dataset_files(tmp_path):
    paths = [str(tmp_path / f"{k}.npz") for k in range(2)]
    for k, p in enumerate(paths):
        if k:
            time.sleep(2.1)  # zip members carry a time stamp with 2 s resolution: it must not leak in
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "omsd_data.mpe_data",
                "--task",
                "simple_world",
                "--quality",
                "random",
                "--n-transitions",
                "250",
                "--workers",
                str(k + 1),
                "--out",
                p,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert filecmp.cmp(paths[0], paths[1], shallow=False)


def test_dataset_write_crash_keeps_the_old_file(tmp_path, monkeypatch):
    arrays = {f"{k}_0": np.zeros((25, 2), np.float32) for k in ("obs", "actions", "next_obs")}
    arrays.update(
        rewards_0=np.zeros(25, np.float32),
        terminals=np.zeros(25, bool),
        truncations=np.eye(1, 25, 24, dtype=bool)[0],
        state=np.zeros((25, 3), np.float32),
        next_state=np.zeros((25, 3), np.float32),
    )
    path = str(tmp_path / "d.npz")
    ds.save_dataset(path, arrays, {"task": "t"})
    before = open(path, "rb").read()
    calls = []

    def crash(*a, **k):  # dies after the first member, like a full disk or a kill
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    real = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(
        ds.DatasetError,
        match=r"cannot write .*d\.npz \(No space left on device\); the dataset needs "
        r"about 0 MiB: free disk space or set OMSD_DATA_DIR",
    ):
        ds.save_dataset(path, {**arrays, "rewards_0": np.ones(25, np.float32)}, {"task": "t"}, overwrite=True)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["d.npz"]  # the temporary file is gone


def test_checkpoint_write_crash_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    runs.save_atomic({"x": torch.zeros(3)}, path)
    before = open(path, "rb").read()

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(runs.RunError, match=r"cannot write .*c\.pt \(No space left on device\)"):
        runs.save_atomic({"x": torch.ones(3)}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pt"]


def test_unwritable_dataset_directory_fails_before_generating(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    t0 = time.time()
    flags = ["--task", "simple_spread", "--quality", "expert", "--out", str(tmp_path / "file" / "x.npz")]
    r = subprocess.run(
        [sys.executable, "-m", "omsd_data.mpe_data", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: cannot write to") and r.stderr.count("\n") == 1
    assert time.time() - t0 < 30  # rejected before the (100k-transition) rollouts
    assert (tmp_path / "file").read_text() == "not a directory"


# ------------------------------------------------------------------------------------ the MaMuJoCo script
MJ_SCRIPT = os.path.join(REPO, "oma_sd_mamujoco.py")


@pytest.fixture(scope="module")
def mj_dataset(tmp_path_factory):
    """A tiny HalfCheetah-2x3 dataset in the project's format (the random behaviour policy)."""
    from omsd_data import mamujoco_data as md

    d = tmp_path_factory.mktemp("mj")
    arrays, meta = md.generate("HalfCheetah-2x3", "random", 200, workers=1, verbose=False)
    path = str(d / "hc.npz")
    meta = ds.save_dataset(path, arrays, meta)  # the metadata as written (format, checksum)
    return d, path, arrays, meta


def _mj_error(cwd, *args, creates_run=False):
    """One error line, exit 2; nothing in runs/ changed (a run that fails mid-way keeps its new run directory)."""
    run_root = cwd / "runs"
    before = {p: p.stat().st_mtime_ns for p in run_root.rglob("*") if p.is_file()} if run_root.exists() else {}
    r = subprocess.run(
        [sys.executable, MJ_SCRIPT, "--threads", "1", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in run_root.rglob("*") if p.is_file()} if run_root.exists() else {}
    assert {k: after.get(k) for k in before} == before and (creates_run or after == before)
    return lines[0]


@pytest.mark.parametrize(
    "damage,msg",
    [
        ("missing", "does not exist"),
        ("truncate", "truncated or corrupted"),
        ("edit", "checksum mismatch"),
        ("nan", "non-finite"),
        ("agents", "n_agents"),
        ("shapes", "obs_dims"),
    ],
)
def test_mamujoco_script_bad_dataset_files(mj_dataset, damage, msg):
    d, src, arrays, meta = mj_dataset
    bad = d / f"{damage}.npz"
    a = {k: v.copy() for k, v in arrays.items()}
    if damage == "truncate":
        data = open(src, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "edit":
        a["rewards_0"] = a["rewards_0"] + 1
        with open(bad, "wb") as f:
            ds.write_npz(f, {"metadata": np.array(json.dumps(meta)), **a})
    elif damage == "nan":
        a["obs_1"][3, 2] = np.nan
        with open(bad, "wb") as f:  # bypasses the writer's checks on purpose
            ds.write_npz(f, {"metadata": np.array(json.dumps(meta)), **a})
    elif damage == "agents":
        for k in ("obs_1", "actions_1", "rewards_1", "next_obs_1"):
            del a[k]
        ds.save_dataset(str(bad), a, meta)
    elif damage == "shapes":
        a["obs_0"], a["next_obs_0"] = a["obs_0"][:, :8], a["next_obs_0"][:, :8]
        ds.save_dataset(str(bad), a, meta)
    assert msg in _mj_error(d, "--dataset-path", str(bad), "--env-id", "HalfCheetah-2x3")


def test_mamujoco_script_unwritable_run_directory(mj_dataset, tmp_path):
    _, src, _, _ = mj_dataset
    (tmp_path / "runs").write_text("a file where the runs/ directory should be")
    r = subprocess.run(
        [sys.executable, MJ_SCRIPT, "--threads", "1", "--dataset-path", src],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "cannot create a run directory" in r.stderr
    assert (tmp_path / "runs").read_text().startswith("a file")


def test_mamujoco_script_checkpoint_of_another_configuration(mj_dataset, tmp_path):
    _, src, _, _ = mj_dataset
    tiny = [*MAMUJOCO_5_STEPS, "--dataset-path", src, "--cache-dir", "cache"]
    r = subprocess.run([sys.executable, MJ_SCRIPT, *tiny], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    critic = glob.glob(str(tmp_path / "cache" / "*-critic-*.pt"))[0]
    diffusion = glob.glob(str(tmp_path / "cache" / "*-diffusion-*.pt"))[0]
    os.replace(diffusion, critic)  # the critic's name now holds the behaviour models
    line = _mj_error(tmp_path, *tiny, creates_run=True)
    assert "is a checkpoint of another configuration (stage: 'diffusion' there, 'critic' here)" in line


# ------------------------------------------------------------------------------------ the newer parts' bad input
TABLE = os.path.join(REPO, "benchmark", "table.py")
BC = os.path.join(REPO, "benchmark", "bc_reference.py")
MJ = os.path.join(REPO, "oma_sd_mamujoco.py")


def one_line_error(r, *parts):
    """Exit 2 with exactly one `error:` line naming `parts`, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def cmd(tmp_path, *argv, timeout=120):
    env = {**os.environ, "OMSD_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize(
    "argv,parts",
    [
        (["--holdout-every", "1"], ["Unrecognized options: --holdout-every"]),  # a retired option
        (["--foo", "1"], ["Unrecognized options: --foo"]),
        (["--beta", "abc"], ["--beta", "abc"]),
        (["--capture-video", "2", "--eval-episodes", "1"], ["--capture-video", "at most --eval-episodes"]),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, argv, parts):
    one_line_error(cmd(tmp_path, SCRIPT, *argv), *parts)
    assert os.listdir(tmp_path) == []  # no run directory, cache, lock or data


@pytest.mark.parametrize(
    "argv,parts",
    [
        (["--qualities", "shiny"], ["unknown quality 'shiny'"]),
        (["--seeds", "-1"], ["--seeds must be distinct integers"]),
        (["--seeds", "7", "7"], ["--seeds must be distinct integers", "7 7"]),
        (["--extra=--beta -1"], ["--beta must be > 0"]),
        (["--extra=--seed 5"], ["--extra sets --seed"]),
        (["--extra=--dataset medium"], ["--extra sets --dataset"]),
        (["--decompositions", "bc", "--extra=--capture-video 1"], ["behaviour cloning", "--capture-video"]),
    ],
)
def test_table_refuses_a_bad_grid_before_making_anything(tmp_path, argv, parts):
    one_line_error(cmd(tmp_path, TABLE, "--out", str(tmp_path / "out"), *argv), *parts)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_table_keeps_rows_of_other_settings_apart(tmp_path):
    """A grid into a directory whose cell has rows made with other settings is refused before any job, and a
    report over a cell whose rows differ in their settings is refused too (their seeds would be averaged)."""
    out = tmp_path / "out"
    out.mkdir()
    row = {"command": "python oma_sd_mpe.py --env-id simple_spread --dataset expert --decomposition sequential "
           "--seed 1 --policy-steps 20", "task": "simple_spread", "quality": "expert", "decomposition": "sequential",
           "seed": 1, "final_normalized_score": 1.0}  # fmt: skip
    (out / "mpe.jsonl").write_text(json.dumps(row) + "\n")
    before = sorted(os.listdir(out))
    argv = [TABLE, "--out", str(out), "--tasks", "simple_spread", "--qualities", "expert"]
    one_line_error(cmd(tmp_path, *argv, "--decompositions", "sequential"), "made with other settings")
    assert sorted(os.listdir(out)) == before  # no submitit folder, no new rows
    other = dict(row, command=row["command"].replace("--seed 1 --policy-steps 20", "--seed 2"), seed=2)
    (out / "mpe.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    one_line_error(cmd(tmp_path, TABLE, "--report-only", "--out", str(out)), "made with different settings")


def test_bc_reference_help_family_forms_and_what_it_does_not_do(tmp_path):
    r = cmd(tmp_path, BC, "--help")
    assert r.returncode == 0 and "usage: python benchmark/bc_reference.py --family" in r.stdout
    one_line_error(cmd(tmp_path, BC, "--family", "foo"), "'foo'")
    # --family=mpe is read (the error is about the next flag), and BC neither evaluates saved runs nor draws
    one_line_error(cmd(tmp_path, BC, "--family=mpe", "--env-id", "bandit", "--eval-from", "x"), "--eval-from")
    one_line_error(cmd(tmp_path, BC, "--family", "mpe", "--capture-video", "1"), "--capture-video")
    assert not (tmp_path / "runs").exists()


def test_an_episodes_return_does_not_depend_on_how_many_run_together():
    """MuJoCo amplifies a last-digit difference of an action into another episode: evaluation computes the actions
    in blocks of 64 rows, so episode k scores the same alone and among others (a video's episode is the
    evaluation's)."""
    import oma_sd_mamujoco as om
    import oma_sd_mpe as mp

    torch.manual_seed(0)
    actors = om.Actors(3, 8 + 1, 1, 64)
    returns = [om.evaluate(actors, om.resolve_args(om.Args(env_id="Hopper-3x1", eval_episodes=E)), [0, 1, 2], 9)
               for E in (1, 3)]  # fmt: skip
    assert returns[0]["episode_returns"][0] == returns[1]["episode_returns"][0]
    actors = mp.Actors(3, 18, 2, 64)
    one, many = (
        mp.evaluate(actors, mp.resolve_args(mp.Args(eval_episodes=E)), [0, 1, 2], 18, record=True) for E in (1, 7)
    )
    assert np.array_equal(one[2], many[2][:, ::7])  # episode 0's actions: every 7th of the 7-episode record


def test_eval_from_refuses_settings_it_would_ignore_and_stops_at_once(tmp_path):
    tiny = [*MAMUJOCO_5_STEPS, "--dataset", "random", "--dataset-transitions", "200", "--env-id", "Hopper-3x1"]
    r = cmd(tmp_path, MJ, *tiny, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = str(tmp_path / r.stdout.strip().splitlines()[-1].split("-> ")[-1].rsplit("/", 1)[0])
    one_line_error(cmd(tmp_path, MJ, "--eval-from", run_dir, "--seed", "5"), "--seed would be ignored")
    one_line_error(cmd(tmp_path, MJ, "--eval-from", run_dir, "--capture-video", "100000"), "at most --eval-episodes")
    # a long evaluation ends within seconds of SIGTERM, exit 130
    env = {**os.environ, "OMSD_DATA_DIR": str(tmp_path / "data")}
    p = subprocess.Popen([sys.executable, MJ, "--eval-from", run_dir, "--eval-episodes", "400", "--threads", "1"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    for line in p.stderr:  # the evaluation has started (imports done, the signal handlers set)
        if line.startswith("evaluating "):
            break
    time.sleep(1)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and time.time() - t0 < 10, err[-2000:]
    assert not glob.glob(run_dir + "/eval_400_episodes.json")


def test_a_corrupt_actors_file_gets_no_advice_to_unpickle(tmp_path):
    import oma_sd_mpe as mp
    from omsd_utils import saved

    path = tmp_path / "actors.pt"
    torch.save({"actors": object()}, path)  # a pickle of a Python object: never unpickled
    with pytest.raises(runs.RunError) as e:
        saved.load_actors(mp.Actors(3, 18, 2, 8), str(path), [0, 1, 2], "simple_spread")
    assert "never unpickled" in str(e.value) and "weights_only" not in str(e.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, metadata=np.array("{}"), obs_0=np.array([object()], dtype=object))
    with pytest.raises(ds.DatasetError) as e:
        ds.load_dataset(str(bad))
    assert "never loaded" in str(e.value) and "allow_pickle" not in str(e.value)
