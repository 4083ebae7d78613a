"""The paper's three continuous MPE tasks (OMAR's variant), built on mpe2's own classes.

OMSD, like OMAR, MADiff and DoF, evaluates on OMAR's fork of the particle envs, which differs
from stock mpe2 (see docs/datasets.md, "Environments"):

- actions are 2-D in [-1, 1]; the force is `u = a * sensitivity` (what mpe2 computes from its
  5-D Box action `to_mpe2_action(a)`), sensitivity = agent.accel or 5;
- OMAR's physics applies `accel` twice (force = mass * accel * u) and integrates velocity
  before position; `OmarWorld` overrides exactly those two methods of mpe2's `World`;
- OMAR's rewards: spread `sum_l min(1/d_l, 10) - 5 * collisions` per agent; tag/world predators
  share `-0.1 * sum_pred dist(pred, prey) + {10, 5} * #(pred, prey) collisions`;
- `simple_world` is OMAR's 3-vs-1 scenario (1 obstacle, 2 food, 2 forests), not mpe2's
  `simple_world_comm`;
- in tag/world only the 3 predators are controlled; the prey is driven inside the env by a frozen
  learned policy, `LearnedPrey` (trained together with predators by MATD3, as OMAR's prey was, and
  committed as `envs/prey/<task>.pt`); `MPEEnv(task, prey="scripted")` uses the
  hand-written flee rule `scripted_prey_action` instead, and `MPEEnv(task, prey=...)` any policy of the
  prey's observation, e.g. OMAR's pretrained prey (`envs.omar_prey.load_prey`).

Each env is a PettingZoo `ParallelEnv` whose agents are the controlled agents only.
`paper_metric` is the return the paper reports, used by dataset cards and evaluation alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os

import numpy as np
import torch
from gymnasium import spaces
from mpe2._mpe_utils.core import World
from mpe2.simple_spread.simple_spread import Scenario as Mpe2SpreadScenario
from mpe2.simple_tag.simple_tag import ExtendedLandmark
from mpe2.simple_tag.simple_tag import Scenario as Mpe2TagScenario
from pettingzoo import ParallelEnv

TASKS = ("simple_spread", "simple_tag", "simple_world")
EPISODE_LEN = 25
# Bump when dynamics, rewards, observations or the prey change: stored in every dataset.
# v2: the default prey of tag/world is the learned one (v1: the scripted flee rule).
ENV_VERSION = "omar-mpe2-v2"
PREY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prey")
# The paper's normalisation constants (its MPE table; the authors' code):
# score = 100 (R - R_random) / (R_expert - R_random).
PAPER_NORMALIZATION = {
    "simple_spread": {"expert": 516.8, "random": 159.8},
    "simple_tag": {"expert": 185.6, "random": -4.1},
    "simple_world": {"expert": 79.5, "random": -6.8},
}


def paper_metric(task: str, rewards: np.ndarray) -> float:
    """Episode return in the paper's units from per-step rewards of the controlled agents, shape (T, n).

    simple_spread: per-step mean over agents, summed over steps. simple_tag / simple_world:
    predator 0's return (all predators get the same reward).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if task == "simple_spread":
        return float(rewards.mean(axis=1).sum())
    return float(rewards[:, 0].sum())


def normalized_score(task: str, ret: float) -> float:
    """The score with the paper's constants."""
    c = PAPER_NORMALIZATION[task]
    return 100.0 * (ret - c["random"]) / (c["expert"] - c["random"])


PAPER_CLOSE = 0.15  # reference returns this close to the paper's (a share of its R_expert - R_random) compare


def paper_comparison(task: str, ref: dict | None) -> dict | None:
    """The paper's constants of `task` (as a "normalization" record) when a dataset's reference returns `ref` are
    both within PAPER_CLOSE of the paper's range R_expert - R_random of them, else None: only then does a score
    normalised with the paper's constants say something about the paper's numbers."""
    c = PAPER_NORMALIZATION.get(task)
    if c is None or ref is None:
        return None
    tol = PAPER_CLOSE * (c["expert"] - c["random"])
    if abs(ref["random"] - c["random"]) > tol or abs(ref["expert"] - c["expert"]) > tol:
        return None
    return {**c, "source": "the OMSD paper's MPE constants (envs/mpe.py PAPER_NORMALIZATION)"}


def to_mpe2_action(a: np.ndarray) -> np.ndarray:
    """OMAR's 2-D action (a_x, a_y) in [-1, 1]^2 -> mpe2's 5-D Box action [no_op, left, right, down, up].

    mpe2 turns the 5-D action into u = (a[2] - a[1], a[4] - a[3]) * sensitivity, which is (a_x, a_y) * sensitivity.
    """
    a = np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)
    return np.array([0.0, max(-a[0], 0.0), max(a[0], 0.0), max(-a[1], 0.0), max(a[1], 0.0)], dtype=np.float32)


