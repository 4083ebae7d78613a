"""OMAR's pretrained prey of simple_tag / simple_world, the opponent its published datasets were collected against.

OMAR stores it in <root>/<task>/pretrained_adv_model.pt, a legacy (pre-1.6) torch pickle. Unpickling can run
arbitrary code, so `convert_omar_prey` does it once, on request (`trust_pickle`), keeping only the prey policy's
tensors; runs read the converted file with `load_prey` (torch's weights-only loader, no code executed):

    python -m envs.omar_prey SRC --out DST --task simple_tag --trust-pickle
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from envs.mpe import PREY_OBS_DIMS, PreyError

# ---------------------------------------------------------------------------------------------
# OMAR's pretrained prey (simple_tag / simple_world)
# ---------------------------------------------------------------------------------------------
# OMAR's datasets were collected against a fixed, pretrained DDPG prey, stored in
# <root>/<task>/pretrained_adv_model.pt: a legacy (pre-1.6, non-zip) torch pickle of
# {"init_dict": ..., "agent_params": [one dict per agent: "policy", "critic", "target_policy", ...]},
# the prey last. Unpickling it can run arbitrary code, so it is done once,
# on request (`trust_pickle`), by `convert_omar_prey`, which keeps only the prey policy's tensors; runs
# then read the converted file with `load_prey` (torch's weights-only loader, no code executed).
PREY_FORMAT = "omsd-omar-prey"
PREY_HIDDEN = 64
PREY_SHAPES = {  # OMAR's MLPNetwork(obs, 2, hidden_dim=64, constrain_out=True); d = the prey's observation size
    "in_fn.weight": ("d",),
    "in_fn.bias": ("d",),
    "in_fn.running_mean": ("d",),
    "in_fn.running_var": ("d",),
    "fc1.weight": (PREY_HIDDEN, "d"),
    "fc1.bias": (PREY_HIDDEN,),
    "fc2.weight": (PREY_HIDDEN, PREY_HIDDEN),
    "fc2.bias": (PREY_HIDDEN,),
    "fc3.weight": (2, PREY_HIDDEN),
    "fc3.bias": (2,),
}
BATCHNORM_EPS = 1e-5  # nn.BatchNorm1d's default, which OMAR's MLPNetwork keeps


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_torch_zip(path: str) -> bool:
    """torch.save's zip files hold <archive>/data.pkl (a .npz holds .npy members)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return True  # unreadable as a zip: let the torch loader report it


