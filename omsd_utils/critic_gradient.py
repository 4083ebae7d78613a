"""Does the critic's action gradient point uphill? Its grad_a Q against a Monte-Carlo ground truth.

Stage 2 moves each actor along grad_{a_i} Q, so what matters is the direction of the critic's action gradient, not
how well Q fits returns (a critic can correlate with returns at r = 0.6 while its gradient is close to random:
docs/studies.md, "The critic's gradient"). The truth, for M dataset transitions and one agent i per transition
(i = m mod n):

- simple_spread (`spread_truth`): the simulator is set to the transition's state (`envs.mpe.SpreadBatch`, rebuilt
  from the stored observations of all agents), agent i's action is moved by +-h on each coordinate (the others keep
  the data's), and the data's behaviour policy (its committed snapshot plus the collection noise) rolls on K times to
  the end of the episode, with the same noise for every variant of a transition. Central differences of the
  discounted returns give dQ^mu/da_i; the same rollouts from a grid of far actions of agent i ({-1, 0, 1}^act)
  give their Q^mu. An IQL critic estimates the Q of an improved policy, not Q^mu, but its gradient should agree in
  direction. Only data of one committed policy (random, medium, expert) have a known behaviour policy.
- Multi-agent MuJoCo (`mamujoco_truth`): the same from the stored state (qpos, qvel) of data of one committed
  behaviour policy, over the first 10 steps (a longer return's gradient costs more and is noisier).
- the bandit (`bandit_truth`): one step with reward a_1 a_2, so Q(a) = a_1 a_2 and dQ/da_i = a_j exactly.

`grade(q_fn, truth)` compares any critic q_fn(state (B, S), joint action (B, n*act)) -> (B,) with a truth:
cosine (mean over transitions), share of positive cosines, the centred cosine (each agent's mean gradient removed
from both sides: a direction common to all transitions, such as the behaviour's drift, scores on the raw cosine
without any knowledge of the transition), the cosine with the states shuffled across transitions (what the actions
alone explain), and on the far actions how often the critic's best is the true best (chance 1/grid) and the share
of the attainable gain its pick gets. `shuffled(q_fn, M)` is the negative control: a critic answering for another
transition, whose centred cosine must be ~0.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch

M_DEFAULT, K_DEFAULT, H_DEFAULT = 256, 64, 0.1  # transitions, rollouts per variant, finite-difference step
SINGLE_POLICY = ("random", "medium", "expert")  # the MPE qualities rolled out by one committed snapshot


def far_grid(act_dim: int) -> np.ndarray:
    """The far actions of one agent: {-1, 0, 1}^act_dim (box corners, edge midpoints, the centre)."""
    return np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=act_dim)), np.float32)


def _in_order(arrays: dict, idx, order: list[int], agent_env: np.ndarray) -> dict:
    """State, joint action and graded agent of rows idx in the critic's agent order (the scripts' `order`)."""
    pos = np.argsort(order)  # position of every env agent
    return {
        "state": np.concatenate([arrays[f"obs_{i}"][idx] for i in order], 1),
        "joint": np.stack([arrays[f"actions_{i}"][idx] for i in order], 1),  # (M, n, act)
        "agent": pos[agent_env],
    }


def spread_behaviour(meta: dict):
    """(actor, noise) of the policy that generated a simple_spread dataset of one committed snapshot, else None (also
    when the data record another snapshot than the committed one: another training run's)."""
    from omsd_data.mpe_data import load_behaviour, snapshot
    from omsd_data.policies import actor_from_state_dict

    behaviour = meta.get("behaviour") or {}
    policies = behaviour.get("policies") or []
    if meta.get("task") != "simple_spread" or len(policies) != 1:
        return None
    name = policies[0][0]
    quality = name.removeprefix("seed0/")
    if quality not in SINGLE_POLICY or (behaviour.get("snapshots") or {}).get(name) != snapshot("simple_spread", name):
        return None
    return actor_from_state_dict(load_behaviour("simple_spread", 0)[0][quality]), float(meta["collect_noise"])


def _variants(joint: np.ndarray, agent: np.ndarray, grid: np.ndarray, h: float):
    """The first joint action of every rollout variant (M, V, n, act): the data's, agent i's +-h pair on each
    coordinate (clipped to the box), then agent i at each far action; and the pairs' widths (M, act)."""
    M, act_dim = len(joint), joint.shape[-1]
    first = np.repeat(joint[:, None], 1 + 2 * act_dim + len(grid), 1)
    a_i, m = joint[np.arange(M), agent], np.arange(M)
    step = np.zeros((M, act_dim), np.float32)
    for c in range(act_dim):
        hi, lo = np.clip(a_i[:, c] + h, -1, 1), np.clip(a_i[:, c] - h, -1, 1)
        first[m, 1 + 2 * c, agent, c], first[m, 2 + 2 * c, agent, c] = hi, lo
        step[:, c] = hi - lo
    first[m[:, None], 1 + 2 * act_dim + np.arange(len(grid))[None], agent[:, None]] = grid[None]
    return first, step


def _estimates(G: np.ndarray, step: np.ndarray, grid: np.ndarray, info: dict) -> dict:
    """From the returns G (M, V, K) of `_variants`' rollouts: dQ^mu/da_i by central differences, Q^mu of the data's
    and the far actions, and in `info` how well two halves of the rollouts agree on the gradient."""
    act_dim, K = step.shape[1], G.shape[2]
    diffs = np.stack([(G[:, 1 + 2 * c] - G[:, 2 + 2 * c]) / step[:, c, None] for c in range(act_dim)], 1)  # M,act,K
    half = K // 2
    split = _cos(diffs[..., :half].mean(-1), diffs[..., half:].mean(-1)).mean() if K > 1 else float("nan")
    return {
        "grad": diffs.mean(-1),  # (M, act): dQ^mu/da_i
        "q_data": G[:, 0].mean(-1),  # Q^mu(s, a_data)
        "q_grid": G[:, 1 + 2 * act_dim :].mean(-1),  # (M, grid)
        "grid": grid,
        "info": {**info, "split_half_cosine": float(split)},
    }


@torch.no_grad()
def spread_truth(
    arrays: dict, behaviour, gamma: float, order: list[int], M=M_DEFAULT, K=K_DEFAULT, h=H_DEFAULT, seed=0, chunk=16
) -> dict:
    """Q^mu and dQ^mu/da_i of M simple_spread transitions by Monte Carlo (module docstring); the critic's reward is
    agent 0's. behaviour: (actor (n, B, obs) -> (n, B, act), noise std) as `spread_behaviour` returns. The data are
    whole episodes of the env's 25 steps, one after the other (`critic_truth` checks). The return ends at the time
    limit: a critic that bootstraps through it estimates more on an episode's last steps, the same in its gradient
    wherever the rest of the episode dominates."""
    from envs.mpe import EPISODE_LEN, SpreadBatch

    t0, (actor, noise) = time.time(), behaviour
    n, act_dim = SpreadBatch.n, 2
    N = len(arrays["rewards_0"])
    starts = np.concatenate([[0], np.flatnonzero(arrays["terminals"] | arrays["truncations"])[:-1] + 1])
    t_in_episode = np.arange(N) - starts[np.searchsorted(starts, np.arange(N), side="right") - 1]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(N, min(M, N), replace=False))
    M, agent = len(idx), np.arange(len(idx)) % n
    state = np.concatenate([arrays[f"obs_{i}"][idx] for i in range(n)], 1)
    joint = np.stack([arrays[f"actions_{i}"][idx] for i in range(n)], 1)  # (M, n, act), env order
    grid = far_grid(act_dim)
    first, step = _variants(joint, agent, grid, h)
    V = first.shape[1]
    G = np.zeros((M, V, K))
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    for lo in range(0, M, chunk):
        m = np.arange(lo, min(lo + chunk, M))
        B = len(m) * V * K
        rep = lambda x: np.repeat(np.repeat(x[:, None], V, 1)[:, :, None], K, 2).reshape(B, *x.shape[1:])  # noqa
        sim = SpreadBatch.from_state(rep(state[m]))
        t_row = torch.as_tensor(rep(t_in_episode[idx[m]]))
        act = torch.as_tensor(np.repeat(first[m][:, :, None], K, 2).reshape(B, n, act_dim)).transpose(0, 1)
        ret = torch.zeros(B, dtype=torch.float64)
        for s in range(EPISODE_LEN):
            alive = (t_row + s) < EPISODE_LEN
            if not alive.any():
                break
            if s > 0:  # the behaviour policy; one noise draw shared by the V variants of a (transition, rollout)
                z = torch.randn(n, len(m), 1, K, act_dim, generator=gen).expand(-1, -1, V, -1, -1)
                act = (actor(sim.obs()) + noise * z.reshape(n, B, act_dim)).clamp(-1.0, 1.0)
            r = sim.step(act)[:, 0]
            ret += torch.where(alive, gamma**s * r, torch.zeros_like(r))
        G[m] = ret.reshape(len(m), V, K).numpy()
    info = dict(M=M, K=K, h=h, gamma=gamma, seconds=time.time() - t0)
    return {**_in_order(arrays, idx, order, agent), **_estimates(G, step, grid, info)}


