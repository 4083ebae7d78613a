"""Which part limits a score: the behaviour models (stage 1a), the critic (stage 1b) or the extraction (stage 2).

Both scripts call `diagnose` after training, with their models, their data and their own functions (the sampler,
the denoising loss, the conditioning and an evaluation rollout), so that this module never imports a script:

- the behaviour models' fit: denoising loss on held-out (or every 50th) episodes, the distance of DDIM samples given
  the data's prefix actions to the data's action, and their return when they act as a joint policy;
- the critic: Q of dataset actions against discounted Monte-Carlo returns (`pearson_r`), and where a ground truth is
  known, the direction of its action gradient (`gradient`: omsd_utils/critic_gradient.py);
- the policy: its distance from the data's support at the states of its evaluation episodes (the authors' planned
  OOD measure), against the data's own distance;
- on the controlled simple_spread data also which coordination convention samples and episodes follow
  (`conventions`: omsd_data/mpe_data.py, which defines them).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from omsd_utils.critic_gradient import grade


@torch.no_grad()
def behaviour_fit(
    fns: dict, score_net, data, rows, cond_base, mask, sample_steps: int, order, early=None, conventions=None
):
    """Denoising loss of every position's model on `rows`, and where DDIM samples given the dataset's prefix land:
    their distance to the dataset action; on controlled data, at the rows `early`, whether they lie near a
    convention's action and whether it is the convention the data's action is nearest to.
    fns: the script's "sample_actions", "diffusion_loss" and "condition"."""
    g = torch.Generator(rows.device).manual_seed(12345)

    def given_prefix(idx):  # the dataset actions of `idx` and DDIM samples given the dataset's prefix actions
        a0 = data["act"][idx].transpose(0, 1)
        z = torch.randn(a0.shape, generator=g, device=a0.device)
        return a0, fns["sample_actions"](score_net, cond_base(idx), mask, z, sample_steps, a_prev=a0)

    a0 = data["act"][rows].transpose(0, 1)
    cond = fns["condition"](cond_base(rows), a0, mask)
    loss = torch.stack([fns["diffusion_loss"](score_net, a0, cond, g) for _ in range(8)]).mean(0)
    a0, samples = given_prefix(rows)
    out = {"denoising_loss": loss.tolist(), "sample_to_data_distance": (samples - a0).norm(dim=-1).mean(1).tolist()}
    if early is not None:  # the first steps of the held-out episodes, where the conventions' actions are far apart
        a0, samples = given_prefix(early)
        samples = samples.cpu().numpy()
        table = conventions.convention_table(data["obs"][early].transpose(0, 1).cpu().numpy(), order)
        d_s = np.linalg.norm(samples[None] - table, axis=-1)
        d_a = np.linalg.norm(a0.cpu().numpy()[None] - table, axis=-1)
        out["samples_near_a_convention"] = (d_s.min(0) < conventions.NEAR).mean(1).tolist()
        out["samples_follow_data_convention"] = (d_s.argmin(0) == d_a.argmin(0)).mean(1).tolist()
    return out


class BehaviourSampler(torch.nn.Module):
    """The joint behaviour policy stage 1a represents, mu(a|s) = prod_k mu_k(a_k | o_k, a_<k), as a policy: a fresh
    DDIM sample per step, agent by agent, each conditioned on the samples of the agents before it (so it is not
    decentralised: it is a diagnostic of the models, not a policy to deploy)."""

    def __init__(self, sample_actions, score_net, mask, act_dim: int, steps: int, gen):
        super().__init__()
        self.sample_actions, self.score_net, self.mask = sample_actions, score_net, mask
        self.act_dim, self.steps, self.gen = act_dim, steps, gen

    def forward(self, obs):  # (n, E, obs) -> (n, E, act)
        z = torch.randn(*obs.shape[:2], self.act_dim, generator=self.gen, device=obs.device)
        return self.sample_actions(self.score_net, obs, self.mask, z, self.steps)


