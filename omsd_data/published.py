"""Loaders for the published offline-MARL datasets, converted to the project's layout (omsd_data/dataset.py).

    arrays, meta = load_published("data/simple_spread/expert", task="simple_spread",
                                  expect=env_spec("simple_spread"))

Formats (layouts and what each loader checks: docs/datasets.md, "Published datasets"):
  omar    OMAR's npy files (MPE spread/tag/world, 2-agent HalfCheetah); also what MADiff/DoF read for MPE
  omiga   OMIGA's MaMuJoCo hdf5 files
  ogmarl  og-marl / flashbax Vaults (read with tensorstore alone, no JAX/TF/flashbax)
  madiff  MADiff/DoF npy files converted from og-marl's MaMuJoCo data

Conventions shared by all formats:
- Rows are transitions t -> t+1 in episode order; `next_obs_<i>` is the observation after the action.
- An episode ends in `terminals` (no bootstrap) or `truncations` (time limit: bootstrap from next_obs).
  When the source does not say which, an episode that reached the env's time limit (25 steps for MPE,
  1000 for MaMuJoCo) is a truncation and an earlier end is terminal.
- Sources that store steps without next observations (og-marl, MADiff) take next_obs from the next row.
  The last row of a *terminal* episode keeps its own observation as a placeholder next_obs (it is never
  bootstrapped from); the last row of a *truncated* episode has no usable next observation, so it is
  dropped and the row before it becomes the truncation (one transition per truncated episode is lost).
- `state`: the source's global state when it has one (agent 0's copy when it stores one per agent);
  otherwise, and always for the MPE tasks, the concatenation of all agents' observations, the prey's
  included, which is exactly the layout of `MPEEnv.state()`.
- In simple_tag / simple_world the sources hold 4 agents, the 4th being the fixed prey: the 3 predators
  become agents 0..2, the prey's observations only feed `state`.
- Nothing is ever written next to the source files.

OMAR's pretrained prey (tag/world), the opponent of its MPE data, is an environment part: envs/omar_prey.py.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from envs.mpe import EPISODE_LEN, PAPER_NORMALIZATION, TASKS, paper_metric
from omsd_data.dataset import (
    FORMAT,
    FORMAT_VERSION,
    DatasetError,
    check_expect,
    checksum,
    dataset_spec,
    episode_ends,
    episode_returns,
    return_stats,
    validate,
)

FORMATS = ("omar", "omiga", "ogmarl", "madiff")
LAYOUTS = {
    "omar": "<root>/<task>/<quality>/seed_<k>_data/{obs,acs,rews,next_obs,dones}_<i>.npy "
    "(give the <quality> or a seed_<k>_data directory)",
    "omiga": "one <Scenario>-v2-<conf>-<quality>.hdf5 file with datasets s, o, a, r, d",
    "ogmarl": "a Vault directory <scenario>.vlt/<uid>/ holding metadata.json and manifest.ocdbt",
    "madiff": "<task>/<quality>/{obs,actions,rewards,path_lengths}.npy (MADiff/DoF)",
}
MUJOCO_TIME_LIMIT = 1000
PREY_TASKS = ("simple_tag", "simple_world")  # the last agent of the file is the fixed prey
OMAR_KEYS = ("obs", "acs", "rews", "next_obs", "dones")
OMAR_MUJOCO = "HalfCheetah-v2"
# Known reference returns: normalised score = 100 (R - random) / (expert - random).
NORMALIZATION = {
    **{t: dict(c, source="OMSD paper (envs/mpe.py PAPER_NORMALIZATION)") for t, c in PAPER_NORMALIZATION.items()},
    OMAR_MUJOCO: {"expert": 3568.81, "random": -283.97, "source": "OMSD paper, OMAR 2-agent HalfCheetah"},
    # og-marl's v0 MaMuJoCo datasets (what MADiff's npy files and og-marl's og_marl/mamujoco Vaults hold)
    "2halfcheetah": {"expert": 9132.25, "random": -280.18, "source": "og-marl v0 scores module"},
    "2ant": {"expert": 3362.44, "random": -325.6, "source": "og-marl v0 scores module"},
    "4ant": {"expert": 3224.91, "random": -325.6, "source": "og-marl v0 scores module"},
}


def detect_format(path: str) -> str:
    """Which published layout `path` is in (see LAYOUTS); DatasetError if none."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path} does not exist; check the dataset path")
    if os.path.isfile(path):
        if path.endswith((".hdf5", ".h5")):
            return "omiga"
    else:
        names = set(os.listdir(path))
        if "metadata.json" in names and "manifest.ocdbt" in names:
            return "ogmarl"
        if path.endswith(".vlt") or any(os.path.isfile(os.path.join(path, n, "manifest.ocdbt")) for n in names):
            return "ogmarl"  # a vault holding several uids: the loader asks for one
        if {"obs.npy", "path_lengths.npy"} <= names:
            return "madiff"
        if "obs_0.npy" in names or any(re.fullmatch(r"seed_\d+_data", n) for n in names):
            return "omar"
    raise DatasetError(
        f"{path} is in no known published dataset layout; expected one of: "
        + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    )


