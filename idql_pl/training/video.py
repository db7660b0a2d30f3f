"""Evaluation videos: offscreen frames of recorded episodes, written as MP4 (PyAV) or GIF (Pillow).

MuJoCo renders offscreen through EGL when no display is set (:func:`prepare_offscreen_rendering` sets
``MUJOCO_GL=egl`` unless it is set already); any gymnasium env with ``render_mode="rgb_array"`` works.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idql_pl.errors import ConfigError, EvalEnvError


def prepare_offscreen_rendering() -> None:
    """``MUJOCO_GL=egl`` when neither ``MUJOCO_GL`` nor a display (``DISPLAY``) is set (gymnasium reads it
    when an env first renders)."""
    if not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"


def set_frame_size(env: Any, size: int) -> None:
    """Render ``size x size`` frames from a MuJoCo env (the renderer reads its size when it first renders),
    also when the MuJoCo env sits one level inside the env (the maze envs' point mass or ant); others are
    unchanged."""
    base = getattr(env, "unwrapped", env)
    for obj in (base, *vars(base).values()):
        renderer = getattr(obj, "mujoco_renderer", None)
        if renderer is not None and hasattr(renderer, "width") and hasattr(renderer, "height"):
            renderer.width = renderer.height = int(size)


def first_frame(env: Any, what: str) -> np.ndarray:
    """Reset ``env`` and render one frame, or fail in one line saying how to make rendering work."""
    if "rgb_array" not in (getattr(env, "metadata", None) or {}).get("render_modes", []):
        raise EvalEnvError(f"{what} cannot render frames (no rgb_array render mode):"
                           " drop --eval.video_episodes")
    try:
        env.reset(seed=0)
        frame = env.render()
    except Exception as err:
        raise EvalEnvError(
            f"{what} could not render a frame ({type(err).__name__}: {' '.join(str(err).split())[:160]}):"
            " MuJoCo renders offscreen with MUJOCO_GL=egl (libEGL, e.g. Mesa) or MUJOCO_GL=osmesa; set one,"
            " or drop --eval.video_episodes") from None
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise EvalEnvError(f"{what} rendered no RGB frame (got {type(frame).__name__}):"
                           " drop --eval.video_episodes")
    return frame


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: drop a last row / column."""
    h, w = frame.shape[:2]
    return np.ascontiguousarray(frame[: h - h % 2, : w - w % 2, :3])


def write_mp4(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float) -> Path:
    """``frames`` (uint8 ``[H, W, 3]``) as an H.264 MP4 at ``fps`` (PyAV); written beside ``path`` and
    renamed."""
    try:
        import av
    except ImportError:
        raise ConfigError("evaluation videos need PyAV: pip install av (or pip install 'idql_pl[video]'), or"
                          " drop --eval.video_episodes") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    first = _even(np.asarray(frames[0]))
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=max(1, round(fps)))
            stream.width, stream.height = first.shape[1], first.shape[0]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast"}
            for frame in frames:
                image = _even(np.asarray(frame, dtype=np.uint8))
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def write_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float, size: int | None = None,
              colors: int = 64) -> Path:
    """``frames`` as a looping GIF (Pillow), each scaled to ``size`` pixels wide and reduced to ``colors``."""
    from PIL import Image

    images = []
    for frame in frames:
        image = Image.fromarray(np.asarray(frame, dtype=np.uint8)[..., :3])
        if size is not None and image.width != size:
            image = image.resize((size, round(image.height * size / image.width)), Image.LANCZOS)
        images.append(image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=True)
    return path


def log_videos(trainer: Any, paths: Sequence[Path], step: int, captions: Sequence[str]) -> None:
    """Log the MP4 files to every W&B logger of ``trainer`` (``eval/video``)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - Lightning always has it
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and paths:
            logger.log_video("eval/video", [str(p) for p in paths], step=step, caption=list(captions))