@torch.no_grad()
def support_distance(states, acts, pool_states, pool_acts, k: int = 20) -> np.ndarray:
    """For every (state, joint action): the distance from the action to the nearest joint action of the dataset
    among the k dataset states nearest to the state (standardised), the authors' planned OOD measure."""
    mu, sd = pool_states.mean(0), pool_states.std(0) + 1e-6
    pool = (pool_states - mu) / sd
    out = []
    for lo in range(0, len(states), 256):
        nn_idx = torch.cdist((states[lo : lo + 256] - mu) / sd, pool).topk(k, largest=False).indices  # (m, k)
        out.append((acts[lo : lo + 256, None] - pool_acts[nn_idx]).norm(dim=-1).min(1).values)
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def critic_quality(q_target, data, ends, gamma: float, n: int = 10_000) -> dict:
    """Q (mean of the two target heads) of dataset actions against their discounted Monte-Carlo returns to the end
    of the episode (ends: the last row of every episode), on n evenly spaced transitions."""
    r = data["reward"].cpu().numpy().astype(np.float64)
    last = np.zeros(len(r), bool)
    last[ends] = True
    G = np.zeros_like(r)
    for t in range(len(r) - 1, -1, -1):
        G[t] = r[t] + (0.0 if last[t] or t == len(r) - 1 else gamma * G[t + 1])
    idx = np.linspace(0, len(r) - 1, min(n, len(r))).astype(int)
    joint = data["act"][idx].reshape(len(idx), -1)
    q = q_target(data["critic_state"][idx], joint).mean(0).cpu().numpy()
    g = G[idx]
    corr = float(np.corrcoef(q, g)[0, 1]) if q.std() > 0 and g.std() > 0 else float("nan")
    return {
        "q_mean": float(q.mean()),
        "mc_return_mean": float(g.mean()),
        "abs_error": float(np.abs(q - g).mean()),
        "pearson_r": corr,
    }