def load_published(
    path: str, fmt: str | None = None, *, dataset_seed: int = 0, task: str | None = None, expect: dict | None = None
) -> tuple[dict, dict]:
    """Load a published dataset into the project's layout; returns (arrays, meta).

    fmt: one of FORMATS, detected from the layout when None.
    dataset_seed: which of the source's dataset seeds to use: k of OMAR's seed_<k>_data when `path` is
      the quality directory (when `path` is a seed directory, that one is used and dataset_seed is
      ignored); the row of a Vault's leading axis (5 seeds in og-marl's OMAR Vaults). OMIGA and MADiff
      files hold one dataset, so it must be 0 there.
    task: the task name; when None it is taken from the path (OMAR's task directory, the Vault's
      scenario, MADiff's task directory, OMIGA's file name), else from expect["task"]. It decides the
      MPE conventions (prey, 25-step episodes, state layout) and the normalisation constants.
    expect: what the env needs, as in `omsd_data.dataset.load_dataset` (e.g. `omsd_data.mpe_data.env_spec(task)`).

    Per-format assumptions:
    - omar: rows are transitions with OMAR's own next_obs. MPE never terminates: an episode is every
      25 rows, ending in truncation (dones are practically always 0; a set done before the limit would
      be a terminal). HalfCheetah sets done at the 1000-step limit: a truncation. State: MPE, all
      agents' observations (prey included); HalfCheetah, agent 0's `states_0.npy` (all agents store the
      same 17-dim full observation).
    - omiga: as OMIGA's loader, row t with d[t] == 0 (and t < N-1) becomes the transition to row t+1,
      and d[t+1] == 1 ends the episode (the 1001st row of an episode is only its final observation).
      Unlike OMIGA (which treats all ends as terminal), an episode that reached 1000 transitions is a
      truncation. The team reward r is every agent's reward; state = agent 0's copy of s.
    - ogmarl: the Vault's experience rows [0, vault_index) of seed row `dataset_seed`; an episode ends
      where all agents' terminal or truncation flags are set (terminal if any agent's terminal flag is).
      Observations padded with -inf (the prey in tag/world) are cut back to their real width. The flags
      are taken as stored: if a Vault marks MPE's 25th step terminal rather than truncated, so does
      the result. Steps carry no next observation (see the module docstring for the last rows).
    - madiff: episodes are the consecutive `path_lengths` blocks; one ending with discount 0
      (`discounts.npy`) is terminal, otherwise truncated (without discounts.npy: truncated if it
      reached 1000 steps). The one-hot agent ids MADiff prepends to obs are checked and stripped.
      State: `states.npy` when present, else all agents' observations.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise DatasetError(f"{path} does not exist; check the dataset path")
    if (fmt == "omiga") != os.path.isfile(path):
        raise DatasetError(
            f"{path} is a {'file' if os.path.isfile(path) else 'directory'}, but the {fmt} layout is {LAYOUTS[fmt]}"
        )
    if fmt in ("omiga", "madiff") and dataset_seed != 0:
        raise DatasetError(f"{path}: {fmt} files hold one dataset, so dataset_seed must be 0 (got {dataset_seed})")
    loader = {"omar": _load_omar, "omiga": _load_omiga, "ogmarl": _load_vault, "madiff": _load_madiff}[fmt]
    arrays, info = loader(os.path.normpath(path), dataset_seed, task or None, (expect or {}).get("task"))
    validate(arrays, path)
    if _old_stack_ant(path, fmt, arrays):
        info["actions_remapped"] = _remap_old_ant_actions(arrays)
    task, norm_key = info["task"], info.pop("normalization_key", info["task"])
    metric_name, metric = (
        ("paper (spread: mean over agents; tag/world: predator 0)", lambda r: paper_metric(task, r))
        if task in TASKS
        else ("agent 0's return (team reward)", lambda r: float(r[:, 0].sum()))
    )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_format": fmt,
        "source_path": os.path.abspath(path),
        "env_family": "mpe" if task in TASKS else None,
        **info,
        "n_transitions": int(len(arrays["obs_0"])),
        "n_episodes": int(len(episode_ends(arrays))),
        **{k: v for k, v in dataset_spec(arrays, task).items() if k != "task"},
        "episode_return": return_stats(episode_returns(arrays, metric), metric_name),
        "normalization": NORMALIZATION.get(norm_key),
        "sha256": checksum(arrays),
    }
    check_expect(dataset_spec(arrays, task), expect, path)
    return arrays, meta


# ---------------------------------------------------------------------------------------------
# Ant data from the old MaMuJoCo port
# ---------------------------------------------------------------------------------------------
OLD_ANT_CONFS = {(2, 4): "2x4", (4, 2): "4x2"}  # (agents, action size) -> partition


def _old_stack_ant(path: str, fmt: str, arrays: dict) -> bool:
    """Ant data made with the old MaMuJoCo port (OMIGA's Ant-v2 files, og-marl's 2ant/4ant, MADiff's copies
    of them); og-marl's gymnasium_mamujoco data come from mamujoco_v1 already."""
    p = path.lower().replace(os.sep, "/")
    n = sum(1 for k in arrays if k.startswith("actions_"))
    return (
        fmt in ("omiga", "ogmarl", "madiff")
        and "gymnasium_mamujoco" not in p
        and re.search(r"(^|[/_-])(ant-v2|2ant|4ant)", p) is not None
        and (n, arrays["actions_0"].shape[1]) in OLD_ANT_CONFS
    )


