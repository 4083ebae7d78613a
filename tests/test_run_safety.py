"""Bad input that must fail with one `error:` line (exit 2) before any long work and leave nothing behind, writes
that fail (full disk, no permission), runs started twice, runs killed at awkward moments, and timings across a
resume: for both training scripts, the dataset generators and the behaviour trainer. Most cases run the scripts'
`__main__` in this process (fast); the concurrency case runs real processes."""

import errno
import glob
import json
import os
import random
import runpy
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import tyro

import oma_sd_mpe as om
from envs.mpe import ENV_VERSION as MPE_VERSION
from envs.mpe import PreyError
from envs.omar_prey import prey_file_kind
from omsd_data import dataset as ds
from omsd_data import generation, mamujoco_data, mpe_data
from omsd_data.train_behaviour import Args as BehaviourArgs
from omsd_data.train_behaviour import main as train_behaviour
from omsd_utils import files, runs
from omsd_utils.files import LockFile, lock_path
from tests.helpers import MAMUJOCO_5_STEPS, MPE_TINY
from tests.test_dataset import toy_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPE = os.path.join(REPO, "oma_sd_mpe.py")
MJ = os.path.join(REPO, "oma_sd_mamujoco.py")
MJ_TINY = [*MAMUJOCO_5_STEPS, "--dataset", "random", "--dataset-transitions", "200"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty work directory; generated datasets go to <it>/data (OMSD_DATA_DIR)."""
    monkeypatch.chdir(tmp_path)
    for m in (mpe_data, mamujoco_data):
        monkeypatch.setattr(m, "DATA_DIR", str(tmp_path / "data"))
    state = (
        torch.get_rng_state(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        np.random.get_state(),
        random.getstate(),
    )
    yield tmp_path
    torch.set_rng_state(state[0])
    torch.use_deterministic_algorithms(state[1])
    torch.set_num_threads(state[2])
    np.random.set_state(state[3])
    random.setstate(state[4])
    runs.STOP["signal"] = None


def as_main(path, *argv, module=False):
    """Run a script's (or module's) `__main__` in this process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io
    import warnings

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old, out, err, code = sys.argv, io.StringIO(), io.StringIO(), 0
    sys.argv = [path, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
            if module:
                runpy.run_module(path, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
        for s, h in saved.items():
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()


def one_error(code, err) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def tree(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def main_args(cls, argv):
    return tyro.cli(cls, args=list(argv))


# ------------------------------------------------------------------------------------ settings refused at once
BAD_SETTINGS = [
    (["--threads", "-1"], "--threads must be 0 (all cores) or a positive number"),
    (["--seed", "99999999999999999"], "--seed must be an integer in 0..4294967295"),
    (["--stage1-seed", "-1"], "--stage1-seed must be an integer in 0..4294967295"),
    (["--expectile", "1.5"], "--expectile must be in (0, 1)"),
    (["--capture-video", "-1"], "--capture-video must be 0 (none) or a number of episodes"),
    (["--weighting", "sigma"], "--weighting must be one of sigma2, one, alpha_over_sigma"),
    (["--gamma", "2"], "--gamma must be in (0, 1]"),
    (["--beta", "inf"], "--beta must be a finite number"),
    (["--actor-lr", "nan"], "--actor-lr must be a finite number"),
    (["--actor-lr", "0"], "--actor-lr must be > 0"),
    (["--critic-lr", "nan"], "--critic-lr must be a finite number"),
    (["--critic-lr", "-1e-3"], "--critic-lr must be > 0"),
    (["--exp-name", "a/b"], "--exp-name must be a plain name"),
]


@pytest.mark.parametrize("script", [MPE, MJ], ids=["mpe", "mamujoco"])
@pytest.mark.parametrize("argv,msg", BAD_SETTINGS, ids=[a[0] + "=" + a[1] for a, _ in BAD_SETTINGS])
def test_bad_settings_fail_at_once_and_leave_nothing(here, script, argv, msg):
    code, _, err = as_main(script, *argv)
    assert msg in one_error(code, err)
    assert tree(here) == []  # no run directory, no cache, no data


@pytest.mark.parametrize(
    "script,argv",
    [
        (MPE, ["--agent-order", "0", "0", "1"]),
        (MJ, ["--agent-order", "0", "0"]),
        (MPE, ["--cache-dir", "a-file"]),
        (MJ, ["--cache-dir", "a-file"]),
    ],
    ids=["mpe-order", "mamujoco-order", "mpe-cache-file", "mamujoco-cache-file"],
)
def test_checked_before_the_dataset_is_made(here, script, argv):
    (here / "a-file").write_text("x")
    tiny = MPE_TINY if script == MPE else MJ_TINY
    t0 = time.time()
    line = one_error(*as_main(script, *tiny, *argv)[::2])
    assert ("--agent-order must be a permutation" in line and "has" in line) or (
        "cannot write to --cache-dir a-file" in line and "is a file, not a directory" in line
    )
    assert time.time() - t0 < 10 and tree(here) == ["a-file"]  # no dataset made, no run directory


def test_unwritable_cache_dir_is_found_before_anything_is_made(here, monkeypatch):
    # as an unprivileged user in a read-only directory (root can write anywhere, so the OS answer is simulated)
    real = runs.unwritable_dir
    monkeypatch.setattr(runs, "unwritable_dir", lambda d: "Permission denied in /ro" if d.startswith("ro") else real(d))
    line = one_error(*as_main(MPE, *MPE_TINY, "--cache-dir", "ro/cache")[::2])
    assert line == "error: cannot write to --cache-dir ro/cache (Permission denied in /ro); give a writable directory"
    assert tree(here) == []


def test_cache_dir_where_torch_cannot_write_leaves_no_run_directory(here, monkeypatch):
    # torch's zip writer raises RuntimeError, not OSError, for a directory it may not write into
    real = torch.save

    def save(obj, f, *a, **k):
        if "-run-" in str(f):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:747] . open file failed because of errno 13 on "
                "fopen: Permission denied, file path: x"
            )
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    line = one_error(*as_main(MPE, *MPE_TINY)[::2])
    assert "cannot write runs/cache/simple_spread-run-" in line and "(Permission denied)" in line
    assert os.listdir(here / "runs") == ["cache"] and not glob.glob(str(here / "runs" / "cache" / "*"))


def test_disk_full_while_writing_the_dataset(here, monkeypatch):
    real, calls = np.lib.format.write_array, []

    def write(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(np.lib.format, "write_array", write)
    line = one_error(*as_main(MPE, *MPE_TINY)[::2])
    assert "cannot write" in line and "(No space left on device); the dataset needs about" in line
    assert "free disk space or set OMSD_DATA_DIR" in line
    assert tree(here) == ["data", "data/mpe"]  # no temporary, no lock, no run directory


def test_disk_full_while_saving_the_actors_then_rerun_finishes(here, monkeypatch):
    real = torch.save

    def save(obj, f, *a, **k):
        if "actors.pt" in str(f):
            open(f, "wb").write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    line = one_error(*as_main(MPE, *MPE_TINY)[::2])
    assert "cannot write runs/" in line and "/actors.pt (" in line and "run the same command again" in line
    (run_dir,) = glob.glob(str(here / "runs" / "simple_*"))
    assert os.listdir(run_dir) and not glob.glob(run_dir + "/actors.pt*")  # no half file
    monkeypatch.setattr(torch, "save", real)
    code, out, err = as_main(MPE, *MPE_TINY)
    assert code == 0 and f"continuing the interrupted run {os.path.relpath(run_dir, here)}" in err
    assert glob.glob(str(here / "runs" / "simple_*")) == [run_dir] and os.path.exists(run_dir + "/results.json")


def test_save_atomic_reports_torch_write_errors(tmp_path, monkeypatch):
    def save(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda d: type("Usage", (), {"free": 0})())  # a full disk
    with pytest.raises(runs.RunError, match=r"cannot write .*x\.pt \(No space left on device\)"):
        runs.save_atomic({"a": 1}, str(tmp_path / "x.pt"))
    real = json.dump

    def dump(obj, f, **k):
        f.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(runs.RunError, match=r"cannot write .*results\.json \(No space left on device\)"):
        runs.write_json_atomic({"a": 1}, str(tmp_path / "results.json"))
    monkeypatch.setattr(json, "dump", real)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ bad datasets
def _with(arrays, **changes):
    return {**{k: v.copy() for k, v in arrays.items()}, **changes}


@pytest.mark.parametrize(
    "change,msg",
    [
        (
            lambda a: {"terminals": a["terminals"].astype(np.float32)},
            "array terminals has dtype float32, expected bool",
        ),
        (
            lambda a: {"truncations": a["truncations"].astype(np.float32)},
            "array truncations has dtype float32, expected bool",
        ),
        (lambda a: {"rewards_0": a["rewards_0"].astype(str)}, "array rewards_0 has dtype <U"),
        (
            lambda a: {"actions_1": np.round(a["actions_1"]).astype(np.int64)},
            "array actions_1 has dtype int64, expected floating",
        ),
        (lambda a: {"actions_0": a["actions_0"] * 10}, "array actions_0 has a value outside [-1, 1]"),
        (lambda a: {"obs_2": a["obs_2"] + 1j}, "array obs_2 has dtype complex64, expected floating"),
    ],
    ids=["terminals-float32", "truncations-float32", "rewards-str", "actions-int", "actions-x10", "obs-complex"],
)
def test_wrong_dtypes_and_action_range_are_refused(tmp_path, change, msg):
    a = toy_arrays()
    bad = _with(a, **change(a))
    meta = {"format": ds.FORMAT, "format_version": ds.FORMAT_VERSION, "sha256": ds.checksum(bad), "task": "toy"}
    p = tmp_path / "bad.npz"
    with open(p, "wb") as f:  # a well-formed file with a matching checksum: only validate() can refuse it
        ds.write_npz(f, {"metadata": np.array(json.dumps(meta)), **bad})
    with pytest.raises(ds.DatasetError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        ds.load_dataset(str(p))
    with pytest.raises(ds.DatasetError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        ds.save_dataset(str(tmp_path / "new.npz"), bad, {})
    assert sorted(os.listdir(tmp_path)) == ["bad.npz"]


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """A tiny simple_spread expert dataset under its generator's file name."""
    d = tmp_path_factory.mktemp("spread")
    arrays, meta = mpe_data.generate("simple_spread", "expert", 250, workers=1, verbose=False)
    path = d / f"simple_spread-expert-{MPE_VERSION}-n250-s0.npz"
    meta = ds.save_dataset(str(path), arrays, meta)
    return path, arrays, meta


def test_float32_terminals_through_the_script(here, spread):
    _, arrays, meta = spread
    bad = _with(arrays, terminals=arrays["terminals"].astype(np.float32))
    with open(here / "bad.npz", "wb") as f:
        ds.write_npz(f, {"metadata": np.array(json.dumps({**meta, "sha256": ds.checksum(bad)})), **bad})
    line = one_error(*as_main(MPE, *MPE_TINY, "--dataset-path", "bad.npz")[::2])
    assert "array terminals has dtype float32, expected bool" in line
    assert tree(here) == ["bad.npz"]


@pytest.mark.parametrize("what", ["quality", "env_version"])
def test_metadata_that_disagrees_with_the_name_or_the_env(here, spread, what):
    path, arrays, meta = spread
    if what == "quality":  # an expert file under a random file's name
        dst = here / path.name.replace("-expert-", "-random-")
        dst.write_bytes(path.read_bytes())
        msg = "the file name says quality 'random' but its metadata says 'expert'"
    else:
        dst = here / "other.npz"
        with open(dst, "wb") as f:
            ds.write_npz(f, {"metadata": np.array(json.dumps({**meta, "env_version": "bogus"})), **arrays})
        msg = f"was made on env version 'bogus', but this code's env is '{MPE_VERSION}'"
    assert msg in one_error(*as_main(MPE, *MPE_TINY, "--dataset-path", dst.name)[::2])
    assert tree(here) == [dst.name]


def test_generator_refuses_an_existing_file_of_another_dataset(here, spread):
    path, _, _ = spread
    before = path.read_bytes()
    line = one_error(
        *as_main(
            "omsd_data.mpe_data",
            "--task",
            "simple_spread",
            "--quality",
            "random",
            "--n-transitions",
            "250",
            "--out",
            str(path),
            module=True,
        )[::2]
    )
    assert f"{path} exists but holds another dataset (quality 'expert', not 'random')" in line
    assert path.read_bytes() == before
    code, _, err = as_main(
        "omsd_data.mpe_data",
        "--task",
        "simple_spread",
        "--quality",
        "expert",
        "--n-transitions",
        "250",
        "--out",
        str(path),
        module=True,
    )
    assert code == 0 and "already holds this dataset; nothing to do" in err


def test_mamujoco_generator_refuses_an_existing_file_of_another_dataset(here):
    arrays, meta = mamujoco_data.generate("HalfCheetah-2x3", "random", 200, workers=1, verbose=False)
    ds.save_dataset("hc.npz", arrays, meta)
    line = one_error(
        *as_main(
            "omsd_data.mamujoco_data",
            "--task",
            "HalfCheetah-2x3",
            "--quality",
            "random",
            "--n-transitions",
            "400",
            "--out",
            "hc.npz",
            module=True,
        )[::2]
    )
    assert "hc.npz exists but holds another dataset (n_transitions 200, not 400)" in line


def test_messages_name_the_real_problem(here, spread, monkeypatch):
    path, _, _ = spread
    (here / "x.npz").mkdir()
    assert "x.npz is a directory, not a dataset file" in one_error(
        *as_main(MPE, *MPE_TINY, "--dataset-path", "x.npz")[::2]
    )
    with pytest.raises(PreyError, match="is a zip archive but not a torch file"):
        prey_file_kind(str(path))
    with pytest.raises(PreyError, match="x.npz is a directory; give OMAR's pretrained_adv_model.pt"):
        prey_file_kind("x.npz")
    real = np.load
    monkeypatch.setattr(np, "load", lambda p, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p)))
    with pytest.raises(ds.DatasetError, match=r"cannot read .* \(Permission denied\); check its permissions"):
        ds.load_dataset(str(path))
    monkeypatch.setattr(np, "load", real)


def test_dataset_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "d.npz"
        ds.save_dataset(str(p), toy_arrays(), {})
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644  # readable by others, as any new file
    finally:
        os.umask(old)


@pytest.mark.parametrize("module", [mpe_data, mamujoco_data], ids=["mpe", "mamujoco"])
def test_generator_help_keeps_paragraphs_apart(module, capsys):
    with pytest.raises(SystemExit):
        tyro.cli(generation.Args, args=["--help"], description=module.__doc__)
    text = capsys.readouterr().out
    assert "\nEvery rollout adds Gaussian noise" in text and " Every rollout" not in text


# ------------------------------------------------------------------------------------ interrupted writes
KILL_WRITER = """
import os, signal, sys
import numpy as np
from omsd_data import dataset as ds
from tests.test_dataset import toy_arrays
real = np.lib.format.write_array
calls = []
def write(*a, **k):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # dies in the middle of the file
    return real(*a, **k)
np.lib.format.write_array = write
ds.save_dataset(sys.argv[1], toy_arrays(), {})
"""


def test_kill_during_a_dataset_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    p = str(tmp_path / "d.npz")
    r = subprocess.run([sys.executable, "-c", KILL_WRITER, p], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    (tmp,) = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    assert set(os.listdir(tmp_path)) == {tmp, "d.npz.lock"}  # what a kill -9 leaves
    other = tmp_path / ".tmp-e.npz-1-0123abcd.part"  # another dataset's, whose writer is gone (its lock is free)
    old, fresh = tmp_path / ".tmp-abcd_123.npz", tmp_path / ".tmp-efgh_456.npz"  # mkstemp's, by earlier versions
    for f in (other, old, fresh):
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    a = toy_arrays()
    arrays, _, _ = generation.ensure(p, lambda: (a, {}), None)
    assert sorted(os.listdir(tmp_path)) == [fresh.name, "d.npz"] and ds.checksum(arrays) == ds.checksum(a)


HOLDER = """
import os, shutil, sys
from omsd_utils.files import LockFile, lock_path
path, src, tmp = sys.argv[1:4]
lock = LockFile(lock_path(path))
lock.acquire()
open(tmp, "wb").write(b"being written")
print("locked", flush=True)
sys.stdin.readline()
shutil.copy(src, tmp)
os.replace(tmp, path)
lock.release()
"""


def test_a_live_writer_is_waited_for_and_its_temporary_left_alone(tmp_path):
    src, p = str(tmp_path / "src.npz"), str(tmp_path / "d.npz")
    ds.save_dataset(src, toy_arrays(), {})
    tmp = str(tmp_path / f".tmp-d.npz-{os.getpid() + 1}-0123abcd.part")  # the writer's, in save_dataset's pattern
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, p, src, tmp], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        ds.save_dataset(str(tmp_path / "e.npz"), toy_arrays(), {})  # a write in the same directory meanwhile
        assert os.path.exists(tmp)
        made, result = [], {}
        t = threading.Thread(target=lambda: result.update(r=generation.ensure(p, lambda: made.append(1), None)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and os.path.exists(tmp)  # waiting, and the live writer's temporary is untouched
        holder.stdin.write("go\n")
        holder.stdin.flush()
        t.join(30)
        assert not made and ds.checksum(result["r"][0]) == ds.checksum(toy_arrays())  # reused, not made again
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------ runs killed at awkward moments
class Killed(BaseException):
    pass


def test_a_finished_run_whose_checkpoints_were_left_is_not_run_again(here, monkeypatch, capsys):
    args = MPE_TINY + ["--checkpoint-every", "5"]
    real = runs.Run.close
    monkeypatch.setattr(runs.Run, "close", lambda self: (_ for _ in ()).throw(Killed()))  # killed right before it
    with pytest.raises(Killed):
        om.main(main_args(om.Args, args))
    (run_dir,) = glob.glob("runs/simple_*")
    first = json.load(open(os.path.join(run_dir, "results.json")))
    assert glob.glob("runs/cache/*-run-*.pt")  # the marker and the last checkpoint are still there
    monkeypatch.setattr(runs.Run, "close", real)
    capsys.readouterr()
    res = om.main(main_args(om.Args, args))
    cap = capsys.readouterr()
    assert f"the run {run_dir} had already finished" in cap.err and f"-> {run_dir}/results.json" in cap.out
    assert res == first and glob.glob("runs/simple_*") == [run_dir]  # no second run, no second result
    assert not glob.glob("runs/cache/*-run-*")  # marker, checkpoint and lock removed


def test_timings_after_a_resume_span_every_process(here, monkeypatch):
    args = MPE_TINY + ["--checkpoint-every", "5"]
    real = runs.checkpoint

    def stop_at_10(a, path, fields, stage, objs, g, step, *rest):
        if stage.startswith("stage 2") and step == 10:
            time.sleep(1.0)
            runs.STOP["signal"] = signal.SIGTERM  # as Ctrl-C would
        return real(a, path, fields, stage, objs, g, step, *rest)

    monkeypatch.setattr(runs, "checkpoint", stop_at_10)
    with pytest.raises(runs.Interrupted):
        om.main(main_args(om.Args, args))
    runs.STOP["signal"] = None
    monkeypatch.setattr(runs, "checkpoint", real)
    t0 = time.time()
    res = om.main(main_args(om.Args, args))
    second = time.time() - t0
    secs = res["eval_seconds"]
    assert len(secs) == 3 and all(a < b for a, b in zip(secs, secs[1:]))  # monotone across the two processes
    assert res["total_seconds"] >= second + 1.0 and res["total_seconds"] > secs[-1]
    for stage in ("diffusion", "critic"):  # trained by this run's first process: not "cached"
        assert "seconds" in res["stages"][stage] and "cached" not in res["stages"][stage]


def test_same_command_twice_at_once_and_shared_stage1(tmp_path):
    from tests.test_robustness import SMALL

    env = {**os.environ, "OMSD_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, MPE, *SMALL, "--cache-dir", "cache"]
    logs = {k: open(tmp_path / f"{k}.err", "w+") for k in "ac"}
    a = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=logs["a"])
    c = None
    try:
        deadline = time.time() + 120
        for stage in ("diffusion", "critic"):  # stop A while it trains a stage-1 model (and holds its lock)
            partial = str(tmp_path / "cache" / f"*-{stage}-*.partial.pt")
            while not glob.glob(partial) and a.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            os.kill(a.pid, signal.SIGSTOP)
            if glob.glob(partial):  # still there once stopped: the lock is released only after it is removed
                break
            os.kill(a.pid, signal.SIGCONT)
        else:
            pytest.fail("could not stop the first run inside stage 1")
        b = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        line = one_error(b.returncode, b.stderr)
        assert f"this run (the same command on the same data) is already in progress in process {a.pid}" in line
        c = subprocess.Popen(
            cmd + ["--beta", "0.5"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=logs["c"]
        )
        while f"waiting for process {a.pid}" not in (tmp_path / "c.err").read_text() and time.time() < deadline:
            assert c.poll() is None
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(120) == 0 and c.wait(120) == 0
    finally:
        for p in (a, c):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    results = [json.load(open(f)) for f in sorted(glob.glob(str(tmp_path / "runs" / "*" / "results.json")))]
    assert len(results) == 2 and sorted(r["beta"] for r in results) == [0.001, 0.5]  # one run per command
    for stage in ("diffusion", "critic"):  # each stage-1 model trained once, by one of them
        assert sorted("cached" in r["stages"][stage] for r in results) == [False, True]
    assert not glob.glob(str(tmp_path / "cache" / "*.lock"))


# ------------------------------------------------------------------------------------ the behaviour trainer
TB_TINY = dict(
    task="simple_spread",
    total_steps=16,
    learning_starts=8,
    eval_every=8,
    eval_episodes=1,
    batch_size=8,
    num_envs=2,
    actor_hidden=8,
    critic_hidden=8,
)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(seed=-1), "--seed must be an integer in 0..4294967295"),
        (dict(gamma=2.0), "--gamma must be finite and in (0, 1]"),
        (dict(num_envs=0), "--num-envs must be a positive integer"),
        (dict(lr=float("nan")), "--lr must be finite and > 0"),
        (dict(out="."), "is a directory"),
        (dict(out="f/b.pt"), "cannot write the checkpoint f/b.pt"),
    ],
)
def test_behaviour_trainer_bad_settings(tmp_path, monkeypatch, kw, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("a file where a directory is needed")
    with pytest.raises(runs.RunError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train_behaviour(BehaviourArgs(**{**TB_TINY, "out": str(tmp_path / "b.pt"), **kw}))
    assert os.listdir(tmp_path) == ["f"]


def test_behaviour_trainer_refuses_other_files_locks_and_write_errors(tmp_path, monkeypatch):
    out = tmp_path / "b.pt"
    ds.save_dataset(str(out), toy_arrays(), {})  # not a behaviour checkpoint
    msg = "exists and is not a behaviour checkpoint, not the checkpoint of simple_spread seed 0"
    with pytest.raises(runs.RunError, match=msg):
        train_behaviour(BehaviourArgs(**TB_TINY, out=str(out)))
    out.unlink()
    lock = LockFile(lock_path(str(out)))
    lock.acquire()
    try:
        with pytest.raises(runs.RunError, match=f"is being trained by process {os.getpid()}"):
            train_behaviour(BehaviourArgs(**TB_TINY, out=str(out)))
    finally:
        lock.release()
    (tmp_path / "b.pt.tmp4242").write_bytes(b"left by a kill")

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(runs.RunError, match=r"cannot write .*b\.pt \(.*\); free disk space .* then train again"):
        train_behaviour(BehaviourArgs(**TB_TINY, out=str(out)))
    assert os.listdir(tmp_path) == []  # the stale temporary removed, no half file, no lock


def test_behaviour_trainer_unknown_task_is_one_line_exit_2():
    code, _, err = as_main("omsd_data.train_behaviour", "--task", "Walker-2x3", module=True)
    assert "unknown --task 'Walker-2x3'" in one_error(code, err)


def test_threads_zero_means_every_core_the_process_may_use():
    from omsd_utils import runs

    before = torch.get_num_threads()
    try:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert runs.set_threads(1) == 1
        assert runs.set_threads(0) == min(runs.TORCH_THREADS, allowed) >= 1  # not the 1 set just before
        assert runs.set_threads(3) == 3
    finally:
        torch.set_num_threads(before)


def test_the_final_evaluation_has_eval_episodes_and_the_periodic_ones_fewer(here, monkeypatch):
    """The return a run reports is the mean of --eval-episodes episodes; the evaluations along stage 2 and the
    diagnostics' rollouts have --periodic-eval-episodes (at most --eval-episodes)."""
    seen, real = [], om.evaluate

    def spy(actors, args, order, obs_max, prey=None, record=False, episodes=None):
        seen.append((record, episodes or args.eval_episodes))
        return real(actors, args, order, obs_max, prey, record, episodes)

    monkeypatch.setattr(om, "evaluate", spy)
    argv = list(MPE_TINY)
    argv[argv.index("--eval-episodes") + 1] = "3"
    res = om.main(main_args(om.Args, argv + ["--periodic-eval-episodes", "2", "--dataset", "unimodal"]))
    assert [e for record, e in seen if not record] == [2, 2, 3] and res["final_eval_episodes"] == 3
    assert (True, 2) in seen  # the diagnostics' rollouts


def test_env_defaults_fill_only_the_unset_settings():
    """A setting given on the command line is kept; one left unset takes the --env-id's default (the critic's
    learning rate, batch and target normalisation too)."""
    mpe, bandit = om.env_defaults(om.Args(critic_lr=5e-4)), om.env_defaults(om.Args(env_id="bandit"))
    mpe_values = (mpe.critic_lr, mpe.critic_steps, mpe.critic_batch_size, mpe.actor_lr, mpe.critic_target_norm)
    assert mpe_values == (5e-4, 10_000, 1024, 3e-4, True)
    bandit_values = (bandit.critic_lr, bandit.critic_steps, bandit.critic_batch_size, bandit.actor_lr)
    assert bandit_values + (bandit.critic_target_norm,) == (3e-4, 1000, 256, 1e-2, False)
    assert om.env_defaults(om.Args(critic_target_norm=False)).critic_target_norm is False
    assert om.env_defaults(om.Args(critic_batch_size=256)).critic_batch_size == 256
