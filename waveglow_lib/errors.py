"""One base class for every error the workflow raises on purpose (papermill's `exceptions.py` pattern).

The CLI catches `WaveGlowError` only and prints its message (and the file it concerns); anything else is a
bug and keeps its traceback. Each subclass also derives from the built-in it replaced, so `except
ValueError` in user code keeps working.
"""
from __future__ import annotations

from pathlib import Path


class WaveGlowError(Exception):
    """Base of the workflow's errors. `path`, when set, is the file or folder the error concerns."""

    def __init__(self, message: str = "", path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class ConfigError(WaveGlowError, ValueError):
    """A parameter (params file, --set, notebook parameters) is unknown, mistyped or out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """A parameter has the wrong type (a string where a number is expected, ...)."""


class InputNotFound(WaveGlowError, FileNotFoundError):
    """An input the step needs is missing (params file, corpus, checkpoint, an earlier stage's output)."""


class AudioError(WaveGlowError, ValueError):
    """A WAV file or an audio array the workflow cannot use; the message names the file or the problem."""


class DataError(WaveGlowError, ValueError):
    """A data file whose size or content disagrees with what it should hold (e.g. a `.bin` vs its shape)."""


class MetricError(WaveGlowError, ValueError):
    """A metric cannot score the signals it was given (empty, all-zero reference, mismatched shapes)."""


class MelError(WaveGlowError, ValueError):
    """A mel-spectrogram the model cannot vocode (wrong format, shape or values); names the file."""


class CheckpointError(WaveGlowError, ValueError):
    """A file that is not a usable WaveGlow checkpoint (truncated, foreign, unsafe or inconsistent)."""


class ManifestError(WaveGlowError, ValueError):
    """A missing or unusable `mel/manifest.json`; the message names the file."""


class ExportError(WaveGlowError, RuntimeError):
    """The export failed or its graph does not reproduce the model; the message names the file."""


class ConvertError(WaveGlowError, ValueError):
    """Bad gear settings or a failed compile; the message names the file or parameter."""


class BackendError(WaveGlowError, RuntimeError):
    """A backend cannot be used as asked (bad model file, wrong shapes, bad option)."""


class MissingDependency(BackendError):
    """An optional dependency (or device) is missing; the message says what to install."""


#: the name the backends have used since the start
BackendUnavailable = MissingDependency


class SynthesisError(WaveGlowError, RuntimeError):
    """A backend produced unusable audio (NaN/Inf) for valid input: names the input file."""


class RunFolderError(WaveGlowError, RuntimeError):
    """The run folder is locked by another writer, or a path escapes it."""


class ResourceError(WaveGlowError, OSError):
    """The disk is full (or over quota), the folder is read-only, or memory ran out, reading or writing a
    file: names the file; a partly written file is never left behind."""


class NotebookRunError(WaveGlowError, RuntimeError):
    """A notebook failed: names the notebook, the cell and the error; `.output` is the executed notebook."""

    def __init__(self, message: str, notebook: str, cell: int | None, output: Path):
        super().__init__(message, path=output)
        self.notebook = notebook
        self.cell = cell
        self.output = output


class TrainingError(WaveGlowError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable resume state); names the step and the files."""


def import_optional(module: str, install: str, purpose: str = ""):
    """Import an optional package, or raise MissingDependency saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f"{purpose} needs" if purpose else "needs"
        raise MissingDependency(f"{what} {module}: {install} (import error: {exc})") from None