def _remap_old_ant_actions(arrays: dict) -> str:
    """The old port concatenated the agents' actions in agent order into Ant's actuator vector (hip4, ankle4,
    hip1, ankle1, ...); mamujoco_v1 gives each agent the actuators of its own joints. Rebuild the actuator
    vector, then split it the mamujoco_v1 way, so that each agent's actions drive the joints they drove."""
    from envs.mamujoco import mamujoco_v1  # MuJoCo is only needed here

    n = sum(1 for k in arrays if k.startswith("actions_"))
    conf = OLD_ANT_CONFS[(n, arrays["actions_0"].shape[1])]
    env = mamujoco_v1.parallel_env("Ant", conf, agent_obsk=1)
    local = env.map_global_action_to_local_actions(np.arange(n * arrays["actions_0"].shape[1], dtype=np.float64))
    g = np.concatenate([arrays[f"actions_{i}"] for i in range(n)], 1)
    for i, a in enumerate(env.possible_agents):
        arrays[f"actions_{i}"] = np.ascontiguousarray(g[:, local[a].astype(int)])
    env.close()
    return (
        f"old MaMuJoCo Ant {conf} partition -> mamujoco_v1 (agent i gets actuator ids "
        f"{[local[a].astype(int).tolist() for a in env.possible_agents]})"
    )


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _pack(obs, acts, rews, next_obs, terminals, truncations, state, next_state) -> dict:
    """Per-agent lists -> the project's arrays with its dtypes."""
    out = {
        "terminals": np.asarray(terminals, bool),
        "truncations": np.asarray(truncations, bool),
        "state": np.asarray(state, np.float32),
        "next_state": np.asarray(next_state, np.float32),
    }
    for i in range(len(obs)):
        out[f"obs_{i}"] = np.asarray(obs[i], np.float32)
        out[f"actions_{i}"] = np.asarray(acts[i], np.float32).reshape(len(obs[i]), -1)
        out[f"rewards_{i}"] = np.asarray(rews[i], np.float32)
        out[f"next_obs_{i}"] = np.asarray(next_obs[i], np.float32)
    return out


def _controlled(task: str | None, n_file: int, where: str) -> int:
    """How many of the file's agents are the project's agents (all but the prey in tag/world)."""
    if task in PREY_TASKS:
        if n_file != 4:
            raise DatasetError(
                f"{where}: {task} data must hold 4 agents (3 predators, then the prey), found {n_file}; "
                f"check the path or the task"
            )
        return 3
    return n_file