def prey_file_kind(path: str) -> str:
    """'converted' (written by convert_omar_prey: safe to load) or 'pickle' (any other torch file, e.g. OMAR's
    original .pt: loading it runs code). Never unpickles anything; PreyError if `path` is not a torch file."""
    if os.path.isdir(path):
        raise PreyError(f"{path} is a directory; give OMAR's pretrained_adv_model.pt or a converted prey file")
    if not os.path.isfile(path):
        raise PreyError(f"{path} does not exist; give OMAR's pretrained_adv_model.pt or a converted prey file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not _is_torch_zip(path):
        raise PreyError(
            f"{path} is a zip archive but not a torch file (a dataset .npz?); --prey-path takes OMAR's "
            f"pretrained_adv_model.pt or a converted prey file"
        )
    if head == b"PK\x03\x04":  # torch's zip format: a converted file loads with the weights-only loader
        try:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and json.loads(obj.get("info", "{}")).get("format") == PREY_FORMAT:
                return "converted"
        except Exception:
            pass
        return "pickle"
    if head[:1] == b"\x80":  # a pickle stream: torch's legacy format starts with the pickled magic number
        return "pickle"
    raise PreyError(f"{path} is not a torch file; give OMAR's pretrained_adv_model.pt or a converted prey file")


def convert_omar_prey(src: str, dst: str, trust_pickle: bool = False, *, task: str | None = None) -> dict:
    """Convert OMAR's pretrained_adv_model.pt into a file of the prey policy's tensors only; returns its info.

    The prey is the last of the file's 4 `agent_params` (3 predators, then the prey); its `policy` state dict
    is checked against OMAR's prey network (BatchNorm1d(d) with running stats, Linear(d, 64), Linear(64, 64),
    Linear(64, 2)), d = 14 (simple_tag) or 22 (simple_world). task: checked against d; taken from d when None.
    The output holds the tensors and a JSON info (task, observation size, source file name and sha256); it is
    written atomically and never replaces an existing file.
    """
    kind = prey_file_kind(src)
    if kind == "converted":
        raise PreyError(f"{src} is already a converted prey file; use it as it is")
    if not trust_pickle:
        raise PreyError(
            f"{src} is a torch pickle (OMAR's pretrained prey is a legacy, pre-1.6 one); loading it can "
            f"run arbitrary code, so it is refused unless you trust its source: pass --trust-pickle "
            f"(trust_pickle=True) to convert it once into a plain-tensor file"
        )
    if task is not None and task not in PREY_OBS_DIMS:
        raise PreyError(f"{task} has no prey; the pretrained prey is for {' and '.join(PREY_OBS_DIMS)}")
    if os.path.exists(dst):
        raise PreyError(f"{dst} already exists; delete it or choose another output path")
    import torch

    print(f"warning: unpickling {src} with weights_only=False (this runs any code the file contains)", file=sys.stderr)
    try:
        obj = torch.load(src, weights_only=False, map_location="cpu")
    except Exception as e:
        raise PreyError(f"{src} cannot be unpickled by torch ({type(e).__name__}: {e}); download it again") from None
    params = obj.get("agent_params") if isinstance(obj, dict) else None
    if not isinstance(params, (list, tuple)) or len(params) != 4:
        have = (
            f"{len(params)} entries"
            if isinstance(params, (list, tuple))
            else f"keys {sorted(map(str, obj))}"
            if isinstance(obj, dict)
            else f"a {type(obj).__name__}"
        )
        raise PreyError(
            f"{src}: expected OMAR's dict with an 'agent_params' list of 4 agents (3 predators, then "
            f"the prey), found {have}"
        )
    policy = params[-1].get("policy") if isinstance(params[-1], dict) else None
    if not hasattr(policy, "items"):
        raise PreyError(f"{src}: the prey's entry agent_params[3] has no 'policy' state dict")
    tensors = _check_prey_policy(dict(policy), f"{src}: the prey's policy (agent_params[3]['policy'])")
    d = tensors["in_fn.weight"].shape[0]
    by_dim = {v: k for k, v in PREY_OBS_DIMS.items()}
    if task is None and d not in by_dim:
        raise PreyError(
            f"{src}: the prey's policy takes {d} inputs, but the prey observes "
            f"{', '.join(f'{v} values in {k}' for k, v in PREY_OBS_DIMS.items())}"
        )
    task = task or by_dim[d]
    if d != PREY_OBS_DIMS[task]:
        raise PreyError(
            f"{src}: the prey's policy takes {d} inputs, but the prey of {task} observes "
            f"{PREY_OBS_DIMS[task]} values; this is the prey of {by_dim.get(d, 'another task')}"
        )
    info = {
        "format": PREY_FORMAT,
        "version": 1,
        "task": task,
        "obs_dim": d,
        "batchnorm_eps": BATCHNORM_EPS,
        "source": os.path.basename(src),
        "source_sha256": _sha256_file(src),
        "source_entry": "agent_params[3]['policy']",
    }
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        torch.save({"policy": tensors, "info": json.dumps(info)}, tmp)
        if os.path.exists(dst):
            raise PreyError(f"{dst} already exists; delete it or choose another output path")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


def _check_prey_policy(sd: dict, where: str) -> dict:
    """The tensors of OMAR's prey network, validated and copied as contiguous float32 CPU tensors."""
    import torch

    missing = [k for k in PREY_SHAPES if k not in sd]
    if missing:
        raise PreyError(
            f"{where} lacks {', '.join(missing)}; expected OMAR's prey network (BatchNorm1d in_fn with "
            f"running stats, then Linear fc1, fc2, fc3)"
        )
    if not all(isinstance(sd[k], torch.Tensor) for k in PREY_SHAPES):
        raise PreyError(
            f"{where}: {', '.join(k for k in PREY_SHAPES if not isinstance(sd[k], torch.Tensor))} is not a tensor"
        )
    d = sd["in_fn.weight"].shape[0] if sd["in_fn.weight"].dim() == 1 else -1
    for k, shape in PREY_SHAPES.items():
        want = tuple(d if s == "d" else s for s in shape)
        if tuple(sd[k].shape) != want:
            raise PreyError(
                f"{where}: {k} has shape {tuple(sd[k].shape)}, expected {want} (BatchNorm1d({d}), "
                f"Linear({d}, {PREY_HIDDEN}), Linear({PREY_HIDDEN}, {PREY_HIDDEN}), Linear({PREY_HIDDEN}, 2))"
            )
    out = {k: sd[k].detach().to("cpu", torch.float32).clone().contiguous() for k in PREY_SHAPES}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()] + (
        ["in_fn.running_var (negative)"] if (out["in_fn.running_var"] < 0).any() else []
    )
    if bad:
        raise PreyError(f"{where}: {', '.join(bad)} holds non-finite or invalid values; the file is damaged")
    return out


