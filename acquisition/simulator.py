"""``SimulatedMicroscope``: plays a time-lapse through a :class:`FrameSender` as a microscope would.

Order of play: ``start``; for each time point, each position, each z slice: one frame; then ``end``.
Sources: a synthetic live-cell movie (:mod:`cellsam_core.synthetic`, with ground truth; with known tracks
too, :mod:`acquisition.sim_tracks`) or a file
(``.tif``/``.tiff``, ``.npy``, a ``.zarr`` directory holding an array or an OME-Zarr image ``0``).

The command line (``cellsam-stream simulate``, ``python -m acquisition.simulate_command``) is
:mod:`acquisition.simulate_command`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from acquisition.client import FrameSender
from acquisition.ctc import CtcTrack
from acquisition.errors import SourceError
from acquisition.sim_tracks import TrackedMovie
from cellsam_core.synthetic import Modality, SyntheticMovie

__all__ = [
    "ArraySource",
    "ImageSource",
    "SimulatedMicroscope",
    "SimulationReport",
    "SyntheticSource",
]


class ImageSource(Protocol):
    """What a simulator plays: a (T, P, Z) grid of (H, W) or (H, W, C) images.

    Contract: ``sizes`` is ``(T, P, Z)``; ``image(t, p, z)`` returns the same array for the same
    arguments (C-contiguous, a supported dtype) for every ``0 <= t < T`` etc.
    """

    @property
    def sizes(self) -> tuple[int, int, int]: ...

    def image(self, t: int, p: int, z: int) -> np.ndarray: ...


class SyntheticSource:
    """Synthetic live-cell movies, one per (position, z) with seed ``seed + 1000 * p + z``.

    ``labels(t, p, z)`` returns the ground truth of ``image(t, p, z)``. The ``multiplexed`` modality is the
    two-channel mode: ``(H, W, 2)`` images of a nuclear and a membrane channel. :meth:`declaration` is
    what a ``start`` declares for it: channel names and roles, pixel size and time interval.

    ``tracked=True`` plays :class:`~acquisition.sim_tracks.TrackedMovie` movies instead (cells also enter
    and leave the field): ``labels`` then hold track labels, and :meth:`tracks` / :meth:`write_ctc` give
    the ground-truth tracks in Cell Tracking Challenge form.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int] = (256, 256),
        frames: int = 10,
        positions: int = 1,
        z: int = 1,
        seed: int = 0,
        modality: Modality = "nuclear",
        n_cells: int = 40,
        dtype: Any = np.uint16,
        pixel_size_um: float | None = 0.65,
        time_interval_s: float | None = 60.0,
        z_step_um: float | None = 2.0,
        tracked: bool = False,
    ) -> None:
        if frames < 1 or positions < 1 or z < 1:
            raise SourceError(f"frames, positions and z must be ≥ 1, got {frames}, {positions}, {z}")
        self._sizes = (frames, positions, z)
        self.modality = modality
        self.pixel_size_um = pixel_size_um
        self.time_interval_s = time_interval_s
        self.z_step_um = z_step_um if z > 1 else None
        kind = TrackedMovie if tracked else SyntheticMovie
        self._movies: dict[tuple[int, int], SyntheticMovie | TrackedMovie] = {
            (p, k): kind(
                shape, frames, seed=seed + 1000 * p + k, modality=modality, n_cells=n_cells, dtype=dtype
            )
            for p in range(positions)
            for k in range(z)
        }
        self._last: tuple[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self._sizes

    def _render(self, t: int, p: int, z: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != (t, p, z):
            self._last = ((t, p, z), self._movies[(p, z)][t])
        return self._last[1]

    def image(self, t: int, p: int, z: int) -> np.ndarray:
        return self._render(t, p, z)[0]

    def labels(self, t: int, p: int, z: int) -> np.ndarray:
        """Ground-truth (H, W) labels of ``image(t, p, z)``: int32, or uint32 track labels when tracked."""
        return self._render(t, p, z)[1]

    def tracks(self, p: int = 0, z: int = 0) -> list[CtcTrack]:
        """Ground-truth tracks of position ``p`` (slice ``z``); needs ``tracked=True``."""
        return self._tracked(p, z).tracks

    def write_ctc(self, directory: str | Path, p: int = 0, z: int = 0) -> Path:
        """Write position ``p``'s ground truth in CTC form (``man_track.txt`` + ``man_track000.tif`` ...);
        needs ``tracked=True``."""
        return self._tracked(p, z).write_ctc(directory)

    def _tracked(self, p: int, z: int) -> TrackedMovie:
        movie = self._movies[(p, z)]
        if not isinstance(movie, TrackedMovie):
            raise SourceError("this source has no ground-truth tracks: create it with tracked=True")
        return movie

    def declaration(self) -> dict[str, Any]:
        """``start`` fields for this movie: channels with roles and colours, physical sizes."""
        if self.modality == "multiplexed":
            channels = {
                "names": ["H2B", "membrane"],
                "roles": ["nuclear", "whole_cell"],
                "colors": ["FF00FF", "00FF00"],
            }
        else:
            role = "nuclear" if self.modality == "nuclear" else "whole_cell"
            channels = {"names": [self.modality], "roles": [role], "colors": ["FFFFFF"]}
        fields: dict[str, Any] = {"channels": channels}
        for name in ("pixel_size_um", "time_interval_s", "z_step_um"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return fields


_DEFAULT_AXES = {2: "YX", 3: "TYX", 4: "TPYX", 5: "TPZYX"}


class ArraySource:
    """Plays an array: axes named by a string of ``T``, ``P``, ``Z``, ``Y``, ``X``, ``C`` (e.g. ``"TYX"``).

    Default axes by rank: 2 ``YX``, 3 ``TYX``, 4 ``TPYX``, 5 ``TPZYX``. ``positions`` > 1 on an array
    without a ``P`` axis replays each image at every position.
    """

    def __init__(self, array: Any, *, axes: str | None = None, positions: int = 1, frames: int | None = None):
        axes = (axes or _DEFAULT_AXES.get(array.ndim, "")).upper()
        if len(axes) != array.ndim or set(axes) - set("TPZYXC") or len(set(axes)) != len(axes):
            raise SourceError(
                f"axes {axes!r} do not describe an array of shape {array.shape}; pass axes= with one "
                "letter per dimension from T, P, Z, Y, X, C (e.g. 'TYX')"
            )
        if "Y" not in axes or "X" not in axes:
            raise SourceError(f"axes {axes!r} need both Y and X")
        self._array = array
        self._file_axes = axes
        shape = dict(zip(axes, array.shape, strict=True))
        t = shape.get("T", 1) if frames is None else min(frames, shape.get("T", 1))
        self._sizes = (t, shape.get("P", positions), shape.get("Z", 1))

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> ArraySource:
        """Open ``.tif``/``.tiff`` (tifffile, memory-mapped when possible), ``.npy`` (mmap) or ``.zarr``."""
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            import tifffile

            return cls(tifffile.imread(path), **kwargs)
        if suffix == ".npy":
            return cls(np.load(path, mmap_mode="r"), **kwargs)
        if suffix == ".zarr":
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Group):
                if "0" not in node:
                    raise SourceError(f"{path} is a Zarr group without array '0'; point at the array itself")
                node = node["0"]
            return cls(node, **kwargs)
        raise SourceError(f"unsupported file {path}: use .tif, .tiff, .npy or a .zarr directory")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self._sizes

    def image(self, t: int, p: int, z: int) -> np.ndarray:
        pos = {"T": t, "P": p, "Z": z}
        # Index in the file's own axis order (lazy arrays read only this plane), then put the
        # remaining axes in Y, X, C order.
        key = tuple(pos[a] if a in pos else slice(None) for a in self._file_axes)
        plane = np.asarray(self._array[key])
        remaining = [a for a in self._file_axes if a not in pos]
        return np.ascontiguousarray(
            np.transpose(plane, [remaining.index(a) for a in "YXC" if a in remaining])
        )


@dataclass(frozen=True, slots=True)
class SimulationReport:
    """What a run sent."""

    acquisition: str
    frames_sent: int
    seconds: float


class SimulatedMicroscope:
    """Play a :class:`ImageSource` through a :class:`FrameSender`.

    Parameters
    ----------
    sender : FrameSender
        Connected sender (its ``timeout`` bounds each send).
    source : ImageSource
        What to play.
    acquisition : str
        Acquisition id.
    fps : float, optional
        Target frames per second over all positions and z; ``None`` plays as fast as the listener takes.
    progress : bool
        Show a tqdm progress bar.
    per_channel : bool
        Send each channel of a multi-channel image as its own frame (``index.c``), as microscope software
        does; the ``start`` then declares the channel count. Default: one ``(H, W, C)`` buffer.

    The ``start`` declares the source's :meth:`~SyntheticSource.declaration` when it has one.
    """

    def __init__(
        self,
        *,
        sender: FrameSender,
        source: ImageSource,
        acquisition: str = "simulated",
        fps: float | None = None,
        progress: bool = False,
        per_channel: bool = False,
    ) -> None:
        if fps is not None and fps <= 0:
            raise SourceError(f"fps must be > 0, got {fps}")
        self.sender = sender
        self.source = source
        self.acquisition = acquisition
        self.fps = fps
        self.progress = progress
        self.per_channel = per_channel

    def indices(self) -> Iterator[tuple[int, int, int]]:
        """(t, p, z) in acquisition order: time outermost, then position, then z."""
        n_t, n_p, n_z = self.source.sizes
        for t in range(n_t):
            for p in range(n_p):
                for z in range(n_z):
                    yield t, p, z

    def run(self) -> SimulationReport:
        """Send ``start``, every frame at the target rate, then ``end``; return what was sent."""
        from tqdm import tqdm

        n_t, n_p, n_z = self.source.sizes
        first = self.source.image(0, 0, 0)
        n_c = int(first.shape[2]) if self.per_channel and first.ndim == 3 else 1
        total = n_t * n_p * n_z * n_c
        begin = time.monotonic()
        describe = getattr(self.source, "declaration", None)
        declared: dict[str, Any] = dict(describe()) if callable(describe) else {}
        sizes: dict[str, int] = {"t": n_t, "p": n_p, "z": n_z}
        if n_c > 1:
            sizes["c"] = n_c
        self.sender.start(self.acquisition, sizes=sizes, **declared)
        sent = 0
        with tqdm(total=total, disable=not self.progress, unit="frame", desc=self.acquisition) as bar:
            for t, p, z in self.indices():
                image = self.source.image(t, p, z)
                planes = [(c, image[..., c]) for c in range(n_c)] if n_c > 1 else [(None, image)]
                for c, plane in planes:
                    if self.fps is not None:
                        delay = begin + sent / self.fps - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    self.sender.send(plane, acquisition=self.acquisition, t=t, p=p, z=z, c=c, simulated=True)
                    sent += 1
                    bar.update(1)
        self.sender.end(self.acquisition, frames=sent)
        return SimulationReport(self.acquisition, sent, time.monotonic() - begin)
