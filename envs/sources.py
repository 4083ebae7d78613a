"""Where a training run's data and opponents come from (shared by `oma_sd_mpe.py` and `oma_sd_mamujoco.py`): the
choice between a generated dataset, a file in the project's format and a published dataset, and OMAR's
pretrained prey for simple_tag / simple_world."""

from __future__ import annotations

import hashlib
import os

from envs.dataset import load_dataset
from envs.published import PREY_OBS_DIMS, convert_omar_prey, load_prey, load_published, prey_file_kind
from envs.runs import RunError


def read_dataset(args, generate, spec_of, check_metadata=None, published: bool = True) -> tuple[dict, dict, str]:
    """(arrays in the project's format, metadata, source) of the run's data: `generate()` without --dataset-path;
    with it, a file in the project's format (--dataset-format project, or auto and a .npz name) or else a published
    dataset (`published=False`: the project's format only), checked against `spec_of(env_id)` (the env's agents
    and sizes) and a project file also by `check_metadata(path, meta)`."""
    path = args.dataset_path
    if not path:
        return generate()
    if not published or args.dataset_format == "project" or (args.dataset_format == "auto" and path.endswith(".npz")):
        arrays, meta = load_dataset(path, expect=spec_of(args.env_id))
        if check_metadata is not None:
            check_metadata(path, meta)  # env version, and the file name's task / quality / size / seed
        return arrays, meta, path
    fmt = None if args.dataset_format == "auto" else args.dataset_format
    arrays, meta = load_published(
        path, fmt, dataset_seed=args.dataset_seed, task=args.env_id, expect=spec_of(args.env_id)
    )
    return arrays, meta, f"{path} ({meta['source_format']})"


def check_prey_arg(args):
    """--prey-path only where there is a prey (checked before anything is made)."""
    if args.prey_path and args.env_id not in PREY_OBS_DIMS:
        raise RunError(f"--prey-path is for {' and '.join(PREY_OBS_DIMS)} (the envs with a prey), not {args.env_id}")


def load_prey_arg(args):
    """(prey policy for MPEEnv or None, what results.json records) of --prey-path. OMAR's original pickle is
    converted once into --cache-dir, and only with --trust-pickle."""
    if not args.prey_path:
        return None, "scripted" if args.env_id in PREY_OBS_DIMS else None
    path = args.prey_path
    if prey_file_kind(path) == "pickle":
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        converted = os.path.join(args.cache_dir, f"omar_prey_{sha[:16]}.pt")
        if not args.trust_pickle:
            have = f" (a converted copy exists: --prey-path {converted})" if os.path.exists(converted) else ""
            raise RunError(
                f"{path} is a torch pickle (OMAR's original prey); loading it can run arbitrary code: pass "
                f"--trust-pickle to convert it once if you trust its source{have}"
            )
        if not os.path.exists(converted):
            convert_omar_prey(path, converted, True, task=args.env_id)
        path = converted
    prey = load_prey(path, task=args.env_id)
    return prey, {"file": os.path.abspath(path), "source_sha256": prey.info["source_sha256"]}