class OmarWorld(World):
    """mpe2's World with OMAR's two physics differences (everything else is inherited)."""

    def apply_action_force(self, p_force):
        # OMAR: force = mass * accel * u, and u already carries the accel as sensitivity (accel^2 overall).
        for i, agent in enumerate(self.agents):
            if agent.movable:
                scale = agent.mass * agent.accel if agent.accel is not None else agent.mass
                p_force[i] = scale * agent.action.u
        return p_force

    def apply_environment_force(self, p_force):
        # mpe2's pairwise soft contact force, computed for all pairs in one numpy op (the Python
        # double loop over pairs was the slowest part of a step). tests/test_mpe_env.py checks it
        # against mpe2's own method.
        ents = [e for e in self.entities if e.collide]
        if len(ents) < 2:
            return p_force
        pos = np.array([e.state.p_pos for e in ents])
        size = np.array([e.size for e in ents])
        delta = pos[:, None, :] - pos[None, :, :]  # (a, b): p_a - p_b
        dist = np.sqrt(np.sum(delta**2, axis=-1))
        dist[dist == 0] = 1.0  # self pairs (and exactly coincident entities, NaN in mpe2) get zero force
        k = self.contact_margin
        penetration = np.logaddexp(0, -(dist - (size[:, None] + size[None, :])) / k) * k
        force = self.contact_force * delta / dist[..., None] * penetration[..., None]
        total = force.sum(axis=1)  # diagonal terms are 0 because delta is 0 there
        index = {id(e): i for i, e in enumerate(self.entities)}
        for j, e in enumerate(ents):
            if e.movable:
                i = index[id(e)]
                p_force[i] = total[j] if p_force[i] is None else p_force[i] + total[j]
        return p_force

    def integrate_state(self, p_force):
        # OMAR: damp, add force, cap speed, *then* move (mpe2 moves with the old velocity first).
        for i, entity in enumerate(self.entities):
            if not entity.movable:
                continue
            entity.state.p_vel = entity.state.p_vel * (1 - self.damping)
            if p_force[i] is not None:
                entity.state.p_vel = entity.state.p_vel + (p_force[i] / entity.mass) * self.dt
            if entity.max_speed is not None:
                speed = np.sqrt(np.sum(np.square(entity.state.p_vel)))
                if speed > entity.max_speed:
                    entity.state.p_vel = entity.state.p_vel / speed * entity.max_speed
            entity.state.p_pos = entity.state.p_pos + entity.state.p_vel * self.dt


def _into_omar_world(world: World) -> OmarWorld:
    w = OmarWorld()
    w.agents, w.landmarks, w.dim_c = world.agents, world.landmarks, world.dim_c
    return w


def _dist(x, y) -> float:
    return math.dist(x.state.p_pos, y.state.p_pos)


def _is_collision(a, b) -> bool:
    return _dist(a, b) < a.size + b.size


class SpreadScenario(Mpe2SpreadScenario):
    """mpe2's simple_spread (3 agents, 3 landmarks, obs 18) with OMAR's reward."""

    def make_world(self, N: int = 3):
        return _into_omar_world(super().make_world(N))

    def is_collision(self, agent1, agent2):
        return _is_collision(agent1, agent2)

    def reward(self, agent, world):
        rew = 0.0
        for lm in world.landmarks:
            d = min(_dist(a, lm) for a in world.agents)
            rew += 10.0 if d <= 0.1 else 1.0 / d  # = min(1/d, 10), also at d = 0
        for a in world.agents:
            if a is not agent and self.is_collision(a, agent):
                rew -= 5.0
        return rew


class TagScenario(Mpe2TagScenario):
    """mpe2's simple_tag (3 predators + 1 prey, 2 obstacles; predator obs 16) with OMAR's shaped reward."""

    collision_bonus = 10.0

    def make_world(self, num_good: int = 1, num_adversaries: int = 3, num_obstacles: int = 2):
        return _into_omar_world(super().make_world(num_good, num_adversaries, num_obstacles))

    def is_collision(self, agent1, agent2):
        return _is_collision(agent1, agent2)

    def adversary_reward(self, agent, world):
        # Identical for every predator: distance shaping of the whole team plus every catch.
        prey, preds = self.good_agents(world), self.adversaries(world)
        rew = -0.1 * sum(min(_dist(p, adv) for p in prey) for adv in preds)
        rew += self.collision_bonus * sum(self.is_collision(p, adv) for p in prey for adv in preds)
        return rew


