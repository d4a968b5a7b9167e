"""The one interface every inference backend implements.

A backend is loaded once and then runs padded batches: `run(mel, z) -> audio`, where `z` is the
*complete, already sigma-scaled* noise of the reverse pass (so every backend computes exactly
`WaveGlow.infer(mel, sigma=1.0, z=z)` and outputs of different backends are comparable sample by sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import BackendError, BackendUnavailable
from ..export import GUIDE_INPUTS, GUIDE_OUTPUT, ONNX_INPUTS, ONNX_OUTPUT


@dataclass(frozen=True)
class ModelSpec:
    """What a backend needs to know about the model to check its inputs."""

    n_mel_channels: int = ModelConfig().n_mel_channels
    n_group: int = ModelConfig().n_group
    hop_length: int = ModelConfig().hop_length

    @classmethod
    def from_model_config(cls, config) -> "ModelSpec":
        return cls(config.n_mel_channels, config.n_group, config.hop_length)

    def noise_shape(self, batch: int, frames: int) -> tuple[int, int, int]:
        return (batch, self.n_group, frames * self.hop_length // self.n_group)


def runs_utterances(backend) -> bool:
    """Whether `backend` takes a batch unpadded, each utterance at its own length (`run_utterances`)."""
    return getattr(backend, "run_utterances", None) is not None


class Backend:
    """Base class: subclasses set `name` and implement `_run` (and `close` if they hold resources).

    Attributes the infer stage uses to shape its batches:
    - `fixed_batch`: the batch size the compiled model requires (an `.om` has its batch baked in),
      or None when any batch works; smaller batches are padded up to it.
    - `gear_lengths`: the mel lengths the compiled model accepts (the `.om`'s `--dynamic_dims` gears),
      or None when any length works; each batch is padded up to the smallest gear that fits.
    - `run_utterances(mels, zs) -> audios`, where defined (fast): a list of utterances, each at its own
      length, run as one batch without padding (`runs_utterances`).
    """

    name = "base"
    fixed_batch: int | None = None
    gear_lengths: Sequence[int] | None = None

    def __init__(self, spec: ModelSpec | None = None, precision: str = "fp32", device: str = "cpu") -> None:
        self.spec = spec or ModelSpec()
        self.precision = precision
        self.device = device
        #: a line for logs and timings files: which file / provider / precision is in use
        self.description = self.name

    # --- public -------------------------------------------------------------------------
    def run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        """mel [B, n_mel, T] float32, z [B, n_group, T*hop/n_group] float32 → audio [B, T*hop] float32."""
        mel, z = self.check_inputs(mel, z)
        audio = np.asarray(self._run(mel, z), dtype=np.float32)
        expected = (mel.shape[0], mel.shape[2] * self.spec.hop_length)
        if audio.ndim == 3 and audio.shape[1] == 1:  # some runtimes keep a channel axis
            audio = audio[:, 0]
        if audio.shape != expected:
            raise BackendError(f"{self.name}: output shape {audio.shape}, expected {expected}")
        return audio

    def pad_length(self, frames: int) -> int:
        """The mel length a batch whose longest utterance has `frames` frames must be padded to."""
        if not self.gear_lengths:
            return frames
        fitting = [g for g in self.gear_lengths if g >= frames]
        if not fitting:
            raise BackendError(f"{self.name}: mel length {frames} exceeds the largest compiled gear "
                               f"{max(self.gear_lengths)}; re-run convert with this corpus's lengths")
        return min(fitting)

    def close(self) -> None:
        """Release the model / device. Safe to call twice."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    # --- helpers --------------------------------------------------------------------------
    def check_inputs(self, mel: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        z = np.ascontiguousarray(z, dtype=np.float32)
        if mel.ndim != 3 or mel.shape[1] != self.spec.n_mel_channels:
            raise BackendError(f"{self.name}: mel must be [B, {self.spec.n_mel_channels}, T], got {mel.shape}")
        expected = self.spec.noise_shape(mel.shape[0], mel.shape[2])
        if z.shape != expected:
            raise BackendError(f"{self.name}: z must be {list(expected)} for mel {list(mel.shape)}, got {list(z.shape)}")
        return mel, z

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def check_graph_io(path, inputs: Sequence[tuple[str, Sequence]], outputs: Sequence[tuple[str, Sequence]],
                   spec: ModelSpec) -> None:
    """Refuse a model file that is not a WaveGlow export (by its input/output names and ranks/sizes).

    `inputs`/`outputs` are (name, shape) with shape entries int or None/str for dynamic axes.
    """
    in_names = [n for n, _ in inputs]
    out_names = [n for n, _ in outputs]
    if tuple(in_names) == GUIDE_INPUTS and GUIDE_OUTPUT in out_names:
        raise BackendError(
            f"{path}: this is the guide's variant (mel-only input, noise drawn inside the graph); "
            "its output cannot be fed our deterministic noise. Export with export_onnx(..., variant='noise_input')")
    if tuple(in_names) != ONNX_INPUTS or ONNX_OUTPUT not in out_names:
        raise BackendError(f"{path}: not a WaveGlow export: inputs {in_names}, outputs {out_names}; "
                           f"expected inputs {list(ONNX_INPUTS)} and output {ONNX_OUTPUT!r}")
    shapes = dict(inputs)
    want = {"mel": (None, spec.n_mel_channels, None), "z": (None, spec.n_group, None)}
    for name, expected in want.items():
        shape = list(shapes[name])
        if len(shape) != 3 or (isinstance(shape[1], int) and shape[1] != expected[1]):
            raise BackendError(f"{path}: input {name!r} has shape {shape}; this model needs "
                               f"[B, {expected[1]}, T] (a model with another config?)")