def far_actions(act_dim: int) -> np.ndarray:
    """A few far actions of one agent: the grid {-1, 0, 1}^act for act <= 2, else the centre and +-1 on each axis
    (MaMuJoCo's 3- and 4-dimensional agents: 7 and 9 instead of 27 and 81 rollout variants)."""
    if act_dim <= 2:
        return far_grid(act_dim)
    return np.concatenate([np.zeros((1, act_dim)), np.eye(act_dim), -np.eye(act_dim)]).astype(np.float32)


def mamujoco_behaviour(env_id: str, meta: dict):
    """(actor, noise) of the policy that generated a MaMuJoCo dataset of one committed snapshot (random, medium,
    expert), else None (also when the data record another snapshot than the committed one)."""
    from omsd_data.generation import snapshot_info
    from omsd_data.mamujoco_data import load_behaviour, random_actor
    from omsd_data.policies import actor_from_state_dict

    behaviour = meta.get("behaviour") or {}
    policies = behaviour.get("policies") or []
    if len(policies) != 1 or meta.get("quality") not in SINGLE_POLICY or meta.get("task") != env_id:
        return None
    name = policies[0][0]
    if name.startswith("untrained"):
        return actor_from_state_dict(random_actor(env_id)), float(meta["collect_noise"])
    sds, info = load_behaviour(env_id, 0)
    key = name.removeprefix("seed0/")
    if key not in sds or (behaviour.get("snapshots") or {}).get(name) != snapshot_info(info, key):
        return None
    return actor_from_state_dict(sds[key]), float(meta["collect_noise"])