def _ends_with_limit(done: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(terminals, truncations) of rows that carry their own next_obs, from done flags plus the time limit.

    An episode is cut every `limit` rows (a truncation, also when done is set there: that done is the
    time limit); a done before that is a terminal; the file's last row ends a (truncated) episode.
    """
    N = len(done)
    terminals, truncations = np.zeros(N, bool), np.zeros(N, bool)
    start = 0
    for d in [*np.flatnonzero(done), N - 1]:
        if d < start:
            continue
        if limit:
            truncations[np.arange(start + limit - 1, d + 1, limit)] = True
        if not truncations[d]:
            terminals[d], truncations[d] = bool(done[d]), not done[d]
        start = d + 1
    return terminals, truncations


def _step_rows(term_end: np.ndarray, trunc_end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For sources storing steps without next observations (row t+1 is the next step of row t).

    Returns (rows kept, row of each kept row's next observation, terminals, truncations); see the module
    docstring for why truncated episodes lose their last row.
    """
    term_end, trunc_end = term_end.copy(), trunc_end.copy()
    if not (term_end[-1] or trunc_end[-1]):
        trunc_end[-1] = True  # the data stop mid-episode
    keep = ~trunc_end
    rows = np.flatnonzero(keep)
    nxt = np.where(term_end[rows], rows, rows + 1)  # terminal: own obs as placeholder (never bootstrapped)
    truncations = ~term_end[rows] & trunc_end[np.minimum(rows + 1, len(keep) - 1)]
    return rows, nxt, term_end[rows], truncations


def _from_steps(obs, acts, rews, term_end, trunc_end, state, n_ctrl) -> dict:
    rows, nxt, terminals, truncations = _step_rows(term_end, trunc_end)
    return _pack(
        [o[rows] for o in obs[:n_ctrl]],
        [a[rows] for a in acts[:n_ctrl]],
        [r[rows] for r in rews[:n_ctrl]],
        [o[nxt] for o in obs[:n_ctrl]],
        terminals,
        truncations,
        state[rows],
        state[nxt],
    )


def _npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(
            f"{path} cannot be read as a numpy array ({type(e).__name__}: {e}); download it again"
        ) from None


def _rows(a: np.ndarray, n: int, where: str) -> np.ndarray:
    if len(a) != n:
        raise DatasetError(
            f"{where} has {len(a)} rows but the observations have {n}; the arrays are "
            f"from different datasets or cut short, download them again"
        )
    return a


def _flat(a: np.ndarray, n: int, where: str) -> np.ndarray:
    """(n,) or (n, 1) -> (n,)."""
    if a.size != n:
        raise DatasetError(f"{where} has shape {a.shape}, expected ({n},) like the other arrays; download it again")
    return a.reshape(n)


def _finite_obs(a: np.ndarray, where: str) -> np.ndarray:
    bad = ~np.isfinite(a).reshape(len(a), -1).all(1)
    if bad.any():
        raise DatasetError(
            f"{where}: observation row {int(np.flatnonzero(bad)[0])} holds -inf/NaN; "
            f"the file is damaged or padded in an unknown way, download it again"
        )
    return a


# ---------------------------------------------------------------------------------------------
# OMAR npy
# ---------------------------------------------------------------------------------------------
def _omar_seed_dir(path: str, dataset_seed: int) -> tuple[str, int]:
    """The seed_<k>_data directory to read and its k."""
    m = re.fullmatch(r"seed_(\d+)_data", os.path.basename(path))
    if m:
        return path, int(m.group(1))
    if os.path.isfile(os.path.join(path, "obs_0.npy")):  # a seed directory under another name
        return path, dataset_seed
    seed_dir = os.path.join(path, f"seed_{dataset_seed}_data")
    if not os.path.isdir(seed_dir):
        have = sorted(n for n in os.listdir(path) if re.fullmatch(r"seed_\d+_data", n))
        raise DatasetError(
            f"{seed_dir} does not exist (dataset seed {dataset_seed}); this directory holds "
            f"{', '.join(have) or 'no seed_<k>_data directory'}"
        )
    return seed_dir, dataset_seed


def _load_omar(path, dataset_seed, task, expect_task):
    seed_dir, seed = _omar_seed_dir(path, dataset_seed)
    quality_dir = os.path.dirname(seed_dir) if re.fullmatch(r"seed_\d+_data", os.path.basename(seed_dir)) else None
    guess = os.path.basename(os.path.dirname(quality_dir)) if quality_dir else None
    task = task or (guess if guess in (*TASKS, OMAR_MUJOCO) else None) or expect_task
    files = set(os.listdir(seed_dir))
    idx = [int(m.group(1)) for f in files if (m := re.fullmatch(r"obs_(\d+)\.npy", f))]
    if not idx:
        raise DatasetError(f"{seed_dir}: no obs_<i>.npy files; expected {LAYOUTS['omar']}")
    n_file = max(idx) + 1
    missing = [f"{k}_{i}.npy" for i in range(n_file) for k in OMAR_KEYS if f"{k}_{i}.npy" not in files]
    if missing:
        raise DatasetError(
            f"{seed_dir}: missing {', '.join(missing)} (agents 0..{n_file - 1} each need "
            f"{', '.join(k + '_<i>.npy' for k in OMAR_KEYS)}); download the dataset again"
        )
    n_ctrl = _controlled(task, n_file, seed_dir)
    f = lambda k, i: os.path.join(seed_dir, f"{k}_{i}.npy")  # noqa: E731
    N = len(_npy(f("obs", 0)))
    d = {k: [_rows(_npy(f(k, i)), N, f(k, i)) for i in range(n_file)] for k in OMAR_KEYS}
    for k in ("obs", "next_obs"):
        d[k] = [_finite_obs(a.reshape(N, -1), f(k, i)) for i, a in enumerate(d[k])]
    d["rews"] = [_flat(a, N, f("rews", i)) for i, a in enumerate(d["rews"])]
    dones = np.stack([_flat(a, N, f("dones", i)) for i, a in enumerate(d["dones"])], 1)
    limit = EPISODE_LEN if task in TASKS else MUJOCO_TIME_LIMIT if task == OMAR_MUJOCO else 0
    terminals, truncations = _ends_with_limit(dones.all(1) > 0, limit)
    if os.path.isfile(f("states", 0)) and task not in TASKS:
        if not os.path.isfile(f("next_states", 0)):
            raise DatasetError(f"{seed_dir}: states_0.npy without next_states_0.npy; download the dataset again")
        state, next_state = (
            _rows(_npy(f("states", 0)), N, f("states", 0)),
            _rows(_npy(f("next_states", 0)), N, f("next_states", 0)),
        )
    else:
        state, next_state = np.concatenate(d["obs"], 1), np.concatenate(d["next_obs"], 1)
    arrays = _pack(
        d["obs"][:n_ctrl],
        d["acs"][:n_ctrl],
        d["rews"][:n_ctrl],
        d["next_obs"][:n_ctrl],
        terminals,
        truncations,
        state,
        next_state,
    )
    info = {
        "task": task,
        "quality": os.path.basename(quality_dir) if quality_dir else None,
        "dataset_seed": seed,
        "source_agents": n_file,
        "state_only_agents": list(range(n_ctrl, n_file)),
    }
    return arrays, info


# ---------------------------------------------------------------------------------------------
# OMIGA hdf5
# ---------------------------------------------------------------------------------------------
def _load_omiga(path, dataset_seed, task, expect_task):
    try:
        import h5py
    except ImportError:
        raise DatasetError("reading OMIGA's hdf5 datasets needs the h5py package: pip install h5py") from None
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("s", "o", "a", "r", "d") if k not in f]
            if missing:
                raise DatasetError(f"{path}: missing dataset(s) {', '.join(missing)}; expected {LAYOUTS['omiga']}")
            s, o, a, r, d = (np.asarray(f[k]) for k in ("s", "o", "a", "r", "d"))
    except OSError as e:
        raise DatasetError(f"{path} cannot be read as an hdf5 file ({e}); download it again") from None
    N = len(o)
    if o.ndim != 3 or a.ndim != 3 or s.ndim != 3:
        raise DatasetError(f"{path}: o, a and s must be (rows, agents, dim), got {o.shape}, {a.shape}, {s.shape}")
    for k, v in (("s", s), ("a", a), ("r", r), ("d", d)):
        _rows(v, N, f"{path}:{k}")
    if a.shape[1] != o.shape[1]:
        raise DatasetError(f"{path}: a has {a.shape[1]} agents but o has {o.shape[1]}; the file is damaged")
    _finite_obs(o, f"{path}:o")
    d0, r = d.reshape(N, -1)[:, 0] > 0, r.reshape(N, -1)[:, 0]
    t = np.flatnonzero(~d0[:-1])  # OMIGA's rule: rows with d == 0 that have a next row
    terminals, truncations = _ends_with_limit(d0[t + 1], MUJOCO_TIME_LIMIT)
    n = o.shape[1]
    arrays = _pack(
        [o[t, i] for i in range(n)],
        [a[t, i] for i in range(n)],
        [r[t]] * n,
        [o[t + 1, i] for i in range(n)],
        terminals,
        truncations,
        s[t, 0],
        s[t + 1, 0],
    )
    m = re.fullmatch(r"(.+-v\d+-\d+x\d+)-(.+)", os.path.splitext(os.path.basename(path))[0])
    return arrays, {
        "task": task or (m.group(1) if m else None) or expect_task,
        "quality": m.group(2) if m else None,
        "dataset_seed": 0,
    }


