"""The project's offline-MARL dataset format: one `.npz` file per dataset (no pickles).

Arrays (N transitions, stored in episode order; agent i = 0..n-1 are the controlled agents):
  obs_<i>       (N, obs_dim_i) float32   agent i's observation
  actions_<i>   (N, act_dim_i) float32   agent i's action, in [-1, 1]
  rewards_<i>   (N,)           float32   agent i's reward
  next_obs_<i>  (N, obs_dim_i) float32   agent i's next observation
  terminals     (N,)           bool      the episode ended in a terminal state (no bootstrap)
  truncations   (N,)           bool      the episode was cut by the time limit (bootstrap)
  state         (N, state_dim) float32   global state
  next_state    (N, state_dim) float32   next global state
  metadata      ()             unicode   JSON, see below
An episode ends at every row where `terminals | truncations`; the last row must end one.
Agents may have different observation and action sizes.

metadata (JSON): format = "omsd-marl-dataset", format_version, env_family, task, env_version,
agent_names, obs_dims, act_dims, state_dim, quality, behaviour (provenance), generation_seed,
n_transitions, n_episodes, episode_return {metric, mean, std, min, max}, packages, and
`sha256`: the checksum of all arrays (see `checksum`). `load_dataset` verifies all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
import zipfile

import numpy as np

from omsd_utils.files import LockFile, describe_write_error, lock_path, remove_stale

FORMAT = "omsd-marl-dataset"
FORMAT_VERSION = 1


class DatasetError(Exception):
    """A dataset file that cannot be used; the message says what is wrong and what to do."""


def checksum(arrays: dict) -> str:
    """sha256 over every array except metadata: name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        if k == "metadata":
            continue
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def n_agents_of(arrays: dict) -> int:
    n = 0
    while f"obs_{n}" in arrays:
        n += 1
    return n


def episode_ends(arrays: dict) -> np.ndarray:
    """Indices of the last row of every episode."""
    return np.flatnonzero(np.asarray(arrays["terminals"]) | np.asarray(arrays["truncations"]))


def episode_returns(arrays: dict, metric) -> np.ndarray:
    """metric(rewards (T, n)) of every episode."""
    n = n_agents_of(arrays)
    rew = np.stack([arrays[f"rewards_{i}"] for i in range(n)], axis=1)
    starts = np.concatenate([[0], episode_ends(arrays)[:-1] + 1])
    return np.array([metric(rew[s : e + 1]) for s, e in zip(starts, episode_ends(arrays))])


def return_stats(returns: np.ndarray, metric_name: str) -> dict:
    return {
        "metric": metric_name,
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "min": float(np.min(returns)),
        "max": float(np.max(returns)),
    }