class OmarPrey:
    """OMAR's prey policy as numpy: BatchNorm1d in eval mode, Linear-ReLU-Linear-ReLU-Linear, tanh.

    Call it with one observation (obs_dim,) or a batch (B, obs_dim); returns the action(s) in [-1, 1]."""

    def __init__(self, tensors: dict, info: dict):
        p = {k: v.numpy().astype(np.float32) for k, v in tensors.items()}
        self.info, self.task, self.obs_dim = info, info["task"], int(info["obs_dim"])
        self.scale = p["in_fn.weight"] / np.sqrt(p["in_fn.running_var"] + np.float32(info["batchnorm_eps"]))
        self.mean, self.shift = p["in_fn.running_mean"], p["in_fn.bias"]
        self.layers = [(p[f"fc{i}.weight"].T.copy(), p[f"fc{i}.bias"]) for i in (1, 2, 3)]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = (np.asarray(obs, np.float32) - self.mean) * self.scale + self.shift
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            h = np.maximum(h, 0) if i < 2 else np.tanh(h)
        return np.clip(h, -1.0, 1.0)  # OMAR clamps the DDPG action too


def load_prey(path: str, task: str | None = None) -> OmarPrey:
    """The prey policy of a file written by convert_omar_prey (read with torch's weights-only loader).

    task: when given, the file must hold that task's prey. OMAR's original pickle is refused with a hint to
    convert it.
    """
    import torch

    if prey_file_kind(path) != "converted":
        raise PreyError(
            f"{path} is not a converted prey file but a torch pickle (e.g. OMAR's original "
            f"pretrained_adv_model.pt); convert it with `python -m envs.omar_prey "
            f"{path} --out <file> --task <task> --trust-pickle` if you trust its source"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    info = json.loads(obj["info"])
    tensors = _check_prey_policy(obj.get("policy", {}), f"{path}: the prey's policy")
    if tensors["in_fn.weight"].shape[0] != info.get("obs_dim") or not info.get("task"):
        raise PreyError(f"{path}: its info does not match its tensors; convert the original file again")
    if task is not None and task != info["task"]:
        raise PreyError(
            f"{path} holds the prey of {info['task']} (observation of {info['obs_dim']} values), "
            f"not of {task}; convert the {task} prey (<root>/{task}/pretrained_adv_model.pt)"
        )
    return OmarPrey(tensors, info)


def main(argv: list[str] | None = None) -> int:
    """`python -m envs.omar_prey SRC --out DST --task simple_tag [--trust-pickle]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m envs.omar_prey",
        description=(
            "Convert OMAR's pretrained prey (<root>/<task>/pretrained_adv_model.pt, a legacy torch pickle) once into "
            "a plain-tensor file for `oma_sd_mpe.py --prey-path`."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="OMAR's pretrained_adv_model.pt")
    parser.add_argument("--out", metavar="DST", required=True, help="the converted file to write (must not exist)")
    parser.add_argument("--task", choices=tuple(PREY_OBS_DIMS), required=True, help="whose prey it is")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle SRC (this runs any code it contains): only for a file from a source you trust",
    )
    a = parser.parse_args(argv)
    try:
        info = convert_omar_prey(a.src, a.out, a.trust_pickle, task=a.task)
    except PreyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.out}: the {info['task']} prey (observation {info['obs_dim']}), from {info['source']} "
        f"sha256 {info['source_sha256']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
