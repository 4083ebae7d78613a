"""Loaders of the published datasets (omsd_data/published.py) on miniature files written in each source layout."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorstore as ts

from envs.mpe import PAPER_NORMALIZATION
from omsd_data.dataset import DatasetError, checksum, load_dataset, save_dataset
from omsd_data.mpe_data import env_spec
from omsd_data.published import detect_format, load_published

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_state(root):
    """Every file under root with its size and mtime: loading must leave this unchanged."""
    return {
        os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
        for d, _, fs in os.walk(root)
        for f in fs
    }


# ---------------------------------------------------------------------------------------------
# Writers of the published layouts
# ---------------------------------------------------------------------------------------------
def episodes_stream(rng, n_eps, T, dim):
    """Observations of n_eps episodes of T steps: obs[t] and next_obs[t] (= obs[t+1] inside an episode)."""
    seq = rng.normal(size=(n_eps, T + 1, dim)).astype(np.float32)
    return seq[:, :-1].reshape(-1, dim), seq[:, 1:].reshape(-1, dim)


def write_omar(root, task, quality, seed, obs_dims, n_eps, T, act_dim=2, states=0, done_rows=()):
    """OMAR's layout: <root>/<task>/<quality>/seed_<k>_data/{obs,acs,rews,next_obs,dones}_<i>.npy."""
    d = os.path.join(root, task, quality, f"seed_{seed}_data")
    os.makedirs(d)
    rng = np.random.default_rng(seed + 10 * len(obs_dims))
    N = n_eps * T
    out = {}
    for i, od in enumerate(obs_dims):
        out[f"obs_{i}"], out[f"next_obs_{i}"] = episodes_stream(rng, n_eps, T, od)
        out[f"acs_{i}"] = rng.uniform(-1, 1, (N, act_dim)).astype(np.float32)
        out[f"rews_{i}"] = rng.normal(size=N).astype(np.float32)
        out[f"dones_{i}"] = np.zeros(N, np.float32)
        out[f"dones_{i}"][list(done_rows)] = 1.0
        if states:
            out[f"states_{i}"], out[f"next_states_{i}"] = episodes_stream(np.random.default_rng(seed), n_eps, T, states)
    for k, v in out.items():
        np.save(os.path.join(d, f"{k}.npy"), v)
    return d, out


def write_omiga(path, obs_dim, n_agents, episode_rows, cut_rows=0, act_dim=1):
    """OMIGA's hdf5: o, s (N, n, obs), a (N, n, act), r (N, 1), d (N, 1); an episode of L steps is L+1 rows,
    the last one (d = 1) holding only the final observation. `cut_rows` adds an unfinished episode."""
    rng = np.random.default_rng(3)
    d = np.concatenate([np.r_[np.zeros(L), 1.0] for L in episode_rows] + [np.zeros(cut_rows)])[:, None]
    N = len(d)
    data = {
        "o": rng.normal(size=(N, n_agents, obs_dim)),
        "a": rng.uniform(-1, 1, (N, n_agents, act_dim)),
        "r": rng.normal(size=(N, 1)),
        "d": d,
    }
    data["s"] = data["o"] + np.arange(n_agents)[None, :, None]  # per-agent copies that differ
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v.astype(np.float32))
    return data


def write_vault(uid_dir, leaves, vault_index):
    """A flashbax Vault (format 1.2) written with tensorstore alone: one zarr array per leaf on an OCDBT
    store rooted at the uid directory, named "<key path joined by '.'>.", time axis allocated 10e12 long,
    the filled length in the int32 store "vault_index", and metadata.json with the leaf structure."""
    os.makedirs(uid_dir)
    base = "file://" + str(uid_dir)
    shapes, dtypes = {}, {}
    for name, arr in leaves.items():
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": base, "path": name + "."},
            "metadata": {"compressor": {"id": "gzip", "level": 5}},
        }
        store = ts.open(
            spec, shape=(arr.shape[0], int(10e12), *arr.shape[2:]), dtype=arr.dtype.name, create=True
        ).result()
        store[:, : arr.shape[1]].write(arr).result()
        node_s, node_d, *path = shapes, dtypes, *name.split(".")
        for p in path[:-1]:
            node_s, node_d = node_s.setdefault(p, {}), node_d.setdefault(p, {})
        node_s[path[-1]], node_d[path[-1]] = str((arr.shape[0], 5000, *arr.shape[2:])), arr.dtype.name
    vi = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": "vault_index"}},
        dtype=np.int32,
        shape=(1,),
        create=True,
    ).result()
    vi.write(vault_index).result()
    with open(os.path.join(uid_dir, "metadata.json"), "w") as f:
        json.dump({"version": 1.2, "structure_shape": shapes, "structure_dtype": dtypes}, f)