def validate(arrays: dict, where: str) -> int:
    """Check keys, shapes, dtypes, finiteness and the action range; returns the number of agents."""
    n = n_agents_of(arrays)
    if n == 0:
        raise DatasetError(
            f"{where}: no 'obs_0' array; this is not a dataset in the project's format (see docs/datasets.md)"
        )
    required = [f"{k}_{i}" for i in range(n) for k in ("obs", "actions", "rewards", "next_obs")]
    required += ["terminals", "truncations", "state", "next_state"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(
            f"{where}: missing array(s) {', '.join(missing)}; regenerate the file or fix the writer "
            f"(see docs/datasets.md)"
        )
    N = len(arrays["obs_0"]) if np.ndim(arrays["obs_0"]) else 0
    for k in required:
        a = arrays[k]
        want_ndim = 1 if k.startswith(("rewards", "terminals", "truncations")) else 2
        if a.ndim != want_ndim:
            raise DatasetError(f"{where}: array {k} has shape {a.shape}, expected {want_ndim} dimension(s)")
        if len(a) != N:
            raise DatasetError(
                f"{where}: array {k} has {len(a)} rows but obs_0 has {N}; all arrays must have one row per transition"
            )
        flags = k in ("terminals", "truncations")
        if flags and a.dtype != np.bool_:
            raise DatasetError(
                f"{where}: array {k} has dtype {a.dtype}, expected bool (the format's episode flags); "
                f"convert it with .astype(bool) where it was written"
            )
        if not flags and a.dtype.kind != "f":
            raise DatasetError(
                f"{where}: array {k} has dtype {a.dtype}, expected floating point (float32); "
                f"convert it where it was written (integer, complex or text data are not accepted)"
            )
        if not flags and not np.all(np.isfinite(a)):
            bad = int(np.flatnonzero(~np.isfinite(a).reshape(N, -1).all(1))[0])
            raise DatasetError(
                f"{where}: array {k} has a non-finite value (NaN or inf) at row {bad}; clean the data before training"
            )
        if k.startswith("actions") and N and np.abs(a).max() > 1.0:
            bad = int(np.flatnonzero((np.abs(a) > 1.0).any(1))[0])
            raise DatasetError(
                f"{where}: array {k} has a value outside [-1, 1] ({a[bad][np.abs(a[bad]) > 1.0][0]:g} at row "
                f"{bad}); the format's actions are scaled to [-1, 1], rescale them where they were written"
            )
    for i in range(n):
        if arrays[f"next_obs_{i}"].shape != arrays[f"obs_{i}"].shape:
            raise DatasetError(
                f"{where}: next_obs_{i} {arrays[f'next_obs_{i}'].shape} differs from obs_{i} {arrays[f'obs_{i}'].shape}"
            )
    if N == 0:
        raise DatasetError(f"{where}: the dataset has no transitions")
    if not (bool(arrays["terminals"][-1]) or bool(arrays["truncations"][-1])):
        raise DatasetError(
            f"{where}: the last transition ends no episode (terminals/truncations are both 0); the file looks cut short"
        )
    return n


def write_npz(f, arrays: dict):
    """np.savez, but byte-reproducible: np.savez stamps each member with the current time, so the same data
    written twice would give different files. Members are stored uncompressed in a fixed order."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for k in sorted(arrays):
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arrays[k]), allow_pickle=False)


def check_writable(path: str):
    """Fail early (before minutes of generation) when the dataset could not be written to `path`."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise DatasetError(
            f"cannot write to {d} ({e.strerror}); set OMSD_DATA_DIR or --out to a writable directory"
        ) from None


def tmp_pattern(path: str) -> str:
    """The names of the temporary files `save_dataset` writes for `path` (regex, see omsd_utils.files.remove_stale)."""
    return re.escape(f".tmp-{os.path.basename(path)}-") + r"\d+-[0-9a-f]{8}\.part"


