import os
import subprocess
import sys

import numpy as np
import pytest

from omsd_data.dataset import DatasetError, checksum, episode_returns, load_dataset, save_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_arrays(obs_dims=(8, 9, 8), act_dims=(1, 1, 1), episodes=3, T=5, seed=0):
    """A tiny dataset with heterogeneous agents (like Hopper 3x1), written by hand."""
    rng = np.random.default_rng(seed)
    N = episodes * T
    a = {
        "terminals": np.zeros(N, bool),
        "truncations": np.zeros(N, bool),
        "state": rng.normal(size=(N, 11)).astype(np.float32),
        "next_state": rng.normal(size=(N, 11)).astype(np.float32),
    }
    a["truncations"][T - 1 :: T] = True
    a["terminals"][T - 1] = True  # first episode ends in a terminal state instead
    a["truncations"][T - 1] = False
    for i, (o, u) in enumerate(zip(obs_dims, act_dims)):
        a[f"obs_{i}"] = rng.normal(size=(N, o)).astype(np.float32)
        a[f"next_obs_{i}"] = rng.normal(size=(N, o)).astype(np.float32)
        a[f"actions_{i}"] = rng.uniform(-1, 1, size=(N, u)).astype(np.float32)
        a[f"rewards_{i}"] = np.full(N, float(i), np.float32)
    return a


META = {"env_family": "test", "task": "toy", "quality": "expert"}


def test_round_trip_heterogeneous_agents(tmp_path):
    a = toy_arrays()
    p = str(tmp_path / "d.npz")
    meta = save_dataset(p, a, META)
    b, m = load_dataset(
        p, expect={"task": "toy", "n_agents": 3, "obs_dims": [8, 9, 8], "act_dims": [1, 1, 1], "state_dim": 11}
    )
    assert set(b) == set(a)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert m["sha256"] == meta["sha256"] == checksum(a)
    assert (m["n_transitions"], m["n_episodes"], m["obs_dims"]) == (15, 3, [8, 9, 8])
    # episode boundaries: metric sees 5 rows per episode
    assert list(episode_returns(b, lambda r: r.shape[0] + r[:, 2].sum())) == [15.0, 15.0, 15.0]
    with np.load(p, allow_pickle=False) as z:  # readable with no pickle
        assert "metadata" in z.files


def test_never_overwrites(tmp_path):
    p = str(tmp_path / "d.npz")
    save_dataset(p, toy_arrays(seed=0), META)
    before = open(p, "rb").read()
    with pytest.raises(DatasetError, match="already exists"):
        save_dataset(p, toy_arrays(seed=1), META)
    assert open(p, "rb").read() == before
    assert os.listdir(tmp_path) == ["d.npz"]  # no temporary file left behind


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_truncated_file(tmp_path):
    p = str(tmp_path / "d.npz")
    save_dataset(p, toy_arrays(), META)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupted"):
        load_dataset(p)


def test_corrupted_bytes(tmp_path):
    p = str(tmp_path / "d.npz")
    save_dataset(p, toy_arrays(), META)
    data = bytearray(open(p, "rb").read())
    # flip one byte inside obs_0's payload (a float, far from any zip header)
    with np.load(p) as z:
        needle = z["obs_0"][3].tobytes()
    at = data.find(needle)
    assert at > 0
    data[at + 1] ^= 0xFF
    open(p, "wb").write(bytes(data))
    with pytest.raises(DatasetError, match="corrupted|checksum"):
        load_dataset(p)


def test_checksum_mismatch(tmp_path):
    # A well-formed file whose arrays were edited after the checksum was written.
    a = toy_arrays()
    p = str(tmp_path / "d.npz")
    meta = save_dataset(p, a, META)
    a["rewards_0"] = a["rewards_0"] + 1
    np.savez(p, metadata=np.array(__import__("json").dumps(meta)), **a)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset(p)


@pytest.mark.parametrize("field,value", [("obs", np.nan), ("rewards", np.inf)])
def test_non_finite(tmp_path, field, value):
    a = toy_arrays()
    a[f"{field}_1"][4] = value
    with pytest.raises(DatasetError, match="non-finite value.*row 4"):
        save_dataset(str(tmp_path / "d.npz"), a, META)
    assert not os.listdir(tmp_path)


def test_wrong_shapes(tmp_path):
    a = toy_arrays()
    a["actions_2"] = a["actions_2"][:-1]
    with pytest.raises(DatasetError, match="actions_2 has 14 rows"):
        save_dataset(str(tmp_path / "d.npz"), a, META)
    a = toy_arrays()
    a["next_obs_0"] = a["next_obs_0"][:, :5]
    with pytest.raises(DatasetError, match="next_obs_0"):
        save_dataset(str(tmp_path / "d.npz"), a, META)


def test_env_mismatch(tmp_path):
    p = str(tmp_path / "d.npz")
    save_dataset(p, toy_arrays(), META)
    with pytest.raises(DatasetError, match="n_agents=3 but the env needs n_agents=2"):
        load_dataset(p, expect={"n_agents": 2})
    with pytest.raises(DatasetError, match=r"obs_dims=\[8, 9, 8\]"):
        load_dataset(p, expect={"obs_dims": [18, 18, 18]})


def test_cut_short(tmp_path):
    a = {k: v[:-2] for k, v in toy_arrays().items()}
    with pytest.raises(DatasetError, match="ends no episode"):
        save_dataset(str(tmp_path / "d.npz"), a, META)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "omsd_data.mpe_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--task", "simple_world_comm"], "unknown --task 'simple_world_comm'"),
        (["--quality", "best"], "unknown --quality 'best'"),
        (["--n-transitions", "30"], "multiple of the episode length"),
    ],
)
def test_cli_bad_input(tmp_path, args, msg):
    r = _cli(*args, "--out", str(tmp_path / "x.npz"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and msg in r.stderr
    assert not os.listdir(tmp_path)