def rounded(x, digits: int = 4):
    """x with every float rounded (for results.json)."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return round(x, digits) if isinstance(x, float) else x


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """{'a/b_0': x, ...}: the numbers of a nested dict of diagnostics, for TensorBoard."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, list):
            out.update({f"{prefix}{k}_{i}": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def held_out(ends: np.ndarray, n_rows: int, every: int = 50) -> np.ndarray:
    """The rows of every `every`-th episode (the last episode of a smaller dataset): left out of stage 1a's training
    on MPE, and where the behaviour models' fit and the data's own support distance are measured."""
    episode = np.searchsorted(ends, np.arange(n_rows))
    return (episode % every == every - 1) if episode.max() >= every - 1 else episode == episode.max()


def diagnose(
    fns: dict,
    score_net,
    q_target,
    actors,
    data: dict,
    ends: np.ndarray,
    mask,
    *,
    sample_steps: int,
    gamma: float,
    seed: int,
    order: list[int],
    heldout: bool,
    n_conventions: int = 0,
    conventions=None,
    joint_state: str = "critic_state",
    max_policy_steps: int | None = None,
    max_pool: int | None = None,
    gradient_truth: dict | None = None,
    writer=None,
    step: int = 0,
) -> dict:
    """All of the above, rounded for results.json (and logged to TensorBoard under diagnostics/ with `writer`).

    fns: the script's "sample_actions", "diffusion_loss", "condition" and "rollout": rollout(policy) plays the final
    evaluation's episodes and returns (mean return, obs (n, steps, obs), act (n, steps, act), last obs (n, E, obs)),
    optionally followed by a dict of more numbers of the episodes (reported with the behaviour sampler's return).
    ends: the last row of every episode. Every 50th episode (the last one of a smaller dataset) is where the models'
    fit and the data's own support distance are measured; `heldout`: stage 1a did not train on it. joint_state: the
    data key the support distance compares states by; max_policy_steps / max_pool: subsample the policy's steps and
    the pool of dataset rows (the exact nearest-neighbour search is quadratic). gradient_truth: the Monte-Carlo
    truth of the critic's action gradient (omsd_utils/critic_gradient.py), graded into critic/gradient."""
    t0, device = time.time(), data["obs"].device
    N = data["obs"].shape[0]
    episode, is_ref = np.searchsorted(ends, np.arange(N)), held_out(ends, N)
    rows = torch.as_tensor(np.flatnonzero(is_ref))
    rows = (
        rows[: min(2048, len(rows))] if heldout else rows[torch.linspace(0, len(rows) - 1, min(2048, len(rows))).long()]
    )
    rows = rows.to(device)
    early = None
    if n_conventions:  # the first steps of the held-out episodes, where the conventions' actions are far apart
        step_in_episode = np.arange(N) - np.concatenate([[0], ends + 1])[episode]
        early = torch.as_tensor(np.flatnonzero(is_ref & (step_in_episode < 5))).to(device)
    cond_base = lambda idx: data["obs"][idx].transpose(0, 1)  # noqa: E731
    behaviour = behaviour_fit(fns, score_net, data, rows, cond_base, mask, sample_steps, order, early, conventions)
    loss = behaviour.pop("denoising_loss")  # named for whether stage 1a saw these rows
    seen = {"denoising_loss": loss, "denoising_loss_rows": "every 50th episode, seen in training"}
    behaviour = {"heldout_denoising_loss": loss, **behaviour} if heldout else {**seen, **behaviour}
    out = {"behaviour": behaviour, "critic": critic_quality(q_target, data, ends, gamma)}
    if gradient_truth is not None:  # the actors' critic: the mean of the two target heads
        q_fn = lambda s, a: q_target(s, a).mean(0)  # noqa: E731
        out["critic"]["gradient"] = {**grade(q_fn, gradient_truth, device=device), "truth": gradient_truth["info"]}
    if actors is not None:
        _, obs_e, act_e, obs_last, *_ = fns["rollout"](actors)  # the same episodes as the final evaluation
        obs_t, act_t = torch.as_tensor(obs_e), torch.as_tensor(act_e)
        if max_policy_steps is not None:
            pick = torch.linspace(0, obs_t.shape[1] - 1, min(max_policy_steps, obs_t.shape[1])).long()
            obs_t, act_t = obs_t[:, pick], act_t[:, pick]
        others = torch.as_tensor(np.flatnonzero(~is_ref) if (heldout or (~is_ref).any()) else np.arange(N))
        if max_pool is not None:
            others = others[torch.linspace(0, len(others) - 1, min(max_pool, len(others))).long()]
        pool = others.to(device)
        ref = rows[torch.linspace(0, len(rows) - 1, min(500, len(rows))).long()]
        if heldout:  # all held-out rows, not only the 2,048 of the fit
            held = torch.as_tensor(np.flatnonzero(is_ref))
            ref = held[torch.linspace(0, len(held) - 1, min(500, len(held))).long()].to(device)

        def joint(x):  # (B, n, d) -> (B, n * d)
            return x.reshape(x.shape[0], -1)

        flat = lambda x: x.transpose(0, 1).reshape(x.shape[1], -1).to(device)  # noqa: E731
        pool_s = data[joint_state][pool] if joint_state == "critic_state" else joint(data[joint_state][pool])
        pool_a = joint(data["act"][pool])
        ref_s = data[joint_state][ref] if joint_state == "critic_state" else joint(data[joint_state][ref])
        d_pol = support_distance(flat(obs_t), flat(act_t), pool_s, pool_a)
        d_ref = support_distance(ref_s, joint(data["act"][ref]), pool_s, pool_a)
        out["policy"] = {
            "support_distance": float(d_pol.mean()),
            "support_distance_data": float(d_ref.mean()),
            "ood_share": float((d_pol > np.quantile(d_ref, 0.95)).mean()),
        }
        if n_conventions:
            E = obs_last.shape[1]
            table = conventions.convention_table(obs_e[:, :E], order)
            out["policy"]["conventions_first_step"] = conventions.convention_stats(act_e[:, :E], table)
            out["policy"]["final_assignment"] = conventions.assignment_stats(obs_last, order, n_conventions)
        g = torch.Generator(device).manual_seed(seed * 1000 + 5)
        sampler = BehaviourSampler(fns["sample_actions"], score_net, mask, data["act"].shape[-1], sample_steps, g)
        ret, _, _, s_last, *more = fns["rollout"](sampler)
        score_net.eval()  # the rollout leaves its policy in train mode
        out["behaviour"]["sampler"] = {"return": ret, **(more[0] if more else {})}
        if n_conventions:
            out["behaviour"]["sampler"]["final_assignment"] = conventions.assignment_stats(s_last, order, n_conventions)
    out["seconds"] = time.time() - t0
    out = rounded(out)
    if writer is not None:
        for key, v in flat_scalars(out).items():
            writer.add_scalar(f"diagnostics/{key}", v, step)
    return out