class WorldScenario(TagScenario):
    """OMAR's 3-vs-1 `simple_world`: 1 obstacle, 2 food, 2 forests; predator obs 24, prey obs 22.

    All agents are "leaders" in OMAR's file, so forests never hide anyone from observation;
    they only show up as in-forest flags. Predators get +5 per catch.
    """

    collision_bonus = 5.0

    def make_world(self, num_good: int = 1, num_adversaries: int = 3, num_obstacles: int = 1):
        world = super().make_world(num_good, num_adversaries, num_obstacles)
        for agent in world.agents:
            if not agent.adversary:
                agent.size = 0.045  # smaller prey than in tag
        world.food, world.forests = [], []
        for kind, n, size in (("food", 2, 0.03), ("forest", 2, 0.3)):
            for i in range(n):
                lm = ExtendedLandmark()
                lm.name, lm.collide, lm.movable, lm.size, lm.boundary = f"{kind} {i}", False, False, size, False
                (world.food if kind == "food" else world.forests).append(lm)
        world.landmarks = world.landmarks + world.food + world.forests
        return world

    def reset_world(self, world, np_random):
        super().reset_world(world, np_random)  # agents in [-1, 1]^2, all landmarks in [-0.9, 0.9]^2
        for lm in world.landmarks:
            lm.color = np.array([0.6, 0.9, 0.6]) if lm in world.forests else np.array([0.25, 0.25, 0.25])

    def observation(self, agent, world):
        in_forest = [np.array([1.0 if self.is_collision(agent, f) else -1.0]) for f in world.forests]
        entity_pos = [lm.state.p_pos - agent.state.p_pos for lm in world.landmarks]  # obstacle, food, forests
        others = [o for o in world.agents if o is not agent]
        other_pos = [o.state.p_pos - agent.state.p_pos for o in others]
        other_vel = [o.state.p_vel for o in others if not o.adversary]
        return np.concatenate([agent.state.p_vel, agent.state.p_pos] + entity_pos + other_pos + other_vel + in_forest)


SCENARIOS = {"simple_spread": SpreadScenario, "simple_tag": TagScenario, "simple_world": WorldScenario}


def scripted_prey_action(prey, world) -> np.ndarray:
    """The hand-written prey of tag/world (`MPEEnv(task, prey="scripted")`, the default of env version
    omar-mpe2-v1): flee from the predators, weighted by closeness, and turn back before leaving the arena."""
    pos = prey.state.p_pos
    push = np.zeros(2)
    for adv in world.agents:
        if adv.adversary:
            d = pos - adv.state.p_pos
            push += d / (np.sum(d * d) + 1e-2)
    push /= np.linalg.norm(push) + 1e-8
    push -= 2.0 * np.clip(np.abs(pos) - 0.6, 0.0, None) * np.sign(pos)  # walls start pushing at |x| = 0.6
    return np.clip(PREY_EFFORT * push, -1.0, 1.0)


PREY_EFFORT = 0.5  # fraction of full thrust the prey uses
# Size of the prey's observation, the input of OMAR's prey network: tag 14 =
# vel 2, pos 2, 2 obstacles 4, 3 predators 6; world 22 = vel 2, pos 2, 5 landmarks 10, 3 predators 6,
# 2 in-forest flags. MPEEnv checks its own prey observation against it.
PREY_OBS_DIMS = {"simple_tag": 14, "simple_world": 22}


class PreyError(ValueError):
    """A prey file that cannot be used (missing, not a prey, another task's); the scripts print it as one line."""


