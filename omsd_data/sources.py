"""Where a training run's data and opponents come from (shared by `oma_sd_mpe.py` and `oma_sd_mamujoco.py`): the
choice between a generated dataset, a file in the project's format and a published dataset, and OMAR's
pretrained prey or the env's learned one for simple_tag / simple_world."""

from __future__ import annotations

import hashlib
import os

from envs.mpe import learned_prey
from envs.omar_prey import PREY_OBS_DIMS, convert_omar_prey, load_prey, prey_file_kind
from omsd_data.dataset import load_dataset
from omsd_data.published import load_published
from omsd_utils.runs import RunError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_dataset(
    path: str, generate, spec: dict, check_metadata=None, published: bool = True, env_id=None, dataset_seed: int = 0
) -> tuple[dict, dict, str]:
    """(arrays in the project's format, metadata, source) of a run's data: `generate()` without a --dataset-path;
    with one, a .npz in the project's format or else a published dataset of `env_id` (format detected;
    `published=False`: the project's format only), checked against `spec` (the env's agents and sizes) and a
    project file also by `check_metadata(path, meta)`."""
    if not path:
        return generate()
    if not published or path.endswith(".npz"):
        arrays, meta = load_dataset(path, expect=spec)
        if check_metadata is not None:
            check_metadata(path, meta)  # env version, and the file name's task / quality / size / seed
        return arrays, meta, path
    arrays, meta = load_published(path, None, dataset_seed=dataset_seed, task=env_id, expect=spec)
    return arrays, meta, f"{path} ({meta['source_format']})"


def same_prey(a, b) -> bool:
    """Whether two results.json prey records name the same prey: the file's contents, not its path."""
    key = lambda r: r.get("source_sha256") if isinstance(r, dict) else r  # noqa: E731
    return key(a) == key(b)


def load_prey_arg(env_id: str, prey_path: str, trust_pickle: bool, cache_dir: str):
    """(prey for MPEEnv: None for the env's learned prey, or OMAR's policy; what results.json records) of
    --prey-path. OMAR's original pickle is converted once into `cache_dir`, and only with --trust-pickle."""
    if env_id not in PREY_OBS_DIMS:
        return None, None
    if not prey_path:
        learned = learned_prey(env_id)
        return None, {"kind": "learned", "file": os.path.relpath(learned.path, REPO), "source_sha256": learned.sha256}
    path = prey_path
    if prey_file_kind(path) == "pickle":
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        converted = os.path.join(cache_dir, f"omar_prey_{sha[:16]}.pt")
        if not trust_pickle:
            have = f" (a converted copy exists: --prey-path {converted})" if os.path.exists(converted) else ""
            raise RunError(
                f"{path} is a torch pickle (OMAR's original prey); loading it can run arbitrary code: pass "
                f"--trust-pickle to convert it once if you trust its source{have}"
            )
        if not os.path.exists(converted):
            convert_omar_prey(path, converted, True, task=env_id)
        path = converted
    prey = load_prey(path, task=env_id)
    return prey, {"kind": "omar", "file": os.path.abspath(path), "source_sha256": prey.info["source_sha256"]}
