"""Where a training run's data and opponents come from (shared by `oma_sd_mpe.py` and `oma_sd_mamujoco.py`): the
choice between a generated dataset, a file in the project's format and a published dataset, and OMAR's
pretrained prey or the env's own (learned or scripted) for simple_tag / simple_world."""

from __future__ import annotations

import hashlib
import os

from envs.dataset import load_dataset
from envs.mpe import learned_prey
from envs.published import PREY_OBS_DIMS, convert_omar_prey, load_prey, load_published, prey_file_kind
from envs.runs import RunError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """--prey / --prey-path only where there is a prey, and not both (checked before anything is made)."""
    if args.prey not in ("learned", "scripted"):
        raise RunError(f"--prey must be 'learned' or 'scripted', got {args.prey!r}")
    for flag, given in (("--prey-path", bool(args.prey_path)), ("--prey", args.prey != "learned")):
        if given and args.env_id not in PREY_OBS_DIMS:
            raise RunError(f"{flag} is for {' and '.join(PREY_OBS_DIMS)} (the envs with a prey), not {args.env_id}")
    if args.prey_path and args.prey != "learned":
        raise RunError(f"give either --prey {args.prey} or --prey-path, not both")


def same_prey(a, b) -> bool:
    """Whether two results.json prey records name the same prey: the file's contents, not its path ("scripted" is
    the scripted one)."""
    key = lambda r: r.get("source_sha256") if isinstance(r, dict) else r  # noqa: E731
    return key(a) == key(b)


def load_prey_arg(args):
    """(prey for MPEEnv: None for the env's learned prey, "scripted" or a policy; what results.json records) of
    --prey / --prey-path. OMAR's original pickle is converted once into --cache-dir, and only with --trust-pickle."""
    if args.env_id not in PREY_OBS_DIMS:
        return None, None
    if not args.prey_path:
        if args.prey == "scripted":
            return "scripted", "scripted"
        learned = learned_prey(args.env_id)
        return None, {"kind": "learned", "file": os.path.relpath(learned.path, REPO), "source_sha256": learned.sha256}
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
    return prey, {"kind": "omar", "file": os.path.abspath(path), "source_sha256": prey.info["source_sha256"]}