def mamujoco_rows(env_id: str, arrays: dict, meta: dict, M=64, seed=0) -> dict | None:
    """M rows (at most one in 1,000, at least two per agent) of a Multi-agent MuJoCo dataset that `set_state`
    restores (not Hopper's with a clipped velocity), with what `mamujoco_truth` needs of them (the arrays' keys and
    each row's step in its episode): a run keeps these and frees its arrays. None for data without a known truth
    (not this code's data of one committed behaviour policy, e.g. published data)."""
    from envs.mamujoco import ENV_VERSION, reconstructable

    ours = meta.get("env_family") == "mamujoco" and meta.get("env_version") == ENV_VERSION and "state" in arrays
    if not ours or mamujoco_behaviour(env_id, meta) is None:
        return None

    starts = np.concatenate([[0], np.flatnonzero(arrays["terminals"] | arrays["truncations"])[:-1] + 1])
    pool = np.flatnonzero(reconstructable(env_id, arrays["state"]))
    n = sum(k.startswith("obs_") for k in arrays)  # every agent graded twice at least; tiny test data take seconds
    M = max(2 * n, min(M, len(arrays["rewards_0"]) // 1000))
    idx = np.sort(np.random.default_rng(seed).choice(pool, min(M, len(pool)), replace=False))
    keys = ["state", "rewards_0"] + [k for k in arrays if k.startswith(("obs_", "actions_"))]
    t = idx - starts[np.searchsorted(starts, idx, "right") - 1]
    return {**{k: arrays[k][idx] for k in keys}, "rows": idx, "t": t}


@torch.no_grad()
def mamujoco_truth(
    env_id: str, rows: dict, behaviour, gamma: float, order: list[int], K=16, H=10, h=H_DEFAULT, seed=0
) -> dict:
    """Q^mu and dQ^mu/da_i of `mamujoco_rows`' transitions by Monte Carlo, as `spread_truth`: the simulator set to
    the stored state (`envs.mamujoco.set_state`), agent i's action moved by +-h, far actions from `far_actions`,
    then the behaviour policy for H steps (less where the episode's time limit or a fall comes first) with one
    noise draw per (transition, rollout) shared by the variants. The return is cut after H steps: the cost grows
    with H, and so does the noise of the action gradient (MuJoCo's contacts; HalfCheetah-2x3 medium, 64 rows, 16
    rollouts: two halves of the rollouts agree at a cosine of 1.0 at H 1, 0.53 at 10, 0.10 at 30; docs/studies.md).
    So the truth grades the part of the critic's gradient that the first H steps make. `info` has the split-half
    cosine of these rollouts."""
    from envs.mamujoco import EPISODE_LEN, make_env, set_state

    t0, (actor, noise) = time.time(), behaviour
    probe = make_env(env_id)
    names = probe.possible_agents
    probe.close()
    n, act_dim = len(names), rows["actions_0"].shape[1]
    obs_max = max(rows[f"obs_{i}"].shape[1] for i in range(n))
    M = len(rows["rows"])
    agent = np.arange(M) % n
    joint = np.stack([rows[f"actions_{i}"] for i in range(n)], 1)  # (M, n, act), env order
    grid = far_actions(act_dim)
    first, step = _variants(joint, agent, grid, h)
    V = first.shape[1]
    G = np.zeros((M, V, K))
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    envs = [make_env(env_id) for _ in range(K)]  # the K rollouts of one variant step together
    for m in range(M):
        z = torch.randn(H, n, K, act_dim, generator=gen)  # one noise draw per rollout, shared by the V variants
        horizon = min(H, EPISODE_LEN - int(rows["t"][m]))
        for v in range(V):
            obs = np.zeros((n, K, obs_max), np.float32)
            for env in envs:
                env.reset(seed=0)
                set_state(env, rows["state"][m])
            act, alive = np.repeat(first[m, v][:, None], K, 1), np.ones(K, bool)  # (n, K, act)
            for s in range(horizon):
                if s > 0:  # the behaviour policy
                    act = (actor(torch.as_tensor(obs)) + noise * z[s]).clamp(-1.0, 1.0).numpy()
                for k in np.flatnonzero(alive):
                    nxt, r, term, _, _ = envs[k].step({a: act[i, k] for i, a in enumerate(names)})
                    G[m, v, k] += gamma**s * r[names[0]]
                    for i, a in enumerate(names):
                        obs[i, k, : len(nxt[a])] = nxt[a]
                    alive[k] = not term[names[0]]
                if not alive.any():
                    break
    for env in envs:
        env.close()
    info = dict(M=M, K=K, H=H, h=h, gamma=gamma, seconds=time.time() - t0)
    out = {**_in_order(rows, np.arange(M), order, agent), **_estimates(G, step, grid, info)}
    return {**out, "rows": rows["rows"]}  # the dataset rows


def bandit_truth(arrays: dict, order: list[int], M=M_DEFAULT, seed=0) -> dict:
    """The bandit's exact truth: Q(a) = a_1 a_2, so dQ/da_i is the other agent's action."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(arrays["rewards_0"]), min(M, len(arrays["rewards_0"])), replace=False))
    agent = np.arange(len(idx)) % 2
    a = np.stack([arrays[f"actions_{i}"][idx] for i in range(2)], 1)  # (M, 2, 1), env order
    other = a[np.arange(len(idx)), 1 - agent]  # (M, 1)
    grid = far_grid(a.shape[-1])
    return {
        **_in_order(arrays, idx, order, agent),
        "grad": other.astype(np.float64),
        "q_data": (a[:, 0, 0] * a[:, 1, 0]).astype(np.float64),
        "q_grid": (other * grid[None, :, 0]).astype(np.float64),
        "grid": grid,
        "info": dict(M=len(idx), exact=True),
    }


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def _rows_of(perm, rows: int):
    """A permutation of M transitions applied to a batch of M*r rows stored transition-major."""
    return (perm[:, None] * (rows // len(perm)) + torch.arange(rows // len(perm))[None]).reshape(-1)


def shuffled(q_fn, M: int, seed: int = 0):
    """The negative control: transition b gets the critic's answer for another transition c (its state and actions,
    the gradient routed back to b's action), i.e. a critic that knows nothing of b."""
    perm = torch.as_tensor(np.random.default_rng(seed + 1).permutation(M))

    def q(s, a):
        p = _rows_of(perm, a.shape[0])
        return q_fn(s[p], a[p].detach() + (a - a.detach()))

    return q


def state_shuffled(q_fn, M: int, seed: int = 0):
    """q_fn given another transition's state with the transition's own actions: what the actions alone explain."""
    perm = torch.as_tensor(np.random.default_rng(seed + 2).permutation(M))
    return lambda s, a: q_fn(s[_rows_of(perm, a.shape[0])], a)


def grade(q_fn, truth: dict, controls: bool = True, device="cpu") -> dict:
    """The critic q_fn(state (B, S), joint (B, n*act)) -> (B,) against a truth (module docstring)."""
    M, agent, grid = len(truth["agent"]), truth["agent"], truth["grid"]
    s = torch.as_tensor(truth["state"], dtype=torch.float32, device=device)
    joint = torch.as_tensor(truth["joint"], dtype=torch.float32, device=device).requires_grad_(True)
    with torch.enable_grad():
        q = q_fn(s, joint.reshape(M, -1))
        (g_all,) = torch.autograd.grad(q.sum(), joint)
    g, true = g_all[torch.arange(M), torch.as_tensor(agent)].cpu().numpy().astype(np.float64), truth["grad"]
    cos = _cos(g, true)
    gc, tc = g.copy(), true.copy()
    for i in np.unique(agent):
        gc[agent == i] -= gc[agent == i].mean(0)
        tc[agent == i] -= tc[agent == i].mean(0)
    with torch.no_grad():
        far = np.repeat(truth["joint"][:, None], len(grid), 1)
        far[np.arange(M), :, agent] = grid[None]
        s_far = s.repeat_interleave(len(grid), 0)
        far = torch.as_tensor(far, dtype=torch.float32, device=device).reshape(M * len(grid), -1)
        q_far = q_fn(s_far, far).reshape(M, -1).cpu()
    mc, pick = truth["q_grid"], q_far.numpy().argmax(1)
    gain, best_gain = mc[np.arange(M), pick] - mc.mean(1), mc.max(1) - mc.mean(1)
    q_np = q.detach().cpu().numpy()
    out = {
        "cosine": float(cos.mean()),
        "cosine_se": float(cos.std(ddof=1) / math.sqrt(M)),
        "positive_share": float((cos > 0).mean()),
        "cosine_centred": float(_cos(gc, tc).mean()),
        "far_top1": float((pick == mc.argmax(1)).mean()),
        "far_gain_share": float(gain.mean() / best_gain.mean()) if best_gain.mean() > 0 else float("nan"),
        "grad_norm_ratio": float(np.median(np.linalg.norm(g, axis=1)) / np.median(np.linalg.norm(true, axis=1))),
        "r_q_truth": float(np.corrcoef(q_np, truth["q_data"])[0, 1]) if q_np.std() > 0 else float("nan"),
    }
    if controls:
        out["cosine_states_shuffled"] = grade(state_shuffled(q_fn, M), truth, False, device)["cosine"]
    return out


def critic_truth(
    env_id: str, arrays: dict, meta: dict, gamma: float, order: list[int], M=M_DEFAULT, K=K_DEFAULT, steps=10
):
    """The truth of a run's data where one is known (the bandit; simple_spread and Multi-agent MuJoCo data of one
    committed behaviour policy), else None. The same transitions for every run on the same data: M, but at most one
    in 100 (at least 8), so that tiny test datasets take a fraction of a second. MaMuJoCo: `arrays` may be
    `mamujoco_rows`' (64 rows, at most one in 1,000), rolled on at most 16 times for `steps` steps (10: about 20 s
    on one core for HalfCheetah-2x3)."""
    if meta.get("env_family") == "mamujoco":
        rows = arrays if "t" in arrays else mamujoco_rows(env_id, arrays, meta)
        if rows is None or len(rows["rows"]) == 0:
            return None
        return mamujoco_truth(env_id, rows, mamujoco_behaviour(env_id, meta), gamma, order, min(K, 16), steps)
    M = max(8, min(M, len(arrays["rewards_0"]) // 100))
    if env_id == "bandit":
        return bandit_truth(arrays, order, M)
    behaviour = spread_behaviour(meta) if env_id == "simple_spread" else None
    ends = np.flatnonzero(arrays["terminals"] | arrays["truncations"])
    if behaviour is None or not np.array_equal(ends, np.arange(24, len(arrays["rewards_0"]), 25)):
        return None  # no known behaviour policy, or not whole 25-step episodes
    return spread_truth(arrays, behaviour, gamma, order, M, K)