def tag_vault_leaves(B=2, T=75, extra=25, seed=0):
    """og-marl's OMAR simple_tag Vault: 4 agents, obs padded to 16 (the prey's 14 with -inf), state 64
    (the padded observations), 3 episodes of 25 steps: terminal, truncated, terminal; `extra` rows of
    junk past vault_index."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(B, T + extra, 4, 16)).astype(np.float32)
    obs[:, :, 3, 14:] = -np.inf
    term = np.zeros((B, T + extra, 4), np.float32)
    trunc = np.zeros((B, T + extra, 4), np.float32)
    term[:, [24, 74]] = 1.0
    trunc[:, 49] = 1.0
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, (B, T + extra, 4, 2)).astype(np.float32),
        "rewards": rng.normal(size=(B, T + extra, 4)).astype(np.float32),
        "terminals": term,
        "truncations": trunc,
        "infos.state": obs.reshape(B, T + extra, 64),
    }


def write_madiff(d, n_agents, obs_dim, lengths, end_discounts, act_dim=3, ids=True):
    """MADiff's npy: obs (sum T, n, n + obs) with one-hot ids first, actions, rewards (sum T, n),
    discounts (sum T, n), path_lengths (E,)."""
    os.makedirs(d)
    rng = np.random.default_rng(5)
    N = int(sum(lengths))
    obs = rng.normal(size=(N, n_agents, obs_dim)).astype(np.float32)
    disc = np.ones((N, n_agents), np.float32)
    disc[np.cumsum(lengths) - 1] = np.asarray(end_discounts, np.float32)[:, None]
    full = (
        np.concatenate([np.broadcast_to(np.eye(n_agents, dtype=np.float32), (N, n_agents, n_agents)), obs], 2)
        if ids
        else obs
    )
    data = {
        "obs": full,
        "actions": rng.uniform(-1, 1, (N, n_agents, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=(N, n_agents)).astype(np.float32),
        "discounts": disc,
        "path_lengths": np.asarray(lengths),
    }
    for k, v in data.items():
        np.save(os.path.join(d, f"{k}.npy"), v)
    return obs, data


# ---------------------------------------------------------------------------------------------
# OMAR
# ---------------------------------------------------------------------------------------------
def test_omar_spread_layout_seed_and_env_spec(tmp_path):
    write_omar(tmp_path, "simple_spread", "expert", 0, [18] * 3, n_eps=8, T=25)
    seed_dir, src = write_omar(tmp_path, "simple_spread", "expert", 1, [18] * 3, n_eps=8, T=25)
    qdir = os.path.join(tmp_path, "simple_spread", "expert")
    before = tree_state(tmp_path)
    assert detect_format(qdir) == detect_format(seed_dir) == "omar"
    a, m = load_published(qdir, dataset_seed=1, expect=env_spec("simple_spread"))
    for i in range(3):
        np.testing.assert_array_equal(a[f"obs_{i}"], src[f"obs_{i}"])
        np.testing.assert_array_equal(a[f"next_obs_{i}"], src[f"next_obs_{i}"])
        np.testing.assert_array_equal(a[f"actions_{i}"], src[f"acs_{i}"])
        np.testing.assert_array_equal(a[f"rewards_{i}"], src[f"rews_{i}"])
    assert a["obs_0"].dtype == np.float32 and a["terminals"].dtype == bool
    assert not a["terminals"].any()
    assert list(np.flatnonzero(a["truncations"])) == list(range(24, 200, 25))  # 25-step MPE episodes
    np.testing.assert_array_equal(a["state"], np.concatenate([src[f"obs_{i}"] for i in range(3)], 1))
    np.testing.assert_array_equal(a["next_state"][:, 18:36], src["next_obs_1"])
    assert (m["task"], m["quality"], m["dataset_seed"], m["source_format"]) == ("simple_spread", "expert", 1, "omar")
    assert (m["n_agents"], m["obs_dims"], m["act_dims"], m["state_dim"]) == (3, [18] * 3, [2] * 3, 54)
    assert (m["n_transitions"], m["n_episodes"]) == (200, 8)
    assert m["sha256"] == checksum(a)
    assert m["normalization"]["expert"] == PAPER_NORMALIZATION["simple_spread"]["expert"]
    team = np.mean([src[f"rews_{i}"] for i in range(3)], 0).reshape(8, 25).sum(1)
    assert m["episode_return"]["mean"] == pytest.approx(team.mean(), rel=1e-5)
    json.dumps(m)
    # the seed directory itself: that seed, whatever dataset_seed says
    b, m2 = load_published(seed_dir, dataset_seed=0)
    assert m2["sha256"] == m["sha256"] and m2["dataset_seed"] == 1
    c, _ = load_published(qdir)  # seed 0 is other data
    assert not np.array_equal(c["obs_0"], a["obs_0"])
    assert tree_state(tmp_path) == before


def test_converted_dataset_saves_and_loads_in_project_format(tmp_path):
    # the conversion is a valid project dataset: save it, load it back with the env's expectations
    qdir = os.path.dirname(write_omar(tmp_path, "simple_tag", "expert", 0, [16, 16, 16, 14], n_eps=4, T=25)[0])
    a, m = load_published(qdir)
    out = str(tmp_path / "converted.npz")
    save_dataset(out, a, m)
    b, m2 = load_dataset(out, expect=env_spec("simple_tag"))
    assert m2["sha256"] == m["sha256"] and m2["source_format"] == "omar"
    assert all(np.array_equal(a[k], b[k]) for k in a)
    load_dataset(out, expect={"obs_dims": (16, 16, 16), "state_dim": 62})  # a tuple means the same as a list
    with pytest.raises(DatasetError, match=r"state_dim=62 but the env needs state_dim=54"):
        load_dataset(out, expect=env_spec("simple_spread") | {"task": "simple_tag", "obs_dims": [16] * 3})


def test_omar_tag_prey_feeds_only_the_state(tmp_path):
    d, src = write_omar(tmp_path, "simple_tag", "medium", 0, [16, 16, 16, 14], n_eps=4, T=25)
    qdir = os.path.dirname(d)
    a, m = load_published(qdir, expect=env_spec("simple_tag"))
    assert m["n_agents"] == 3 and "obs_3" not in a and m["state_only_agents"] == [3]
    assert a["state"].shape == (100, 62) and m["state_dim"] == env_spec("simple_tag")["state_dim"]
    np.testing.assert_array_equal(a["state"][:, 48:], src["obs_3"])  # the prey's observation
    np.testing.assert_array_equal(a["next_state"][:, 48:], src["next_obs_3"])
    np.testing.assert_array_equal(a["rewards_2"], src["rews_2"])
    assert m["episode_return"]["mean"] == pytest.approx(src["rews_0"].reshape(4, 25).sum(1).mean(), rel=1e-5)
    assert m["normalization"]["random"] == PAPER_NORMALIZATION["simple_tag"]["random"]


def test_omar_halfcheetah_time_limit_and_states(tmp_path):
    # one early termination (done at row 29), then a 1000-step episode with done at its time limit
    seed_dir, src = write_omar(
        tmp_path, "HalfCheetah-v2", "expert", 0, [6, 6], n_eps=1, T=1030, act_dim=3, states=17, done_rows=(29, 1029)
    )
    a, m = load_published(seed_dir)
    assert list(np.flatnonzero(a["terminals"])) == [29]
    assert list(np.flatnonzero(a["truncations"])) == [1029]
    np.testing.assert_array_equal(a["state"], src["states_0"])
    np.testing.assert_array_equal(a["next_state"], src["next_states_0"])
    assert (m["task"], m["act_dims"], m["state_dim"]) == ("HalfCheetah-v2", [3, 3], 17)
    assert m["normalization"]["expert"] == 3568.81


@pytest.mark.parametrize(
    "damage,msg",
    [
        (lambda d: os.remove(os.path.join(d, "acs_1.npy")), r"missing acs_1\.npy"),
        (
            lambda d: [os.remove(os.path.join(d, f"{k}_2.npy")) for k in ("acs", "rews")],
            r"missing acs_2\.npy, rews_2\.npy",
        ),
        (lambda d: np.save(os.path.join(d, "rews_2.npy"), np.zeros(199, np.float32)), r"rews_2\.npy has 199 rows"),
        (
            lambda d: np.save(os.path.join(d, "dones_0.npy"), np.zeros((200, 2), np.float32)),
            r"dones_0\.npy has shape \(200, 2\)",
        ),
        (lambda d: _poke(os.path.join(d, "obs_1.npy"), 7, np.nan), r"obs_1\.npy: observation row 7 holds -inf/NaN"),
        (lambda d: _poke(os.path.join(d, "next_obs_0.npy"), 3, -np.inf), r"next_obs_0\.npy: observation row 3"),
        (lambda d: open(os.path.join(d, "obs_2.npy"), "wb").write(b"not numpy"), r"obs_2\.npy cannot be read"),
    ],
)
def test_omar_bad_files(tmp_path, damage, msg):
    d, _ = write_omar(tmp_path, "simple_spread", "expert", 0, [18] * 3, n_eps=8, T=25)
    damage(d)
    with pytest.raises(DatasetError, match=msg):
        load_published(d)


def _poke(path, row, value):
    a = np.load(path)
    a[row, 0] = value
    np.save(path, a)


def test_omar_wrong_seed_agents_and_env(tmp_path):
    d, _ = write_omar(tmp_path, "simple_spread", "expert", 0, [18] * 3, n_eps=2, T=25)
    qdir = os.path.dirname(d)
    with pytest.raises(DatasetError, match=r"seed_3_data does not exist.*holds seed_0_data"):
        load_published(qdir, dataset_seed=3)
    with pytest.raises(DatasetError, match="task=simple_spread but the env needs task=simple_tag"):
        load_published(qdir, expect=env_spec("simple_tag"))
    with pytest.raises(DatasetError, match=r"obs_dims=\[18, 18, 18\] but the env needs obs_dims=\[16, 16, 16\]"):
        load_published(qdir, expect={"obs_dims": [16, 16, 16]})
    with pytest.raises(DatasetError, match=r"simple_tag data must hold 4 agents.*found 3"):
        load_published(qdir, task="simple_tag")
    # a tag directory without the prey's files: 3 agents only
    d3, _ = write_omar(tmp_path, "simple_tag", "expert", 0, [16] * 3, n_eps=2, T=25)
    with pytest.raises(DatasetError, match="must hold 4 agents"):
        load_published(d3)


# ---------------------------------------------------------------------------------------------
# OMIGA
# ---------------------------------------------------------------------------------------------
def test_old_ant_actions_are_remapped_to_mamujoco_v1_joints(tmp_path):
    # the old port's agent 0 drove actuators 0-3 (hip4, ankle4, hip1, ankle1), agent 1 actuators 4-7;
    # mamujoco_v1's agent 0 drives hip1, ankle1, hip2, ankle2 = actuators 2-5, agent 1 actuators 6, 7, 0, 1
    p = str(tmp_path / "Ant-v2-2x4-expert.hdf5")
    src = write_omiga(p, obs_dim=5, n_agents=2, episode_rows=[20], act_dim=4)
    a, m = load_published(p)
    g = np.concatenate([src["a"][:20, 0], src["a"][:20, 1]], 1).astype(np.float32)  # the actuator vector
    np.testing.assert_array_equal(a["actions_0"], g[:, [2, 3, 4, 5]])
    np.testing.assert_array_equal(a["actions_1"], g[:, [6, 7, 0, 1]])
    assert "[[2, 3, 4, 5], [6, 7, 0, 1]]" in m["actions_remapped"]
    # HalfCheetah's slices agree between the two ports: nothing to remap
    q = str(tmp_path / "HalfCheetah-v2-6x1-expert.hdf5")
    src = write_omiga(q, obs_dim=5, n_agents=6, episode_rows=[20], act_dim=1)
    b, mb = load_published(q)
    np.testing.assert_array_equal(b["actions_3"], src["a"][:20, 3].astype(np.float32))
    assert "actions_remapped" not in mb


def test_omiga_transitions_and_ends(tmp_path):
    p = str(tmp_path / "Hopper-v2-3x1-medium.hdf5")
    src = write_omiga(p, obs_dim=14, n_agents=3, episode_rows=[1000, 6], cut_rows=4)  # 1001 + 7 + 4 rows
    before = tree_state(tmp_path)
    assert detect_format(p) == "omiga"
    a, m = load_published(p)
    t = np.r_[0:1000, 1001:1007, 1008:1011]  # rows with d == 0 and a next row
    assert m["n_transitions"] == len(t) == 1009
    for i in range(3):
        np.testing.assert_array_equal(a[f"obs_{i}"], src["o"][t, i].astype(np.float32))
        np.testing.assert_array_equal(a[f"next_obs_{i}"], src["o"][t + 1, i].astype(np.float32))
        np.testing.assert_array_equal(a[f"rewards_{i}"], src["r"][t, 0].astype(np.float32))
        np.testing.assert_array_equal(a[f"actions_{i}"], src["a"][t, i].astype(np.float32))
    np.testing.assert_array_equal(a["state"], src["s"][t, 0].astype(np.float32))
    np.testing.assert_array_equal(a["next_state"], src["s"][t + 1, 0].astype(np.float32))
    assert list(np.flatnonzero(a["terminals"])) == [1005]  # the 6-step episode
    assert list(np.flatnonzero(a["truncations"])) == [999, 1008]  # the 1000-step limit, the unfinished tail
    assert (m["task"], m["quality"], m["obs_dims"], m["act_dims"], m["state_dim"]) == (
        "Hopper-v2-3x1",
        "medium",
        [14] * 3,
        [1] * 3,
        14,
    )
    assert m["n_episodes"] == 3 and m["normalization"] is None
    json.dumps(m)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda f: f.__delitem__("d"), r"missing dataset\(s\) d"),
        (lambda f: (f.__delitem__("a"), f.create_dataset("a", data=np.zeros((20, 3, 1)))), r":a has 20 rows"),
        (lambda f: f["o"].__setitem__((5, 1, 0), np.nan), r":o: observation row 5 holds -inf/NaN"),
    ],
)
def test_omiga_bad_files(tmp_path, edit, msg):
    p = str(tmp_path / "Ant-v2-2x4-expert.hdf5")
    write_omiga(p, obs_dim=14, n_agents=3, episode_rows=[10, 10])
    with h5py.File(p, "a") as f:
        edit(f)
    with pytest.raises(DatasetError, match=msg):
        load_published(p)
    with pytest.raises(DatasetError, match="dataset_seed must be 0"):
        load_published(p, dataset_seed=2)


# ---------------------------------------------------------------------------------------------
# og-marl Vaults
# ---------------------------------------------------------------------------------------------
def test_ogmarl_tag_vault(tmp_path):
    vlt = tmp_path / "prior_work" / "omar" / "mpe" / "simple_tag.vlt"
    leaves = tag_vault_leaves()
    write_vault(vlt / "Expert", leaves, vault_index=75)
    before = tree_state(tmp_path)
    assert detect_format(str(vlt / "Expert")) == "ogmarl"
    a, m = load_published(str(vlt / "Expert"), dataset_seed=1, expect=env_spec("simple_tag"))
    obs, src = leaves["observations"][1], {k: v[1] for k, v in leaves.items()}
    rows = np.r_[0:49, 50:75]  # row 49 ends a truncated episode: its next observation is not stored
    assert m["n_transitions"] == 74 and m["n_episodes"] == 3
    for i in range(3):
        np.testing.assert_array_equal(a[f"obs_{i}"], obs[rows, i])
        np.testing.assert_array_equal(a[f"rewards_{i}"], src["rewards"][rows, i])
        np.testing.assert_array_equal(a[f"actions_{i}"], src["actions"][rows, i])
    np.testing.assert_array_equal(a["next_obs_0"][:24], obs[1:25, 0])
    np.testing.assert_array_equal(a["next_obs_0"][24], obs[24, 0])  # terminal: placeholder, never bootstrapped
    np.testing.assert_array_equal(a["next_obs_2"][48], obs[49, 2])  # new last row of the truncated episode
    assert list(np.flatnonzero(a["terminals"])) == [24, 73]
    assert list(np.flatnonzero(a["truncations"])) == [48]
    # state: the 4 unpadded observations, prey (14) last: the env's 62-dim layout, no -inf
    np.testing.assert_array_equal(a["state"][:, 48:], obs[rows, 3, :14])
    np.testing.assert_array_equal(a["next_state"][10, :16], obs[11, 0])
    assert (m["task"], m["quality"], m["dataset_seed"], m["state_dim"]) == ("simple_tag", "Expert", 1, 62)
    assert m["normalization"]["expert"] == PAPER_NORMALIZATION["simple_tag"]["expert"]
    json.dumps(m)
    b, _ = load_published(str(vlt / "Expert"), dataset_seed=0)
    assert not np.array_equal(a["obs_0"], b["obs_0"])
    assert tree_state(tmp_path) == before


def test_ogmarl_mamujoco_vault_state_per_agent_and_cut(tmp_path):
    # OMAR HalfCheetah re-hosted: infos.state (B, T, N, 17); one terminal episode, then data that stop mid-episode
    rng = np.random.default_rng(2)
    T = 40
    term = np.zeros((1, T, 2), bool)
    term[0, 14] = True
    state = np.repeat(rng.normal(size=(1, T, 1, 17)).astype(np.float32), 2, axis=2)
    leaves = {
        "observations": rng.normal(size=(1, T, 2, 6)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (1, T, 2, 3)).astype(np.float32),
        "rewards": rng.normal(size=(1, T, 2)).astype(np.float32),
        "terminals": term,
        "truncations": np.zeros((1, T, 2), bool),
        "infos.state": state,
    }
    uid = tmp_path / "prior_work" / "omar" / "mamujoco" / "2halfcheetah.vlt" / "Medium"
    write_vault(uid, leaves, vault_index=T)
    a, m = load_published(str(uid))
    assert m["n_transitions"] == T - 1  # the last row has no next observation
    assert list(np.flatnonzero(a["terminals"])) == [14] and list(np.flatnonzero(a["truncations"])) == [T - 2]
    np.testing.assert_array_equal(a["state"], state[0, : T - 1, 0])
    np.testing.assert_array_equal(a["next_obs_1"][20], leaves["observations"][0, 21, 1])
    assert m["normalization"]["expert"] == 3568.81  # OMAR's HalfCheetah, not og-marl's own 2halfcheetah
    json.dumps(m)
    # og-marl's newer data on today's simulator: its v0 reference scores do not apply
    write_vault(tmp_path / "core" / "gymnasium_mamujoco" / "2halfcheetah.vlt" / "Good", leaves, vault_index=T)
    _, m2 = load_published(str(tmp_path / "core" / "gymnasium_mamujoco" / "2halfcheetah.vlt" / "Good"))
    assert m2["normalization"] is None and m2["sha256"] == m["sha256"]


def _vault_damage_inf(leaves):
    leaves["observations"][:, 5, 3, 2] = -np.inf  # inside the prey's real observation


def _vault_damage_nan(leaves):
    leaves["observations"][:, 9, 0, 15] = np.nan


def test_ogmarl_bad_vaults(tmp_path):
    for name, damage, msg in [
        ("inf", _vault_damage_inf, r"agent 3 after removing the -inf padding: observation row 5"),
        ("nan", _vault_damage_nan, r"agent 0 after removing the -inf padding: observation row 9"),
    ]:
        leaves = tag_vault_leaves()
        damage(leaves)
        write_vault(tmp_path / name / "simple_tag.vlt" / "Expert", leaves, vault_index=75)
        with pytest.raises(DatasetError, match=msg):
            load_published(str(tmp_path / name / "simple_tag.vlt" / "Expert"))
    leaves = tag_vault_leaves()
    del leaves["terminals"]
    write_vault(tmp_path / "noterm" / "simple_tag.vlt" / "Expert", leaves, vault_index=75)
    with pytest.raises(DatasetError, match="the Vault has no terminals"):
        load_published(str(tmp_path / "noterm" / "simple_tag.vlt" / "Expert"))
    good = tmp_path / "good" / "simple_tag.vlt"
    write_vault(good / "Expert", tag_vault_leaves(), vault_index=75)
    with pytest.raises(DatasetError, match=r"dataset_seed 5 does not exist; this Vault holds seeds 0\.\.1"):
        load_published(str(good / "Expert"), dataset_seed=5)
    with pytest.raises(DatasetError, match=r"holding the datasets Expert; give the path of one of them"):
        load_published(str(good))  # the .vlt directory, not a uid
    with pytest.raises(DatasetError, match=r"n_agents=3 but the env needs n_agents=2"):
        load_published(str(good / "Expert"), expect={"n_agents": 2})
    os.remove(good / "Expert" / "manifest.ocdbt")
    with pytest.raises(DatasetError, match=r"Expert is in no known published dataset layout"):
        load_published(str(good / "Expert"))
    with pytest.raises(DatasetError, match=r"cannot open the Vault's 'vault_index' store"):
        load_published(str(good / "Expert"), fmt="ogmarl")


# ---------------------------------------------------------------------------------------------
# MADiff / DoF
# ---------------------------------------------------------------------------------------------
def test_madiff_ids_stripped_and_ends(tmp_path):
    d = str(tmp_path / "mamujoco" / "2halfcheetah" / "Good")
    obs, src = write_madiff(d, n_agents=2, obs_dim=13, lengths=[10, 20, 15], end_discounts=[0, 1, 0])
    before = tree_state(tmp_path)
    assert detect_format(d) == "madiff"
    a, m = load_published(d)
    rows = np.r_[0:29, 30:45]  # row 29 ends the truncated episode
    assert m["n_transitions"] == 44 and m["obs_dims"] == [13, 13]
    for i in range(2):
        np.testing.assert_array_equal(a[f"obs_{i}"], obs[rows, i])
        np.testing.assert_array_equal(a[f"rewards_{i}"], src["rewards"][rows, i])
        np.testing.assert_array_equal(a[f"actions_{i}"], src["actions"][rows, i])
    np.testing.assert_array_equal(a["next_obs_1"][:9], obs[1:10, 1])
    np.testing.assert_array_equal(a["next_obs_1"][28], obs[29, 1])
    assert list(np.flatnonzero(a["terminals"])) == [9, 43]
    assert list(np.flatnonzero(a["truncations"])) == [28]
    np.testing.assert_array_equal(a["state"], obs[rows].reshape(44, 26))
    assert (m["task"], m["quality"]) == ("2halfcheetah", "Good")
    assert m["normalization"]["expert"] == 9132.25
    assert tree_state(tmp_path) == before
    json.dumps(m)
    # without discounts.npy: episodes shorter than the 1000-step limit are terminal
    os.remove(os.path.join(d, "discounts.npy"))
    b, _ = load_published(d)
    assert list(np.flatnonzero(b["terminals"])) == [9, 29, 44] and not b["truncations"].any()


def test_madiff_bad_files(tmp_path):
    d = str(tmp_path / "a" / "2ant" / "Poor")
    write_madiff(d, 2, 13, [10, 20], [0, 0], ids=False)
    with pytest.raises(DatasetError, match="are not the one-hot agent ids MADiff prepends"):
        load_published(d)
    d = str(tmp_path / "b" / "2ant" / "Poor")
    write_madiff(d, 2, 13, [10, 20], [0, 0])
    np.save(os.path.join(d, "path_lengths.npy"), np.array([10, 25]))
    with pytest.raises(DatasetError, match=r"path_lengths\.npy: the episode lengths add up to 35 but obs\.npy has 30"):
        load_published(d)
    np.save(os.path.join(d, "path_lengths.npy"), np.array([10, 20]))
    np.save(os.path.join(d, "rewards.npy"), np.zeros((29, 2), np.float32))
    with pytest.raises(DatasetError, match=r"rewards\.npy has 29 rows"):
        load_published(d)
    os.remove(os.path.join(d, "path_lengths.npy"))
    with pytest.raises(DatasetError, match=r"missing path_lengths\.npy"):
        load_published(d, fmt="madiff")


# ---------------------------------------------------------------------------------------------
# Layout detection, missing packages
# ---------------------------------------------------------------------------------------------
def test_unknown_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for p in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(
            DatasetError,
            match=r"no known published dataset layout; expected one of: omar: .*omiga: .*ogmarl: .*madiff: ",
        ):
            detect_format(str(p))
    with pytest.raises(DatasetError, match="does not exist"):
        load_published(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="unknown dataset format 'd4rl'"):
        load_published(str(tmp_path / "empty"), fmt="d4rl")
    with pytest.raises(DatasetError, match=r"notes\.txt is a file, but the omar layout is <root>/<task>/<quality>"):
        load_published(str(tmp_path / "notes.txt"), fmt="omar")
    with pytest.raises(DatasetError, match=r"empty is a directory, but the omiga layout is one .*\.hdf5 file"):
        load_published(str(tmp_path / "empty"), fmt="omiga")
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes.txt"]


def test_missing_optional_packages(tmp_path, monkeypatch):
    p = str(tmp_path / "Hopper-v2-3x1-expert.hdf5")
    write_omiga(p, 14, 3, [10])
    write_vault(tmp_path / "s.vlt" / "Expert", tag_vault_leaves(extra=0), vault_index=75)
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(DatasetError, match=r"needs the h5py package: pip install h5py"):
        load_published(p)
    with pytest.raises(DatasetError, match=r"needs the tensorstore package: pip install tensorstore"):
        load_published(str(tmp_path / "s.vlt" / "Expert"))


# ---------------------------------------------------------------------------------------------
# The training script on published layouts (tiny settings)
# ---------------------------------------------------------------------------------------------
TINY = [
    "--diffusion-steps",
    "10",
    "--critic-steps",
    "10",
    "--policy-steps",
    "10",
    "--eval-every",
    "10",
    "--eval-episodes",
    "1",
    "--diffusion-hidden",
    "16",
    "--critic-hidden",
    "16",
    "--actor-hidden",
    "16",
    "--diffusion-batch-size",
    "16",
    "--critic-batch-size",
    "16",
    "--policy-batch-size",
    "16",
    "--threads",
    "1",
]


def _train(cwd, *args):
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "oma_sd_mpe.py"), *TINY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r


@pytest.mark.parametrize("layout", ["omar", "ogmarl", "madiff"])
def test_oma_sd_mpe_trains_on_published_layouts(tmp_path, layout):
    data = tmp_path / "data"
    if layout == "omar":  # the quality directory; --dataset-seed picks seed_1_data
        write_omar(data, "simple_spread", "expert", 0, [18] * 3, n_eps=8, T=25)
        write_omar(data, "simple_spread", "expert", 1, [18] * 3, n_eps=8, T=25)
        env_id, path, extra = "simple_spread", data / "simple_spread" / "expert", ["--dataset-seed", "1"]
    elif layout == "ogmarl":
        path = data / "prior_work" / "omar" / "mpe" / "simple_tag.vlt" / "Expert"
        write_vault(path, tag_vault_leaves(), vault_index=75)
        env_id, extra = "simple_tag", []
    else:
        path = data / "mpe" / "simple_spread" / "expert"
        write_madiff(str(path), n_agents=3, obs_dim=18, lengths=[25] * 6, end_discounts=[1] * 6, act_dim=2)
        env_id, extra = "simple_spread", []  # detected by its obs.npy and path_lengths.npy
    before = tree_state(data)
    r = _train(tmp_path, "--env-id", env_id, "--dataset-path", str(path), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    res_path = tmp_path / r.stdout.strip().splitlines()[-1].split("-> ")[-1]
    res = json.loads(res_path.read_text())
    assert res["dataset_path"] == f"{path} ({layout})" and res["env_id"] == env_id
    assert np.isfinite(res["final_return"]) and [h["step"] for h in res["eval_history"]] == [0, 10]
    assert tree_state(data) == before  # nothing written into the user's dataset folder


def test_oma_sd_mpe_rejects_published_data_of_another_env(tmp_path):
    write_omar(tmp_path / "data", "simple_spread", "expert", 0, [18] * 3, n_eps=8, T=25)
    r = _train(
        tmp_path, "--env-id", "simple_tag", "--dataset-path", str(tmp_path / "data" / "simple_spread" / "expert")
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "simple_tag data must hold 4 agents" in errors[0] and not (tmp_path / "runs").exists()


def test_oma_sd_mamujoco_trains_on_an_ogmarl_vault_made_on_mamujoco_v1(tmp_path):
    # og-marl's gymnasium_mamujoco data come from today's mamujoco_v1 (agent_obsk=1): HalfCheetah 2x3 shapes
    rng = np.random.default_rng(4)
    T = 60
    term = np.zeros((1, T, 2), bool)
    leaves = {
        "observations": rng.normal(size=(1, T, 2, 12)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (1, T, 2, 3)).astype(np.float32),
        "rewards": np.repeat(rng.normal(size=(1, T, 1)), 2, axis=2).astype(np.float32),
        "terminals": term,
        "truncations": np.zeros((1, T, 2), bool),
        "infos.state": np.repeat(rng.normal(size=(1, T, 1, 17)), 2, axis=2).astype(np.float32),
    }
    uid = tmp_path / "data" / "core" / "gymnasium_mamujoco" / "2halfcheetah.vlt" / "Good"
    write_vault(uid, leaves, vault_index=T)
    before = tree_state(tmp_path / "data")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "oma_sd_mamujoco.py"),
            *TINY,
            "--eval-episodes",
            "1",
            "--env-id",
            "HalfCheetah-2x3",
            "--dataset-path",
            str(uid),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / r.stdout.strip().splitlines()[-1].split("-> ")[-1]).read_text())
    assert res["dataset_path"] == f"{uid} (ogmarl)" and res["eval_history"][-1]["episode_lengths"] == [1000]
    assert tree_state(tmp_path / "data") == before


def test_oma_sd_mamujoco_refuses_omiga_data_of_the_old_port(tmp_path):
    # OMIGA's Hopper observations are the 11-d state plus a one-hot id (14), mamujoco_v1's are 8, 9, 8
    p = str(tmp_path / "Hopper-v2-3x1-expert.hdf5")
    write_omiga(p, obs_dim=14, n_agents=3, episode_rows=[30])
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "oma_sd_mamujoco.py"),
            *TINY,
            "--env-id",
            "Hopper-3x1",
            "--dataset-path",
            p,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "obs_dims=[14, 14, 14] but the env needs obs_dims=[8, 9, 8]" in errors[0]
    assert not (tmp_path / "runs").exists()
