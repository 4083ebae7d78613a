"""Frames of one episode, headless, and GIFs of them.

- `mpe_frames`: the project's `MPEEnv` drawn by mpe2's own renderer (`SimpleEnv.draw`: pygame, white background,
  entities as filled circles in their colours with mpe2's sizes, the camera zooming to the entities' extent); the
  agents' indices are written on them. Headless through `SDL_VIDEODRIVER=dummy` (set here if unset): the picture
  is drawn on an off-screen pygame Surface, no window is opened.
- `mamujoco_frames`: `envs.mamujoco.make_env`'s env drawn by MuJoCo's renderer through Gymnasium's own
  `MujocoRenderer` of the underlying single-agent task (its default tracking camera), off screen; `MUJOCO_GL` is
  set to `egl` here if unset (the backend that works headless on this project's machines; `osmesa` needs
  libOSMesa, see docs/results.md).
- `save_gif`: a list of HxWx3 uint8 frames as an endlessly looping GIF (Pillow).

A policy maps the env's observation dict {agent: obs} to an action dict {agent: action}. `rewards`, if given a list,
receives every step's reward dict, so that the caller can compute the episode's return.
"""

from __future__ import annotations

import os
import types

import numpy as np

MPE_SIZE = 256  # px of the MPE frames (mpe2 draws on 700 x 700; downscaled)
MAMUJOCO_SIZE = 320


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.LANCZOS))


def _mpe_canvas(env):
    """What mpe2's `SimpleEnv.draw` reads from its env, around the project's world (drawn at mpe2's 700 px)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import pygame
    import pygame.freetype
    from mpe2._mpe_utils import simple_env

    pygame.freetype.init()
    font = pygame.freetype.Font(os.path.join(os.path.dirname(simple_env.__file__), "secrcode.ttf"), 24)
    label_font = pygame.freetype.Font(None, 44)  # pygame's own bold sans: readable after downscaling
    canvas = types.SimpleNamespace(
        world=env.world,
        width=700,
        height=700,
        screen=pygame.Surface([700, 700]),
        game_font=font,
        label_font=label_font,
        dynamic_rescaling=True,
        continuous_actions=True,
    )
    return canvas, simple_env.SimpleEnv.draw


def _mpe_draw(env, canvas, draw, size: int) -> np.ndarray:
    import pygame

    draw(canvas)
    # mpe2's own geometry (draw's), to write each controlled agent's index on it
    poses = np.array([e.state.p_pos for e in env.world.entities])
    cam_range = np.max(np.abs(poses))
    for k, agent in enumerate(env._controlled):
        x, y = agent.state.p_pos
        x = (x / cam_range) * canvas.width // 2 * 0.9 + canvas.width // 2
        y = (-y / cam_range) * canvas.height // 2 * 0.9 + canvas.height // 2
        # mpe2's radius (draw's, with its dynamic rescaling); the index goes upper left of the centre, where a
        # landmark under the agent stays visible
        r = agent.size * 350 * 0.9 * canvas.original_cam_range / cam_range
        rect = canvas.label_font.get_rect(str(k))
        x, y = x - 0.45 * r - rect.width / 2, y - 0.45 * r - rect.height / 2
        canvas.label_font.render_to(canvas.screen, (x, y), str(k), (255, 255, 255))
    frame = np.transpose(np.array(pygame.surfarray.pixels3d(canvas.screen)), (1, 0, 2))
    return _resize(np.ascontiguousarray(frame), size)


def mpe_frames(env, policy, seed: int, size: int = MPE_SIZE, rewards: list | None = None) -> list[np.ndarray]:
    """One episode of `envs.mpe.MPEEnv` from env.reset(seed=seed): the first frame and one after every step
    (max_cycles + 1 frames of size x size x 3 uint8)."""
    obs, _ = env.reset(seed=seed)
    canvas, draw = _mpe_canvas(env)
    canvas.original_cam_range = np.max(np.abs(np.array([e.state.p_pos for e in env.world.entities])))  # as mpe2's reset
    frames = [_mpe_draw(env, canvas, draw, size)]
    while env.agents:
        obs, r, _, _, _ = env.step(policy(obs))
        if rewards is not None:
            rewards.append(r)
        frames.append(_mpe_draw(env, canvas, draw, size))
    return frames


def mamujoco_frames(
    env,
    policy,
    seed: int,
    size: int = MAMUJOCO_SIZE,
    every: int = 1,
    rewards: list | None = None,
    video_steps: int | None = None,
    step_check=None,
) -> list[np.ndarray]:
    """One episode of an `envs.mamujoco.make_env` env from env.reset(seed=seed), until termination or truncation:
    the first frame and one after every `every`-th step of the first `video_steps` steps (all if None; size x size
    x 3 uint8). The whole episode is played whatever `every` and `video_steps` are, so `rewards` gets every step.
    step_check(env, obs, rewards) -> '' or why the episode must stop (e.g. oma_sd_mamujoco's `diverged`)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    import mujoco

    renderer = env.single_agent_env.unwrapped.mujoco_renderer
    if not renderer._viewers:  # the off-screen buffer was sized when the env was made (480 px, Gymnasium's default)
        renderer.width = renderer.height = size
    obs, _ = env.reset(seed=seed)
    cam = renderer._get_viewer("rgb_array").cam
    # Gymnasium's renderer uses a free camera fixed where the body started; follow the torso (body 1) instead
    cam.type, cam.trackbodyid = mujoco.mjtCamera.mjCAMERA_TRACKING, 1

    def frame():
        return _resize(np.ascontiguousarray(renderer.render("rgb_array")), size)

    frames, t = [frame()], 0
    while True:
        obs, r, term, trunc, _ = env.step(policy(obs))
        t += 1
        if rewards is not None:
            rewards.append(r)
        stop = step_check(env, obs, r) if step_check is not None else ""
        if stop:
            raise RuntimeError(f"episode of seed {seed}, step {t}: {stop}")
        done = any(term.values()) or any(trunc.values())
        if (t % every == 0 or done) and (video_steps is None or t <= video_steps):
            frames.append(frame())
        if done:
            return frames


def save_gif(frames: list[np.ndarray], path: str, fps: float) -> int:
    """Write frames (HxWx3 uint8) to path as a looping GIF at fps frames per second; returns its size in bytes.
    GIF delays are in 1/100 s, so fps is rounded to a delay of a whole number of centiseconds. Pillow stores a run
    of identical frames (agents standing still) as one frame shown that much longer, so a GIF can have fewer
    frames than `frames` but always their total duration."""
    from PIL import Image

    if not frames:
        raise ValueError("no frames to write")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(100 / fps) * 10,
        loop=0,
        optimize=True,
    )
    os.replace(tmp, path)
    return os.path.getsize(path)
