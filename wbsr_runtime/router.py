"""The bundle's router: `router.onnx` (the gradient-projection descriptor of each tile, thresholded into
classes) run by ONNX Runtime on the CPU. It is cheap next to the subnets, so it runs there whatever backend
runs the subnets, and the Upscaler holds one `Router` beside its runners."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .backends.base import cpu_session
from .manifest import REBUILD, BundleError, Manifest
from .tiling import as_unit_float


class Router:
    """Classifies tiles with the bundle's router graph, its ONNX Runtime CPU session loaded on first use (once:
    calls from several threads are safe). A context manager; `close` frees the session."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._session: Any = None
        self._lock = threading.Lock()

    def route(self, frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frame (1, 3, H, W) uint8 / uint16 or float in [0, 1], boxes (n, 4) int64 `y0, x0, y1, x1`
        (half-open, each >= 3x3) -> scores (n,) float32, classes (n,) int64 in 1..K.

        The router is run once per band of rows `y0:y1` shared by boxes (a tile row of a plan): its float64
        integral images are frame-sized, about 70 bytes per pixel, so a 4K frame in one call would need GBs.
        Only the band is converted to float32, so an integer frame is never copied whole.
        """
        session = self._load()
        boxes = np.asarray(boxes, dtype=np.int64)
        scores, classes = np.empty(len(boxes), np.float32), np.empty(len(boxes), np.int64)
        rows, group = np.unique(boxes[:, [0, 2]], axis=0, return_inverse=True)
        for g, (y0, y1) in enumerate(rows):
            sel = np.flatnonzero(group.ravel() == g)
            band = np.ascontiguousarray(as_unit_float(frame[:, :, y0:y1]))
            scores[sel], classes[sel] = self._route_band(session, band, boxes[sel] - np.array([y0, 0, y0, 0]))
        k = self.manifest.router.num_classes
        if len(classes) and not 1 <= classes.min() <= classes.max() <= k:
            raise BundleError(
                f"{self.manifest.root}: {self.manifest.router.file} gives classes up to {classes.max()}, but the "
                f"manifest has {k}; {REBUILD}"
            )
        return scores, classes

    def _load(self) -> Any:
        with self._lock:
            if self._session is None:
                self._session = cpu_session(self.manifest.path(self.manifest.router.file), threads=1)
            return self._session

    def _route_band(self, session: Any, band: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        names = self.manifest.router
        scores, classes = session.run(
            [names.outputs["scores"], names.outputs["classes"]],
            {names.inputs["frame"]: band, names.inputs["boxes"]: np.ascontiguousarray(boxes)},
        )
        return scores.astype(np.float32), classes.astype(np.int64)

    def close(self) -> None:
        with self._lock:
            self._session = None

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