# ---------------------------------------------------------------------------------------------
# og-marl / flashbax Vault (tensorstore, zarr on OCDBT)
# ---------------------------------------------------------------------------------------------
def _vault_leaves(tree: dict, prefix: str = "") -> list[str]:
    """Leaf names as flashbax stores them: key path joined with '.', plus a trailing '.'."""
    out = []
    for k, v in tree.items():
        out += _vault_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}."]
    return out


def _load_vault(path, dataset_seed, task, expect_task):
    try:
        import tensorstore as ts
    except ImportError:
        raise DatasetError("reading og-marl Vaults needs the tensorstore package: pip install tensorstore") from None
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        uids = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, "metadata.json")))
        raise DatasetError(
            f"{path} is a Vault holding the datasets {', '.join(uids) or '(none)'}; "
            f"give the path of one of them, e.g. {os.path.join(path, uids[0] if uids else '<uid>')}"
        )
    try:
        with open(meta_path) as f:
            vmeta = json.load(f)
        leaves = _vault_leaves(vmeta["structure_shape"])
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise DatasetError(f"{meta_path} is not a flashbax Vault metadata file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("observations.", "actions.", "rewards.", "terminals.", "truncations.") if k not in leaves]
    if missing:
        raise DatasetError(
            f"{path}: the Vault has no {', '.join(k[:-1] for k in missing)}; leaves: {', '.join(leaves)}"
        )

    def open_leaf(name):
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": "file://" + os.path.abspath(path), "path": name},
        }
        try:
            return ts.open(spec, open=True, read=True, write=False).result()
        except ValueError as e:
            raise DatasetError(
                f"{path}: cannot open the Vault's '{name}' store ({str(e).split(' [')[0]}); "
                f"the Vault is incomplete or damaged, download it again"
            ) from None

    T = int(open_leaf("vault_index").read().result()[0])  # filled length of the time axis
    if T <= 0:
        raise DatasetError(f"{path}: the Vault is empty (vault_index = {T})")

    def read(name):
        store = open_leaf(name)
        if dataset_seed >= store.shape[0] or dataset_seed < 0:
            raise DatasetError(
                f"{path}: dataset_seed {dataset_seed} does not exist; this Vault holds seeds 0..{store.shape[0] - 1}"
            )
        return np.asarray(store[dataset_seed, :T].read().result())

    obs_all, act_all = read("observations."), read("actions.")
    rew, term, trunc = read("rewards."), read("terminals.").astype(bool), read("truncations.").astype(bool)
    n_file = obs_all.shape[1]
    scenario, uid = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    scenario = scenario[:-4] if scenario.endswith(".vlt") else None
    task = task or scenario or expect_task
    n_ctrl = _controlled(task, n_file, path)
    obs = [_unpad(obs_all[:, i], f"{path}: observations of agent {i}") for i in range(n_file)]
    acts = [act_all[:, i] for i in range(n_file)]
    rews = [rew[:, i] if rew.ndim == 2 else rew.reshape(T) for i in range(n_file)]  # (T,) = one team reward
    flags = lambda a: a.all(1) if a.ndim == 2 else a.reshape(T)  # noqa: E731
    end = flags(term | trunc)
    term_end = end & (term.any(1) if term.ndim == 2 else term.reshape(T))
    if task not in TASKS and "infos.state." in leaves:
        state = read("infos.state.")
        state = state[:, 0] if state.ndim == 3 else state  # one copy per agent (OMAR's HalfCheetah): agent 0's
    else:
        state = np.concatenate(obs, 1)
    arrays = _from_steps(obs, acts, rews, term_end, end & ~term_end, state.reshape(T, -1), n_ctrl)
    info = {
        "task": task,
        "quality": uid,
        "dataset_seed": dataset_seed,
        "vault_version": vmeta.get("version"),
        "source_agents": n_file,
        "state_only_agents": list(range(n_ctrl, n_file)),
    }
    # <source>/<env>/<scenario>.vlt/<uid>: og-marl's scores belong to its v0 data (env "mamujoco"), not to
    # its newer gymnasium_mamujoco data; under omar/ the 2halfcheetah Vault is OMAR's HalfCheetah
    env_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
    source = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    if task not in TASKS:
        info["normalization_key"] = (
            OMAR_MUJOCO if (source, scenario) == ("omar", "2halfcheetah") else task if env_dir == "mamujoco" else None
        )
    return arrays, info