class LearnedPrey:
    """The default prey of tag/world: the prey's actor of a prey-predator MATD3 co-training run, frozen
    (`python -m omsd_data.train_behaviour --task <task> --train-prey`), run in numpy: tanh(MLP(obs)).

    Call it with one observation (obs_dim,) or a batch (B, obs_dim); returns the action(s) in [-1, 1]."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise PreyError(
                f"the learned prey {path} is missing; restore it from git or retrain it with "
                f"`python -m omsd_data.train_behaviour --task {os.path.basename(path)[: -len('.pt')]} --train-prey`"
            )
        obj = torch.load(path, map_location="cpu", weights_only=True)  # our own file, plain tensors
        self.path = path
        self.info = json.loads(obj["info_json"])
        self.task, self.obs_dim = self.info["task"], int(self.info["obs_dim"])
        p = {k: v[0].numpy().astype(np.float32) for k, v in obj["policy"].items()}  # drop the stacking axis
        self.layers = [(p[f"l{i}.weight"], p[f"l{i}.bias"][0]) for i in (1, 2, 3)]
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, np.float32)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            h = np.maximum(h, 0) if i < 2 else np.tanh(h)
        return h


@functools.cache
def learned_prey(task: str) -> LearnedPrey:
    """The committed learned prey of `task` (loaded once per process)."""
    return LearnedPrey(os.path.join(PREY_DIR, f"{task}.pt"))


class MPEEnv(ParallelEnv):
    """PettingZoo parallel env over the controlled agents of one OMAR-style MPE task.

    Actions: Box(-1, 1, (2,)) per agent. Episodes end by truncation after `max_cycles` steps
    (never by termination). `state()` is the concatenation of all agents' observations,
    the prey's included.

    prey (tag/world only): None for the env's `learned_prey(task)`, "scripted" for `scripted_prey_action`,
    or a policy for the prey (agent index 3), called each step with the prey's observation (np.float32
    array of PREY_OBS_DIMS[task] values) and returning its 2-D action in [-1, 1]. The observation is that of
    the scenario's `observation` function, which follows OMAR's (and mpe2's) layout: own velocity,
    own position, landmark positions, other agents' positions (all relative to the prey), and in
    world the two in-forest flags; OMAR's prey network takes this vector as it is. A policy with an
    `obs_dim` attribute (envs.omar_prey.load_prey) is checked against it.

    control_prey (tag/world only): the prey is a controlled agent too, the last one (observation of
    PREY_OBS_DIMS[task] values, mpe2's prey reward: -10 per catch and the arena-boundary penalty); for
    co-training prey and predators (`python -m omsd_data.train_behaviour --task simple_tag --train-prey`).
    """

    metadata = {"render_modes": [], "is_parallelizable": True}

    def __init__(self, task: str = "simple_spread", max_cycles: int = EPISODE_LEN, prey=None, control_prey=False):
        if task not in SCENARIOS:
            raise ValueError(f"unknown MPE task {task!r}; choose one of {', '.join(TASKS)}")
        if (prey is not None or control_prey) and task not in PREY_OBS_DIMS:
            raise ValueError(f"{task} has no prey; a prey policy is for {' and '.join(PREY_OBS_DIMS)} only")
        if prey is not None and control_prey:
            raise ValueError("give either a prey policy or control_prey=True, not both")
        if isinstance(prey, str) and prey != "scripted":
            raise ValueError(f"prey must be None (the learned prey), 'scripted' or a policy, got {prey!r}")
        if prey is None and task in PREY_OBS_DIMS and not control_prey:
            prey = learned_prey(task)
        self.task, self.max_cycles, self.prey_policy = task, max_cycles, prey
        self.metadata = dict(self.metadata, name=f"{task}_omar")
        self.scenario = SCENARIOS[task]()
        self.world = self.scenario.make_world()
        controlled = [a for a in self.world.agents if getattr(a, "adversary", True) or control_prey]
        self._controlled = controlled
        self._prey = [a for a in self.world.agents if a not in controlled]
        self.possible_agents = [a.name for a in controlled]
        self.agents = list(self.possible_agents)
        self.np_random = np.random.default_rng()
        self.scenario.reset_world(self.world, self.np_random)
        obs_dims = {a.name: len(self.scenario.observation(a, self.world)) for a in controlled}
        self.state_space = spaces.Box(-np.inf, np.inf, (len(self._all_obs()),), np.float32)
        if task in PREY_OBS_DIMS:
            prey_dim = len(self.scenario.observation(self.world.agents[-1], self.world))
            assert prey_dim == PREY_OBS_DIMS[task], (task, prey_dim)  # what OMAR's prey network takes
            want = getattr(prey, "obs_dim", None)
            if want is not None and want != prey_dim:
                raise ValueError(
                    f"the prey policy takes observations of {want} values, but the prey of {task} "
                    f"observes {prey_dim}; it belongs to another task "
                    f"({', '.join(f'{k}: {v}' for k, v in PREY_OBS_DIMS.items())})"
                )
        self._obs_spaces = {n: spaces.Box(-np.inf, np.inf, (d,), np.float32) for n, d in obs_dims.items()}
        self._act_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.t = 0

    def observation_space(self, agent):
        return self._obs_spaces[agent]

    def action_space(self, agent):
        return self._act_space

    def _obs(self):
        return {a.name: self.scenario.observation(a, self.world).astype(np.float32) for a in self._controlled}

    def _all_obs(self):
        return np.concatenate([self.scenario.observation(a, self.world) for a in self.world.agents]).astype(np.float32)

    def state(self) -> np.ndarray:
        return self._all_obs()

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
        self.scenario.reset_world(self.world, self.np_random)
        self.agents, self.t = list(self.possible_agents), 0
        return self._obs(), {a: {} for a in self.agents}

    def _prey_action(self, prey) -> np.ndarray:
        if isinstance(self.prey_policy, str):  # "scripted" (checked in __init__)
            return scripted_prey_action(prey, self.world)
        return self.prey_policy(self.scenario.observation(prey, self.world).astype(np.float32))

    def step(self, actions):
        for agent in self.world.agents:
            a = self._prey_action(agent) if agent in self._prey else actions[agent.name]
            sensitivity = agent.accel if agent.accel is not None else 5.0
            agent.action.u = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0) * sensitivity
            agent.action.c = np.zeros(self.world.dim_c)
        self.world.step()
        self.t += 1
        obs = self._obs()
        rewards = {a.name: float(self.scenario.reward(a, self.world)) for a in self._controlled}
        done = self.t >= self.max_cycles
        terms = {a: False for a in self.agents}
        truncs = {a: done for a in self.agents}
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos


class SpreadBatch:
    """B copies of simple_spread stepped together in float64 torch (the same equations as `MPEEnv`, which
    tests/test_critic_gradient.py checks step by step): the simulator of the critic's Monte-Carlo ground truth
    (omsd_utils/critic_gradient.py), which rolls out hundreds of thousands of episodes at once.
    pos, vel: (B, 3, 2) of the agents; lm: (B, 3, 2) of the landmarks."""

    dt, damping, contact_force, contact_margin, size, sensitivity, n = 0.1, 0.25, 100.0, 1e-3, 0.15, 5.0, 3

    def __init__(self, pos, vel, lm):
        self.pos, self.vel, self.lm = (torch.as_tensor(x, dtype=torch.float64).clone() for x in (pos, vel, lm))

    @classmethod
    def from_state(cls, state):
        """From env.state() rows (B, 54), the agents' observations [vel, pos, landmarks - pos, others - pos, comm]:
        landmarks are the mean over agents of pos + relative position (float32 storage: errors ~1e-7)."""
        s = torch.as_tensor(np.asarray(state), dtype=torch.float64).reshape(len(state), cls.n, -1)
        vel, pos = s[..., 0:2], s[..., 2:4]
        return cls(pos, vel, (pos.unsqueeze(2) + s[..., 4:10].reshape(-1, cls.n, 3, 2)).mean(1))

    def obs(self) -> torch.Tensor:
        """(n, B, 18) float32 observations in the env's layout (the 4 comm values are 0: spread agents are silent)."""
        B, out = self.pos.shape[0], []
        for i in range(self.n):
            p = self.pos[:, i]
            others = [self.pos[:, j] - p for j in range(self.n) if j != i]
            rel = (self.lm - p.unsqueeze(1)).reshape(B, -1)
            out.append(torch.cat([self.vel[:, i], p, rel, *others, torch.zeros(B, 4, dtype=torch.float64)], -1))
        return torch.stack(out).float()

    def step(self, act) -> torch.Tensor:
        """act (n, B, 2), clipped to [-1, 1] as the env does; returns every agent's reward (B, n). Differentiable in
        act (inside the box)."""
        u = act.to(torch.float64).clamp(-1.0, 1.0).transpose(0, 1) * self.sensitivity  # (B, n, 2)
        delta = self.pos.unsqueeze(2) - self.pos.unsqueeze(1)  # (B, a, b, 2): p_a - p_b
        dist = delta.pow(2).sum(-1).sqrt()
        dist = torch.where(dist == 0, torch.ones_like(dist), dist)
        k = self.contact_margin
        penetration = torch.logaddexp(torch.zeros_like(dist), -(dist - 2 * self.size) / k) * k
        contact = (self.contact_force * delta / dist.unsqueeze(-1) * penetration.unsqueeze(-1)).sum(2)
        self.vel = self.vel * (1 - self.damping) + (u + contact) * self.dt  # OMAR: damp, push, then move
        self.pos = self.pos + self.vel * self.dt
        d_lm = (self.pos.unsqueeze(2) - self.lm.unsqueeze(1)).pow(2).sum(-1).sqrt().min(1).values  # (B, landmarks)
        cover = torch.where(d_lm <= 0.1, torch.full_like(d_lm, 10.0), 1.0 / d_lm).sum(-1)
        d_ag = (self.pos.unsqueeze(2) - self.pos.unsqueeze(1)).pow(2).sum(-1).sqrt()
        hits = ((d_ag < 2 * self.size) & ~torch.eye(self.n, dtype=torch.bool)).sum(-1).to(torch.float64)
        return cover.unsqueeze(-1) - 5.0 * hits
