r"""Score (and film) an exported IDQL policy on the U-maze point mass, with torch and gymnasium alone.

The policy file comes from ``python -m idql_pl export --ckpt_path RUN/last.ckpt --out policy.pt2`` (or
``.pt``, TorchScript). This script never imports idql_pl: it builds the evaluation env of
``local/pointmaze-umaze`` (idql_pl's ``idql_pl/PointMaze2d-UMaze-v0``) from gymnasium-robotics'
``PointMazeEnv`` with the same conventions (observation ``[x, y, vx, vy]``, start in a random free cell with
position noise U(-0.1, 0.1) and velocity noise N(0, 0.1), reward 1 within 0.5 of the goal cell's centre, 300
steps), so episode ``i`` seeded ``seed + i`` starts where ``python -m idql_pl validate`` starts it
(``--eval.seed``, default 1000000).

    python examples/play_exported_policy.py quickstart.pt2 --episodes 30 --ref_scores MIN MAX
    python examples/play_exported_policy.py quickstart.pt2 --gif docs/figures/quickstart.gif \
        --gif_seed 1000003
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch
from gymnasium.utils import seeding

UMAZE = ["#####", "#GOO#", "###O#", "#OOO#", "#####"]  # '#' wall, 'G' the goal cell (D4RL maze2d-umaze)
EPISODE_STEPS, REWARD_RADIUS = 300, 0.5


class UMazePoint:
    """The point mass in the U-maze, gymnasium-robotics' frame: reset(seed) -> obs, step(action) -> (obs,
    reward)."""

    def __init__(self, render_size: int | None = None):
        from gymnasium_robotics.envs.maze.point_maze import PointMazeEnv

        walls = np.array([[c == "#" for c in row] for row in UMAZE])
        height, width = walls.shape
        cells = np.argwhere(~walls)  # free cells, row-major
        self.starts = np.stack([cells[:, 1] + 0.5 - width / 2, height / 2 - cells[:, 0] - 0.5], axis=1)
        goal_row, goal_col = next((i, j) for i, row in enumerate(UMAZE) for j, c in enumerate(row)
                                  if c == "G")
        self.goal = np.array([goal_col + 0.5 - width / 2, height / 2 - goal_row - 0.5])
        render_mode = "rgb_array" if render_size else None
        self.maze = PointMazeEnv(maze_map=walls.astype(int).tolist(), render_mode=render_mode,
                                 continuing_task=True, reset_target=False)
        with contextlib.suppress(OSError):
            os.remove(self.maze.tmp_xml_file_path)
        self.maze.goal = self.goal.copy()
        self.maze.update_target_site_pos()
        self.point = self.maze.point_env
        if render_size:  # a top-down view of the maze
            renderer = self.point.mujoco_renderer
            renderer.width = renderer.height = render_size
            renderer.default_cam_config = {"distance": 6.5, "elevation": -90.0, "azimuth": 90.0,
                                           "lookat": np.array([0.0, 0.0, 0.0])}
        self.state = np.zeros(4)

    def reset(self, seed: int) -> np.ndarray:
        rng, _ = seeding.np_random(seed)  # as gymnasium's Env.reset(seed=seed)
        start = self.starts[rng.integers(len(self.starts))]
        qpos, qvel = start + rng.uniform(-0.1, 0.1, size=2), rng.normal(0.0, 0.1, size=2)
        self.point.reset()
        self.point.set_state(qpos, qvel)
        self.state = np.r_[qpos, qvel]
        return self.state.astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float]:
        self.point.step(np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0))
        self.state = np.r_[self.point.data.qpos[:2], self.point.data.qvel[:2]]
        reward = float(np.linalg.norm(self.state[:2] - self.goal) <= REWARD_RADIUS)
        return self.state.astype(np.float32), reward

    def render(self) -> np.ndarray:
        return self.point.render()


def load_policy(path: str) -> torch.nn.Module:
    """A pt2 file (torch.export) or a TorchScript file, as exported by ``python -m idql_pl export``."""
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    return torch.jit.load(path)


def score(policy: torch.nn.Module, episodes: int, seed: int) -> tuple[np.ndarray, float]:
    """All episodes side by side (one policy call per step for every env): returns and actions/s."""
    envs = [UMazePoint() for _ in range(episodes)]
    obs = np.stack([env.reset(seed + i) for i, env in enumerate(envs)])
    returns, acting = np.zeros(episodes), 0.0
    for _ in range(EPISODE_STEPS):
        start = time.perf_counter()
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs)).numpy()
        acting += time.perf_counter() - start
        for i, env in enumerate(envs):
            obs[i], reward = env.step(actions[i])
            returns[i] += reward
    return returns, episodes * EPISODE_STEPS / acting


def film(policy: torch.nn.Module, seed: int, path: str, size: int, after_goal: int, fps: float) -> int:
    """One episode as a looping GIF, cut ``after_goal`` frames after the point first reaches the goal."""
    from PIL import Image

    env = UMazePoint(render_size=size)
    obs, frames, reached = env.reset(seed), [], None
    frames.append(env.render())
    for step in range(EPISODE_STEPS):
        with torch.no_grad():
            obs, reward = env.step(policy(torch.as_tensor(obs)[None])[0].numpy())
        frames.append(env.render())
        reached = step if reached is None and reward > 0 else reached
        if reached is not None and step >= reached + after_goal:
            break
    images = [Image.fromarray(f).quantize(colors=48, method=Image.Quantize.MEDIANCUT) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=True)
    return len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", help="an exported policy file (.pt2 or TorchScript .pt)")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1_000_000,
                        help="episode i is seeded seed + i (validate's)")
    parser.add_argument("--policy_seed", type=int, default=0, help="torch.manual_seed for the policy's noise")
    parser.add_argument("--ref_scores", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="the dataset's reference returns, for the normalized score"
                             " 100 (R - MIN) / (MAX - MIN)")
    parser.add_argument("--gif", default=None, help="also film one episode into this GIF")
    parser.add_argument("--gif_seed", type=int, default=1_000_000)
    parser.add_argument("--gif_size", type=int, default=200)
    parser.add_argument("--gif_fps", type=float, default=10.0)
    parser.add_argument("--gif_after_goal", type=int, default=15,
                        help="frames kept after the goal is reached")
    args = parser.parse_args()
    if args.gif:
        os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display
    torch.manual_seed(args.policy_seed)
    policy = load_policy(args.policy)
    returns, rate = score(policy, args.episodes, args.seed)
    line = (f"{args.episodes} episodes (seeds {args.seed}..{args.seed + args.episodes - 1}):"
            f" return {returns.mean():.2f}")
    line += f" ± {returns.std():.2f}"
    if args.ref_scores:
        low, high = args.ref_scores
        normalized = 100.0 * (returns - low) / (high - low)
        line += f", normalized score {normalized.mean():.1f} ± {normalized.std():.1f}"
    print(f"{line}; {rate:.0f} actions/s (batch {args.episodes})")
    if args.gif:
        frames = film(policy, args.gif_seed, args.gif, args.gif_size, args.gif_after_goal, args.gif_fps)
        print(f"wrote {args.gif}: {frames} frames, {os.path.getsize(args.gif) / 1024:.0f} KB")
    imported = any(name == "idql_pl" or name.startswith("idql_pl.") for name in sys.modules)
    print(f"idql_pl imported: {imported}")


if __name__ == "__main__":
    main()