def _unpad(obs: np.ndarray, where: str) -> np.ndarray:
    """Cut trailing columns that are -inf in every row (og-marl pads shorter observations to one width)."""
    pad = np.isneginf(obs).all(0)
    width = len(pad)
    while width and pad[width - 1]:
        width -= 1
    return _finite_obs(obs[:, :width], where + " after removing the -inf padding")


# ---------------------------------------------------------------------------------------------
# MADiff / DoF npy
# ---------------------------------------------------------------------------------------------
def _load_madiff(path, dataset_seed, task, expect_task):
    f = lambda k: os.path.join(path, f"{k}.npy")  # noqa: E731
    missing = [f"{k}.npy" for k in ("obs", "actions", "rewards", "path_lengths") if not os.path.isfile(f(k))]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)}; expected {LAYOUTS['madiff']}")
    obs, acts, rew, lengths = (
        _npy(f("obs")),
        _npy(f("actions")),
        _npy(f("rewards")),
        _npy(f("path_lengths")).astype(int),
    )
    N = len(obs)
    if obs.ndim != 3 or acts.ndim != 3:
        raise DatasetError(
            f"{f('obs')}: obs and actions must be (steps, agents, dim), got {obs.shape} and {acts.shape}"
        )
    n = obs.shape[1]
    _rows(acts, N, f("actions"))
    _rows(rew, N, f("rewards"))
    if acts.shape[1] != n:
        raise DatasetError(
            f"{f('actions')} has {acts.shape[1]} agents but obs.npy has {n}; the files are from different datasets"
        )
    if lengths.sum() != N or (lengths <= 0).any():
        raise DatasetError(
            f"{f('path_lengths')}: the episode lengths add up to {lengths.sum()} but obs.npy has {N} rows; "
            f"the files are from different datasets or cut short"
        )
    # MADiff prepends each agent's one-hot id; strip it, but only if it is really there
    if obs.shape[2] <= n or not np.array_equal(obs[:, :, :n], np.broadcast_to(np.eye(n, dtype=obs.dtype), (N, n, n))):
        raise DatasetError(
            f"{f('obs')}: the first {n} columns are not the one-hot agent ids MADiff prepends; "
            f"this is not a MADiff-converted file"
        )
    obs = obs[:, :, n:]
    _finite_obs(obs, f("obs"))
    rew = rew.reshape(N, -1)
    rews = [rew[:, i] if rew.shape[1] == n else rew[:, 0] for i in range(n)]
    last = np.cumsum(lengths) - 1
    term_end = np.zeros(N, bool)
    if os.path.isfile(f("discounts")):
        disc = _rows(_npy(f("discounts")), N, f("discounts")).reshape(N, -1)
        term_end[last] = (disc[last] == 0).all(1)
    else:
        term_end[last] = lengths < MUJOCO_TIME_LIMIT
    trunc_end = np.zeros(N, bool)
    trunc_end[last] = ~term_end[last]
    state = (
        _rows(_npy(f("states")), N, f("states")).reshape(N, -1) if os.path.isfile(f("states")) else obs.reshape(N, -1)
    )
    arrays = _from_steps(
        [obs[:, i] for i in range(n)], [acts[:, i] for i in range(n)], rews, term_end, trunc_end, state, n
    )
    return arrays, {
        "task": task or os.path.basename(os.path.dirname(path)) or expect_task,
        "quality": os.path.basename(path),
        "dataset_seed": 0,
    }