TMP_ANY = r"\.tmp-(?P<target>.+)-\d+-[0-9a-f]{8}\.part"  # a temporary of any dataset in the directory
TMP_OLD = r"\.tmp-[a-z0-9_]{8}\.npz"  # tempfile.mkstemp's names, used by earlier versions of this writer
OLD_AFTER = 3600  # seconds without a change after which such a file has no writer any more


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporaries interrupted writes left in the directory of `path`, whose lock the caller holds:
    those of `path` itself, those of other datasets whose lock is free (so no live writer's), and the unnamed
    ones of earlier versions unchanged for an hour. Returns the names removed."""
    d = os.path.dirname(os.path.abspath(path))
    removed = remove_stale(d, tmp_pattern(path))
    try:
        names = os.listdir(d)
    except OSError:
        names = []
    for name in names:
        m = re.fullmatch(TMP_ANY, name)
        if m and m["target"] != os.path.basename(path):
            other = LockFile(lock_path(os.path.join(d, m["target"])))
            try:
                if other.acquire(blocking=False):
                    try:
                        removed += remove_stale(d, tmp_pattern(os.path.join(d, m["target"])))
                    finally:
                        other.release()
            except OSError:
                pass
        elif re.fullmatch(TMP_OLD, name):
            try:
                if time.time() - os.stat(os.path.join(d, name)).st_mtime > OLD_AFTER:
                    removed += remove_stale(d, re.escape(name))
            except OSError:
                pass
    for name in removed:
        print(
            f"removed {os.path.join(d, name)}, a temporary file an interrupted dataset write left behind",
            file=sys.stderr,
        )
    return removed


def save_dataset(path: str, arrays: dict, metadata: dict, overwrite: bool = False) -> dict:
    """Validate, checksum and write atomically (temporary file + rename). Returns the metadata written.
    Writers of one path take turns (a lock file beside it); temporaries an interrupted writer left are removed."""
    lock = LockFile(lock_path(path))
    check_writable(path)
    lock.acquire()
    try:
        return write_locked(path, arrays, metadata, overwrite)
    finally:
        lock.release()


def write_locked(path: str, arrays: dict, metadata: dict, overwrite: bool = False) -> dict:
    """save_dataset for a caller that holds the lock of `path` (`LockFile(lock_path(path))`)."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a directory; remove it or choose another file name for the dataset")
    if os.path.exists(path) and not overwrite:
        raise DatasetError(
            f"{path} already exists; delete it or choose another path (datasets are never overwritten silently)"
        )
    arrays = {k: np.asarray(v) for k, v in arrays.items() if k != "metadata"}
    n = validate(arrays, path)
    meta = dict(metadata)
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        n_transitions=int(len(arrays["obs_0"])),
        n_episodes=int(len(episode_ends(arrays))),
        n_agents=n,
        obs_dims=[int(arrays[f"obs_{i}"].shape[1]) for i in range(n)],
        act_dims=[int(arrays[f"actions_{i}"].shape[1]) for i in range(n)],
        state_dim=int(arrays["state"].shape[1]),
        sha256=checksum(arrays),
    )
    check_writable(path)
    d = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    # created like any new file (0o666 minus the umask), not mkstemp's 0o600: a shared data directory stays readable
    tmp = os.path.join(d, f".tmp-{os.path.basename(path)}-{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write_npz(f, {"metadata": np.array(json.dumps(meta, sort_keys=True)), **arrays})
        os.replace(tmp, path)
    except OSError as e:
        size = sum(a.nbytes for a in arrays.values()) / 2**20
        raise DatasetError(
            f"cannot write {path} ({describe_write_error(e, d)}); the dataset needs about {size:.0f} MiB: "
            f"free disk space or set OMSD_DATA_DIR (or --out) to another directory"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def load_dataset(path: str, expect: dict | None = None) -> tuple[dict, dict]:
    """Load and verify a dataset file. `expect` may hold task, n_agents, obs_dims, act_dims, state_dim
    (what the env needs); any mismatch is a DatasetError naming both values."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a directory, not a dataset file; give the path of the .npz file")
    if not os.path.isfile(path):
        raise DatasetError(
            f"dataset file {path} does not exist; check --dataset-path, or drop it to generate the project's dataset"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except PermissionError as e:
        raise DatasetError(
            f"cannot read {path} ({e.strerror}); check its permissions (it must be readable by you)"
        ) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if "pickle" in str(e):  # numpy's advice (allow_pickle=True) would run the file's code: never taken here
            raise DatasetError(f"{path} holds pickled Python objects, which are never loaded; the project's format "
                               f"holds numeric arrays only (docs/datasets.md)") from None  # fmt: skip
        raise DatasetError(
            f"{path} is truncated or corrupted ({type(e).__name__}: {e}); delete it and generate or copy it again"
        ) from None
    if "metadata" not in arrays:
        raise DatasetError(
            f"{path} has no metadata array; it was not written in the project's format (see docs/datasets.md)"
        )
    try:
        meta = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError:
        raise DatasetError(
            f"{path}: metadata is not valid JSON; the file is corrupted, generate or copy it again"
        ) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')} is not {FORMAT!r} v{FORMAT_VERSION}"
        )
    validate(arrays, path)
    if meta.get("sha256") != checksum(arrays):
        raise DatasetError(
            f"{path}: checksum mismatch (the arrays differ from what was written); the file is corrupted or was "
            f"edited, generate or copy it again"
        )
    check_expect(dataset_spec(arrays, meta.get("task")), expect, path)
    return arrays, meta


def dataset_spec(arrays: dict, task: str | None = None) -> dict:
    """What a (validated) dataset offers, in the keys of `expect` / `omsd_data.mpe_data.env_spec`."""
    n = n_agents_of(arrays)
    return {
        "task": task,
        "n_agents": n,
        "obs_dims": [int(arrays[f"obs_{i}"].shape[1]) for i in range(n)],
        "act_dims": [int(arrays[f"actions_{i}"].shape[1]) for i in range(n)],
        "state_dim": int(arrays["state"].shape[1]),
    }


def check_expect(have: dict, expect: dict | None, where: str):
    """`expect` may hold task, n_agents, obs_dims, act_dims, state_dim (what the env needs); any mismatch
    with `have` (see `dataset_spec`) is a DatasetError naming both values."""
    for k, v in (expect or {}).items():
        v = list(v) if isinstance(v, tuple) else v  # obs_dims=(18, 18, 18) means the same as a list
        if have.get(k) != v:
            raise DatasetError(
                f"{where}: dataset has {k}={have.get(k)} but the env needs {k}={v}; use a dataset made for this env"
            )
