"""Mels from elsewhere (a text-to-speech model, another toolkit) into the vocoder, checked first.

WaveGlow turns any `[n_mel, T]` array into audio, and a mel in the wrong format silently becomes noise.
So every mel read here goes through a format check before it may be vocoded:

* `read_mel(path)` reads `.npy` (no pickles), `.pt` (tensors only, through `safe_reader`'s
  allow-listed unpickler) and the guide's raw float32 `.bin` (+ its `.txt` sample count, as the
  preprocess stage writes them); it accepts `[n_mel, T]`, `[T, n_mel]` and a leading batch axis of 1.
* `check_mel_format(mel, source)` says whether the values are what the model was trained on — natural-log
  mel magnitudes clamped at 1e-5 (`audio.mel_spectrogram`: within about [-11.6, +3], mostly negative) —
  and, if not, what they look like: dB, log10, normalised, linear magnitude/power, transposed, wrong band
  count, NaN/Inf.
* Conversions whose result is determined by the input (log10 → ln, dB → ln, linear → ln) are applied
  only when asked for with `convert=...`, and the converted mel is checked again.

How the check decides (calibrated on the demo corpus's mels, with gain, added noise, TTS-like jitter and
short or silent excerpts, and on each wrong format made from them; see tests/test_mel_input.py): the
natural-log mel of real audio has a known shape — a floor at ln(1e-5), a ceiling near +3 (a full-scale
signal), a median around -5 and a spread of about 10 between its 0.5th and 99.5th percentiles. Each
log-like format is the same picture scaled (log10: ÷ ln 10, dB: × 20 / ln 10, ln of power: × 2), so the
check scales the input by each format's factor and keeps the one whose result looks most like a
natural-log mel. Non-negative inputs are linear (heavy right tail) or min-max normalised (not);
inputs with many positive values are normalised or standardised.
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .config import STFTConfig
from .errors import DataError, MelError
from .io import atomic_write_bytes, npy_header, open_bounded, read_bounded, write_bin
from .layout import sample_count_file
from .safe_reader import load_tensor_file

#: file suffixes `list_mels` picks up, in the order a duplicate id is reported
MEL_SUFFIXES = (".npy", ".pt", ".bin")

#: a mel file is read whole: 80 bands × 4 bytes × 86 frames/s make 2 GiB about 21 hours of audio
MAX_MEL_BYTES = 2**31
#: a `.txt` sample count: at most 18 ASCII digits (int() also takes '²', '١٢٣' and 5,000-digit numbers)
MAX_COUNT_BYTES = 64
_COUNT_PATTERN = re.compile(r"[0-9]{1,18}")

#: `layout` values: `auto` tells them apart by which axis has n_mel entries
LAYOUTS = ("auto", "mel_first", "time_first")

# what a mel looks like (MelFormat.looks_like)
NATURAL_LOG = "natural-log magnitude (the model's format)"
DB = "dB (librosa power_to_db / amplitude_to_db)"
LOG10 = "log10 magnitude"
LN_POWER = "natural log of power (or a floor far below ln 1e-5)"
UNSCALED_AUDIO = "natural-log mel of audio not scaled to [-1, 1] (e.g. int16 sample values)"
MINMAX_01 = "min-max normalised to [0, 1]"
MINMAX_11 = "min-max normalised to [-1, 1]"
NORMALISED = "normalised (zero mean / unit variance, or a symmetric range such as [-4, 4])"
LINEAR_MAGNITUDE = "linear magnitude"
LINEAR_POWER = "linear power"
TRANSPOSED = "transposed ([T, n_mel])"
CONSTANT = "a constant array"
NO_FRAMES = "a mel with no frames"
#: what to do about a mel that is no mel in any format (no conversion, no re-scaling helps)
_NOT_A_MEL_ADVICE = {NO_FRAMES: "send or save a mel of at least one frame",
                     CONSTANT: "check the TTS model's output (a mel of real audio varies)"}
WRONG_BANDS = "wrong band count"
WRONG_SHAPE = "not a 2-D mel"
NON_FINITE = "contains NaN or Inf"
UNRECOGNISED = "unrecognised (outside the range of a natural-log mel)"

#: factor that turns each format's values into natural-log magnitudes (`convert=`). dB: 20·log10(A) for
#: a magnitude A and 10·log10(P) for a power P = A² are the same number, so both take ln(10)/20; for
#: `db_power` that is exact when the power mel is the square of the magnitude mel, and an approximation
#: when the filterbank was applied to |X|² (librosa.feature.melspectrogram's default power=2.0).
_LOG_FACTORS = {"log10": math.log(10.0), "db_amplitude": math.log(10.0) / 20.0,
                "db_power": math.log(10.0) / 20.0}
CONVERSIONS = (*_LOG_FACTORS, "magnitude", "power")

#: what the format check must have seen for each conversion to be applied (linear magnitude and power
#: of different recordings can look alike, so either accepts both)
_CONVERTS_FROM = {"log10": (LOG10,), "db_amplitude": (DB,), "db_power": (DB,),
                  "magnitude": (LINEAR_MAGNITUDE, LINEAR_POWER), "power": (LINEAR_MAGNITUDE, LINEAR_POWER)}

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class MelFormat:
    """The verdict of `check_mel_format`."""

    ok: bool
    #: one of the labels above (NATURAL_LOG when ok)
    looks_like: str
    #: why, in numbers
    reason: str
    #: the `convert=` option that turns it into the model's format, when the conversion is unambiguous
    conversion: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    #: the file (or name) the mel came from, for messages
    source: str = "mel"

    def message(self, source: str | Path | None = None) -> str:
        source = self.source if source is None else source
        if self.ok:
            return f"{source}: {self.looks_like}; {self.reason}"
        if self.looks_like in _NOT_A_MEL_ADVICE:
            return f"{source}: not a mel: {self.reason}; {_NOT_A_MEL_ADVICE[self.looks_like]}"
        hint = (f" If it is, read it with convert='{self.conversion}'." if self.conversion else
                " Re-export it from the TTS model as natural-log mel magnitudes (log(clamp(mel, 1e-5))).")
        return (f"{source}: this mel looks like {self.looks_like}, not the natural-log mel magnitudes "
                f"WaveGlow expects (values within about [-11.6, +3], mostly negative): {self.reason}.{hint}")


# --- reading ---------------------------------------------------------------------------------------

def read_mel(path: str | Path, n_mel: int = 80, layout: str = "auto", convert: str | None = None, *,
             check: bool = True, stft: STFTConfig | None = None) -> np.ndarray:
    """Read one mel as float32 `[n_mel, T]`, refusing what the model cannot vocode.

    `layout`: `auto` (the axis with n_mel entries is the band axis; when both are, say which),
    `mel_first` (`[n_mel, T]`) or `time_first` (`[T, n_mel]`); a `.bin` is `[n_mel, T]` unless told.
    `convert`: one of CONVERSIONS, applied on request only. `check`: run `check_mel_format` and raise
    MelError when the values are not natural-log mel magnitudes (NaN/Inf are refused regardless).
    """
    path, stft, suffix = _mel_args(path, n_mel, layout, convert, stft)
    with open_bounded(path, "a mel file", MAX_MEL_BYTES, MelError) as handle:
        if suffix == ".npy":
            array = _read_npy(path, handle)
        elif suffix == ".bin":
            array = _read_bin_mel(path, handle, n_mel, stft.hop_length, time_first=layout == "time_first")
    if suffix == ".pt":
        array = _read_pt(path)
    elif suffix == ".bin":
        _refuse_interleaved(array, layout, path, n_mel)
        layout = "mel_first" if layout == "auto" else layout  # raw bytes carry no shape: the guide's
    mel = _to_mel_first(array, n_mel, layout, path)
    _refuse_non_finite(int(np.size(mel) - np.isfinite(mel).sum()), path)
    return _formatted(mel, convert, check, path, stft)


def _mel_args(path: str | Path, n_mel: int, layout: str, convert: str | None,
              stft: STFTConfig | None) -> tuple[Path, STFTConfig, str]:
    """`read_mel`'s and `open_mel`'s arguments checked: (path, stft, suffix)."""
    path = Path(path)
    stft = stft or STFTConfig(n_mel_channels=n_mel)
    if stft.n_mel_channels != n_mel:
        raise MelError(f"{path}: n_mel={n_mel} disagrees with the STFT settings' "
                       f"n_mel_channels={stft.n_mel_channels}", path=path)
    if layout not in LAYOUTS:
        raise MelError(f"{path}: layout must be one of {', '.join(LAYOUTS)}, not {layout!r}", path=path)
    if convert is not None and convert not in CONVERSIONS:
        raise MelError(f"{path}: convert must be one of {', '.join(CONVERSIONS)}, not {convert!r}", path=path)
    if not os.path.lexists(path):
        raise MelError(f"{path}: mel file not found", path=path)
    suffix = path.suffix.lower()
    if suffix not in MEL_SUFFIXES:
        raise MelError(f"{path}: unknown mel file type '{path.suffix}' (expected .npy, .pt or .bin)", path=path)
    return path, stft, suffix


def _refuse_interleaved(array: np.ndarray, layout: str, path: Path, n_mel: int) -> None:
    if layout == "auto" and _looks_interleaved(array):
        raise MelError(f"{path}: read as the guide's [{n_mel}, T], this .bin's rows repeat every {n_mel} "
                       f"values, as a [T, {n_mel}] buffer does; read it with layout='time_first' (or "
                       "layout='mel_first' if it really is [n_mel, T])", path=path)


def _refuse_non_finite(bad: int, path: Path) -> None:
    if bad:
        raise MelError(f"{path}: the mel contains {bad} NaN/Inf value(s); the TTS model's output is broken "
                       "here (vocoding it would give silence or noise)", path=path)


def _formatted(mel: np.ndarray, convert: str | None, check: bool, path: Path, stft: STFTConfig) -> np.ndarray:
    """The asked-for conversion and the format check (`read_mel`'s last steps)."""
    if convert is not None:
        if check:
            _check_conversion_fits(mel, convert, path, stft)
        mel = convert_mel(mel, convert, path, stft)
    if check:
        verdict = check_mel_format(mel, path, stft)
        if not verdict.ok:
            if convert is not None:
                raise MelError(f"{path}: after convert='{convert}' {verdict.message('the result')}", path=path)
            raise MelError(verdict.message(), path=path)
    return mel


def _check_conversion_fits(mel: np.ndarray, convert: str, path: Path, stft: STFTConfig) -> None:
    """Refuse a conversion the input does not look like it needs: converting a right mel breaks it."""
    verdict = check_mel_format(mel, path, stft)
    if verdict.looks_like in _CONVERTS_FROM[convert]:
        return
    if verdict.ok and convert == "log10" and mel.shape[1] < MIN_FRAMES_FOR_SCALE:
        return  # too short for the check to tell log10 from ln: the caller's word decides
    raise MelError(f"{path}: convert='{convert}' was asked for, but the mel looks like {verdict.looks_like} "
                   f"({verdict.reason}); converting it would not give natural-log magnitudes", path=path)


def mel_sample_count(path: str | Path) -> int | None:
    """The audio sample count in the `.txt` beside a guide-style `.bin`, or None when there is none."""
    txt = sample_count_file(path)
    if not os.path.lexists(txt):
        return None
    what = "the audio's sample count (one integer)"
    text = read_bounded(txt, what, MAX_COUNT_BYTES, MelError).decode("utf-8", errors="replace").strip()
    if not _COUNT_PATTERN.fullmatch(text):
        raise MelError(f"{txt}: expected {what} in ASCII digits, found {text[:40]!r}", path=txt)
    return int(text)


def list_mels(dir_or_file: str | Path) -> list[tuple[str, Path]]:
    """`(utterance id, path)` of every `.npy`/`.pt`/`.bin` mel in a folder (or the one file), by id."""
    root = Path(dir_or_file)
    if root.is_dir():
        # hidden files (editors', partial downloads) and other suffixes (a .bin's .txt) are not mels; every
        # other entry must be one: a FIFO, a device or a folder named <id>.npy is refused, not skipped
        files = [p for p in root.iterdir() if p.suffix.lower() in MEL_SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise MelError(f"{root}: no mel files (expected <id>.npy, <id>.pt or <id>.bin)", path=root)
    elif os.path.lexists(root):
        files = [root]
    else:
        raise MelError(f"{root}: no such mel file or folder", path=root)
    found: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() not in MEL_SUFFIXES:
            raise MelError(f"{path}: unknown mel file type '{path.suffix}' (expected .npy, .pt or .bin)",
                           path=path)
        utt_id = path.stem
        if not _ID_PATTERN.fullmatch(utt_id):  # the name as repr: it may hold a newline
            raise MelError(f"{path.parent}: {path.name!r}: {utt_id!r} is not usable as an utterance id (letters, "
                           "digits, '.', '_', '-'; not starting with '.' or '-')", path=path.parent)
        with open_bounded(path, "a mel file", MAX_MEL_BYTES, MelError):
            pass  # only its kind and size: it is read (and checked) later
        if utt_id in found:
            raise MelError(f"{root}: two mels for utterance '{utt_id}': {found[utt_id].name} and {path.name}",
                           path=path)
        found[utt_id] = path
    return sorted(found.items())


def _read_npy(path: Path, handle: BinaryIO) -> np.ndarray:
    """A plain numeric `.npy` whose header's shape and dtype account for exactly the bytes after it: checked
    before anything is allocated (a header of a few bytes may declare terabytes)."""
    _npy_header(path, handle)
    try:
        handle.seek(0)
        return np.load(handle, allow_pickle=False)
    except ValueError as error:  # not a .npy, a bad header, object arrays (pickles: refused)
        raise MelError(f"{path}: not a plain numeric .npy array ({error})", path=path) from None
    except (OSError, EOFError) as error:
        raise MelError(f"{path}: unreadable .npy file (truncated or corrupt?): {error}", path=path) from None


def _npy_header(path: Path, handle: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """`io.npy_header` of a mel file; MelError naming it."""
    try:
        return npy_header(handle, os.fstat(handle.fileno()).st_size)
    except DataError as error:
        raise MelError(f"{path}: {error}", path=path) from None
    except (OSError, EOFError) as error:
        raise MelError(f"{path}: unreadable .npy file (truncated or corrupt?): {error}", path=path) from None


def _read_pt(path: Path) -> np.ndarray:
    obj = load_tensor_file(path, error=MelError)  # safe_reader's allow-list: tensors only, nothing runs
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1 and len(obj) == 1:
            obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        kind = (f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict)
                else type(obj).__name__)
        raise MelError(f"{path}: expected a tensor (or a dict holding one tensor), found {kind}", path=path)
    if obj.is_complex():
        raise MelError(f"{path}: a complex tensor is not a mel", path=path)
    return obj.detach().to("cpu", torch.float32).numpy()


def _read_bin_mel(path: Path, handle: BinaryIO, n_mel: int, hop_length: int, time_first: bool) -> np.ndarray:
    frames = _bin_frames(path, handle, n_mel, hop_length)
    raw = np.fromfile(handle, dtype="<f4", count=frames * n_mel)
    if raw.size != frames * n_mel:
        raise MelError(f"{path}: shrank while it was read ({raw.size * 4} of {frames * n_mel * 4} bytes)", path=path)
    return raw.reshape(frames, n_mel) if time_first else raw.reshape(n_mel, frames)


def _bin_frames(path: Path, handle: BinaryIO, n_mel: int, hop_length: int) -> int:
    """The frame count of a guide-style raw float32 `.bin`, checked against its size and its `.txt`."""
    size = os.fstat(handle.fileno()).st_size
    if size == 0 or size % (4 * n_mel):
        raise MelError(f"{path}: {size} bytes is not a whole number of float32 frames of {n_mel} bands "
                       f"({4 * n_mel} bytes each); truncated, or not the guide's raw [n_mel, T] float32 .bin?",
                       path=path)
    frames = size // (4 * n_mel)
    samples = mel_sample_count(path)
    if samples is not None and frames != 1 + samples // hop_length:  # what preprocess writes
        raise MelError(f"{path}: {frames} frames of {n_mel} bands, but {path.with_suffix('.txt').name} says "
                       f"{samples} samples, which make {1 + samples // hop_length} frames at hop {hop_length}; "
                       "a truncated .bin, another band count, or a .txt from another file?", path=path)
    return frames


def _looks_interleaved(mel: np.ndarray) -> bool:
    """A `[T, n_mel]` buffer read as `[n_mel, T]`: along a row the bands cycle, so values n_mel apart
    (same band, next frame) are closer than neighbours; in a real mel, neighbouring frames are the close
    ones. Real mels (demo corpus, jittered like TTS output) score ≥ 2.3, misread ones ≤ 1.3."""
    n_mel, frames = mel.shape
    if frames < 2 * n_mel:
        return False
    rows = mel.astype(np.float64)
    neighbours = float(np.mean(np.abs(np.diff(rows, axis=1))))
    if neighbours < 1e-6:  # constant rows (silence): nothing to tell
        return False
    return float(np.mean(np.abs(rows[:, n_mel:] - rows[:, :-n_mel]))) < 1.6 * neighbours


def _to_mel_first(array: Any, n_mel: int, layout: str, path: Path) -> np.ndarray:
    array = np.asarray(array)
    shape, layout = _mel_layout(array.shape, array.dtype, n_mel, layout, path)
    array = array.reshape(shape)
    return np.ascontiguousarray(array.T if layout == "time_first" else array, dtype=np.float32)


def _mel_layout(shape: tuple[int, ...], dtype: np.dtype, n_mel: int, layout: str,
                path: Path) -> tuple[tuple[int, int], str]:
    """The 2-D shape a mel file's array has (a leading batch axis of 1 dropped) and its layout, `auto`
    resolved: MelError for a dtype, shape or band count that is not a mel."""
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise MelError(f"{path}: dtype {dtype} is not a numeric mel", path=path)
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise MelError(f"{path}: shape {shape}: expected [n_mel, T], [T, n_mel] or [1, n_mel, T] "
                       f"with n_mel={n_mel}", path=path)
    rows, cols = shape
    if layout == "auto":
        if rows == n_mel and cols == n_mel:
            raise MelError(f"{path}: shape {shape} is ambiguous (both axes have {n_mel} entries); "
                           "say layout='mel_first' or 'time_first'", path=path)
        if rows == n_mel:
            layout = "mel_first"
        elif cols == n_mel:
            layout = "time_first"
        else:
            raise MelError(f"{path}: shape {shape} has no axis of {n_mel} mel bands (wrong band count: "
                           f"the model expects n_mel={n_mel})", path=path)
    bands, frames = (cols, rows) if layout == "time_first" else (rows, cols)
    if bands != n_mel:
        raise MelError(f"{path}: with layout='{layout}', shape {shape} gives {bands} bands; "
                       f"the model expects {n_mel}", path=path)
    if frames == 0:
        raise MelError(f"{path}: the mel has no frames", path=path)
    return (rows, cols), layout


# --- reading by blocks: memory bounded by a block, not by the mel -----------------------------------

#: frames read at a time when a mel is scanned (NaN/Inf, peak) by `open_mel`
SCAN_FRAMES = 2048
#: the format check looks at every frame of a mel up to this long (3.2 min; its statistics take about
#: 2.5 KiB a frame: 40 MiB), else at evenly spaced blocks of CHECK_BLOCK_FRAMES frames (as many frames)
CHECK_FRAMES = 16384
CHECK_BLOCK_FRAMES = 256
#: a `.pt` cannot be read in part (torch's zip holds the tensor whole): read whole, so bounded (80 bands: 81 min)
MAX_PT_MEL_BYTES = 2**27


class MelBlocks:
    """A mel file opened for reading by blocks of frames: `mel[:, a:b]` (or `block(a, b)`) reads float32
    `[n_mel, b - a]` from the file (pread: no mapping, nothing kept), the asked-for conversion applied;
    `shape`, `ndim`, `dtype` like the array `read_mel` returns, and `np.asarray(mel)` is that array. A
    `.pt` (torch's zip cannot be read in part) is held in memory, bounded by MAX_PT_MEL_BYTES. Picklable
    (a remote worker reopens the file)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path: Path, n_mel: int, frames: int, *, stft: STFTConfig, convert: str | None = None,
                 offset: int = 0, raw_dtype: Any = "<f4", frame_major: bool = False,
                 array: np.ndarray | None = None) -> None:
        self.path, self.n_mel, self.frames, self.stft, self.convert = path, n_mel, frames, stft, convert
        self.offset, self.raw_dtype, self.frame_major = offset, np.dtype(raw_dtype), frame_major
        self.array = array  # a .pt's mel, float32 [n_mel, T]
        self._fd: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_mel, self.frames)

    def __len__(self) -> int:
        return self.n_mel

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def raw_block(self, start: int, stop: int) -> np.ndarray:
        """float32 `[n_mel, stop - start]` as the file holds it (no conversion)."""
        start, stop = max(0, start), min(self.frames, stop)
        if self.array is not None:
            return self.array[:, start:stop]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        size, count = self.raw_dtype.itemsize, max(0, stop - start)
        if self.frame_major:  # frame after frame: one read
            rows = [self._read((self.offset + start * self.n_mel * size), count * self.n_mel)]
            raw = rows[0].reshape(count, self.n_mel).T
        else:  # band after band: a read per band
            raw = np.stack([self._read(self.offset + (band * self.frames + start) * size, count)
                            for band in range(self.n_mel)])
        return np.ascontiguousarray(raw, dtype=np.float32)

    def _read(self, offset: int, count: int) -> np.ndarray:
        data = os.pread(self._fd, count * self.raw_dtype.itemsize, offset)
        if len(data) != count * self.raw_dtype.itemsize:
            raise MelError(f"{self.path}: shrank while it was read (at byte {offset})", path=self.path)
        return np.frombuffer(data, dtype=self.raw_dtype)

    def block(self, start: int, stop: int) -> np.ndarray:
        raw = self.raw_block(start, stop)
        return raw if self.convert is None else _converted(raw, self.convert, self.stft)

    def __getitem__(self, key: Any) -> np.ndarray:
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)
                and key[1].step in (None, 1)):
            start, stop, _ = key[1].indices(self.frames)
            return self.block(start, max(start, stop))
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.block(0, self.frames)
        return whole if dtype is None else whole.astype(dtype)


def open_mel(path: str | Path, n_mel: int = 80, layout: str = "auto", convert: str | None = None, *,
             check: bool = True, stft: STFTConfig | None = None) -> MelBlocks:
    """`read_mel`, for reading by blocks (`MelBlocks`): the same checks and errors, in memory bounded by a
    block. `.npy` and `.bin` are read where they lie; a `.pt` is read whole (at most MAX_PT_MEL_BYTES).
    Every value is scanned for NaN/Inf; the format check sees the whole mel up to CHECK_FRAMES frames, and
    evenly spaced blocks of a longer one."""
    path, stft, suffix = _mel_args(path, n_mel, layout, convert, stft)
    if suffix == ".pt":
        with open_bounded(path, "a .pt mel file (read whole: save a long mel as .npy to read it by blocks)",
                          MAX_PT_MEL_BYTES, MelError):
            pass
        mel = read_mel(path, n_mel, layout, convert=None, check=False, stft=stft)
        blocks = MelBlocks(path, n_mel, mel.shape[1], stft=stft, convert=convert, array=mel)
    else:
        with open_bounded(path, "a mel file", MAX_MEL_BYTES, MelError) as handle:
            if suffix == ".npy":
                shape, fortran, raw_dtype, offset = _npy_header(path, handle)
            else:
                frames = _bin_frames(path, handle, n_mel, stft.hop_length)
                shape = (frames, n_mel) if layout == "time_first" else (n_mel, frames)
                fortran, raw_dtype, offset = False, np.dtype("<f4"), 0
        bin_layout = layout
        shape, layout = _mel_layout(shape, raw_dtype, n_mel, "mel_first" if suffix == ".bin" and layout == "auto"
                                    else layout, path)
        frames = shape[1] if layout == "mel_first" else shape[0]
        blocks = MelBlocks(path, n_mel, frames, stft=stft, convert=convert, offset=offset, raw_dtype=raw_dtype,
                           frame_major=(layout == "mel_first") == fortran)
        if suffix == ".bin":
            _refuse_interleaved(_sample(blocks), bin_layout, path, n_mel)
    bad, peak = 0, -math.inf
    for start in range(0, blocks.frames, SCAN_FRAMES):
        raw = blocks.raw_block(start, start + SCAN_FRAMES)
        finite = np.isfinite(raw)
        bad += int(raw.size - finite.sum())
        peak = max(peak, float(raw[finite].max(initial=-math.inf)))
    _refuse_non_finite(bad, path)
    if convert in ("db_amplitude", "db_power"):
        _refuse_0_db(peak, path)
    _formatted(_sample(blocks), convert, check, path, stft)
    return blocks


def _sample(blocks: MelBlocks) -> np.ndarray:
    """The frames the format check looks at (raw): all up to CHECK_FRAMES, else evenly spaced blocks."""
    if blocks.frames <= CHECK_FRAMES:
        return blocks.raw_block(0, blocks.frames)
    count = CHECK_FRAMES // CHECK_BLOCK_FRAMES
    starts = np.linspace(0, blocks.frames - CHECK_BLOCK_FRAMES, count).astype(int)
    return np.concatenate([blocks.raw_block(a, a + CHECK_BLOCK_FRAMES) for a in starts], axis=1)


# --- writing (tests and tools) ---------------------------------------------------------------------

def save_mel(path: str | Path, mel: np.ndarray) -> Path:
    """Write a `[n_mel, T]` mel as `.npy`, `.pt` (a plain tensor) or `.bin` (raw float32), atomically."""
    path = Path(path)
    mel = np.ascontiguousarray(mel, dtype=np.float32)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        write_bin(path, mel)
        return path
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, mel, allow_pickle=False)
    elif suffix == ".pt":
        torch.save(torch.from_numpy(mel.copy()), buffer)
    else:
        raise MelError(f"{path}: save_mel writes .npy, .pt or .bin, not '{path.suffix}'", path=path)
    return atomic_write_bytes(path, buffer.getvalue())


# --- conversion ------------------------------------------------------------------------------------

def convert_mel(mel: np.ndarray, convert: str, source: str | Path = "mel",
                stft: STFTConfig = STFTConfig()) -> np.ndarray:
    """Turn a log10 / dB / linear mel into natural-log magnitudes clamped at `stft.clip_val`.

    dB mels made with `ref=np.max` (peak at exactly 0 dB) are refused: their absolute level is gone.
    """
    mel = np.asarray(mel, dtype=np.float64)
    if convert in ("db_amplitude", "db_power") and mel.size:
        _refuse_0_db(float(mel.max()), source)
    if convert not in CONVERSIONS:
        raise MelError(f"{source}: convert must be one of {', '.join(CONVERSIONS)}, not {convert!r}")
    return _converted(mel, convert, stft)


def _refuse_0_db(peak: float, source: str | Path) -> None:
    if _peaks_at_0_db(peak):
        raise MelError(f"{source}: this dB mel peaks at exactly 0 dB, as librosa's ref=np.max makes it: its "
                       "absolute level is lost, so no conversion is exact; re-export it with ref=1.0",
                       path=source if isinstance(source, Path) else None)


def _converted(mel: np.ndarray, convert: str, stft: STFTConfig) -> np.ndarray:
    """`convert_mel`'s arithmetic (elementwise: a block at a time gives the whole's values)."""
    floor = np.float32(math.log(stft.clip_val))
    mel = np.asarray(mel, dtype=np.float64)
    if convert in _LOG_FACTORS:
        converted = mel * _LOG_FACTORS[convert]
    elif convert == "magnitude":
        converted = np.log(np.maximum(mel, stft.clip_val))
    elif convert == "power":
        converted = 0.5 * np.log(np.maximum(mel, stft.clip_val ** 2))
    return np.maximum(converted.astype(np.float32), floor)


# --- the format check ------------------------------------------------------------------------------

def check_mel_format(mel: Any, source: str | Path = "mel", stft: STFTConfig = STFTConfig()) -> MelFormat:
    """Is `mel` (`[n_mel, T]`) natural-log mel magnitudes clamped at `stft.clip_val`? See the module doc."""
    n_mel = stft.n_mel_channels
    mel = np.asarray(mel)
    source = str(source)
    if mel.ndim != 2:
        return MelFormat(False, WRONG_SHAPE, f"shape {mel.shape}, expected [{n_mel}, T]", source=source)
    empty = _no_frames(mel, n_mel, source)
    if empty is not None:
        return empty
    if mel.shape[0] != n_mel:
        if mel.shape[1] == n_mel:
            return MelFormat(False, TRANSPOSED, f"shape {mel.shape}: frames first; transpose it to "
                                                f"[{n_mel}, {mel.shape[0]}] (read_mel does for files)",
                             source=source)
        return MelFormat(False, WRONG_BANDS, f"shape {mel.shape}: {mel.shape[0]} bands, the model expects "
                                             f"{n_mel}", source=source)
    values = mel.astype(np.float64).ravel()
    if values.size == 0:
        return MelFormat(False, WRONG_SHAPE, "the mel has no frames", source=source)
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        return MelFormat(False, NON_FINITE, f"{bad} of {values.size} values are NaN or Inf", source=source)
    stats = _stats(values, math.log(stft.clip_val))
    constant = _constant(stats, math.log(stft.clip_val), source)
    if constant is not None:
        return constant
    label, conversion, reason = _classify(values, stats, math.log(stft.clip_val), n_mel)
    return MelFormat(label == NATURAL_LOG, label, reason, conversion if label != NATURAL_LOG else None, stats,
                     source)


def _no_frames(mel: np.ndarray, n_mel: int, source: str) -> MelFormat | None:
    """A 2-D mel with no frames (`[80, 0]`, `[0, 80]`, `[0, 0]`) is its own error: nothing to vocode, whichever
    way round it is (not "transpose it to [80, 0]")."""
    if 0 not in mel.shape:
        return None
    return MelFormat(False, NO_FRAMES, f"shape {mel.shape}: the mel has no frames (nothing to vocode); expected "
                                         f"[{n_mel}, T] with T >= 1", source=source)


def _constant(s: dict[str, float], ln_floor: float, source: str) -> MelFormat | None:
    """Every value the same (all 0, all 3e38) is no mel in any format: no conversion makes it one (silence
    at the ln(1e-5) floor aside, which is the model's format)."""
    if s["min"] != s["max"] or abs(s["min"] - ln_floor) < 1e-4:
        return None
    return MelFormat(False, CONSTANT, f"every value is {s['min']:.6g}: no mel of any audio, in any format, is one "
                                      f"number throughout (an empty or failed TTS output?)", stats=s, source=source)


def _stats(values: np.ndarray, ln_floor: float) -> dict[str, float]:
    p = [float(v) for v in np.percentile(values, [0, 0.5, 5, 50, 95, 99, 99.5, 100])]
    return {"min": p[0], "p0.5": p[1], "p5": p[2], "median": p[3], "p95": p[4], "p99": p[5], "p99.5": p[6],
            "max": p[7], "fraction_negative": float(np.mean(values < 0)),
            "at_ln_floor": float(np.mean(np.abs(values - ln_floor) < 1e-4))}


#: what the natural-log mel of real speech looks like (demo corpus: median -4.5 … -5, p0.5..p99.5 ≈ 10)
_TYPICAL_MEDIAN = (-9.0, -2.0)
_TYPICAL_RANGE = 10.0
_HIGHEST = 4.5    # ln of a full-scale signal's mel is ≤ about +3; TTS output may overshoot a little
_LOWEST = -13.0   # clamp at ln(1e-5) = -11.51; TTS output may undershoot a little
#: a rescaled format keeps its own clamp (log10 1e-5, librosa's amin), which lands at ln(1e-5) or above
_LOWEST_RESCALED = -12.0
#: fewer frames than this cannot tell natural log from log10 (a short excerpt has no pause, no floor)
MIN_FRAMES_FOR_SCALE = 16


def _unlikeness(values_p: dict[str, float], scale: float, floor_fraction: float = 0.0,
                lowest: float = _LOWEST) -> float:
    """How unlike a natural-log mel `scale × values` is (0 = typical); inputs are the value stats."""
    low, median, high = values_p["p0.5"] * scale, values_p["median"] * scale, values_p["p99.5"] * scale
    spread = max(high - low, 1.0)
    score = abs(math.log(spread / _TYPICAL_RANGE))
    score += max(0.0, _TYPICAL_MEDIAN[0] - median) + max(0.0, median - _TYPICAL_MEDIAN[1])
    score += 4.0 * max(0.0, lowest - low) + 4.0 * max(0.0, high - _HIGHEST)
    return score - (3.0 if floor_fraction >= 1e-3 else 0.0)  # the clamp itself, exactly: strong evidence


def _classify(values: np.ndarray, s: dict[str, float], ln_floor: float,
              n_mel: int) -> tuple[str, str | None, str]:
    summary = (f"min {s['min']:.3g}, median {s['median']:.3g}, max {s['max']:.3g}, "
               f"{100 * s['fraction_negative']:.0f}% negative")
    if s["min"] >= 0.0:
        return _classify_non_negative(values, s, summary)
    if s["min"] >= -1.0 - 1e-6 and s["max"] <= 1.0 + 1e-6:  # no log mel of real audio is this narrow
        return MINMAX_11, None, (f"{summary}: every value within [-1, 1]; undo the normalisation with the "
                                 "TTS recipe's bounds")
    if s["fraction_negative"] < 0.9:
        if s["p0.5"] > -3.0 and s["p99.5"] > _HIGHEST:
            return UNSCALED_AUDIO, None, (f"{summary}: shifted up by about ln(32768) = 10.4 from the "
                                          "expected range; divide the audio by 32768 before the mel")
        return NORMALISED, None, (f"{summary}: a natural-log mel is almost all negative; undo the "
                                  "normalisation with the TTS recipe's statistics")
    if s["at_ln_floor"] >= 0.999:
        return NATURAL_LOG, None, f"silence: every value at the ln({math.exp(ln_floor):.0e}) floor"
    # mostly negative: one of the log scales; pick the factor that makes it look most like a ln mel
    candidates = {
        NATURAL_LOG: (1.0, None),
        LOG10: (math.log(10.0), "log10"),
        DB: (math.log(10.0) / 20.0, "db_amplitude"),
        LN_POWER: (0.5, None),
    }
    scores = {label: (_unlikeness(s, 1.0, s["at_ln_floor"]) if label == NATURAL_LOG else
                      _unlikeness(s, factor, _floor_fraction(values, factor, ln_floor), _LOWEST_RESCALED))
              for label, (factor, _) in candidates.items()}
    best = min(scores, key=scores.get)
    frames = values.size // n_mel
    if best == LOG10 and frames < MIN_FRAMES_FOR_SCALE and s["p0.5"] >= _LOWEST and s["p99.5"] <= _HIGHEST:
        return NATURAL_LOG, None, (f"{summary}; only {frames} frame(s): too short to tell natural log from "
                                   "log10, taken as natural log")
    if best == NATURAL_LOG:
        if s["p0.5"] < _LOWEST or s["p99.5"] > _HIGHEST:
            return UNRECOGNISED, None, f"{summary}: beyond [{_LOWEST}, {_HIGHEST}] at the 0.5/99.5 % points"
        return NATURAL_LOG, None, summary
    factor, conversion = candidates[best]
    reason = (f"{summary}; times {factor:.4g} it would look like a natural-log mel "
              f"(median {s['median'] * factor:.3g}, 0.5–99.5 % range {s['p0.5'] * factor:.3g} … "
              f"{s['p99.5'] * factor:.3g})")
    if best == DB and _peaks_at_0_db(s["max"]):
        reason += "; it peaks at exactly 0 dB (ref=np.max), so its absolute level is lost"
        conversion = None
    return best, conversion, reason


def _peaks_at_0_db(peak: float) -> bool:
    """librosa's ref=np.max puts the peak at 0 dB (to rounding); with ref=1.0 that would be a coincidence."""
    return abs(peak) < 1e-4


def _floor_fraction(values: np.ndarray, factor: float, ln_floor: float) -> float:
    """Share of values at the ln(1e-5) clamp once scaled (log10's clamp at 1e-5 lands exactly there)."""
    return float(np.mean(np.abs(values * factor - ln_floor) < 1e-3))


def _classify_non_negative(values: np.ndarray, s: dict[str, float], summary: str) -> tuple[str, str | None, str]:
    # linear magnitudes/powers have a heavy right tail (median ≪ 99th percentile); normalised log mels do not
    if 0.3 <= s["max"] <= 1.0 + 1e-6 and s["median"] >= 0.1 * s["p99"]:
        return MINMAX_01, None, (f"{summary}: every value within [0, 1] and no heavy tail; undo the "
                                 "normalisation with the TTS recipe's bounds")
    logs = np.log(np.maximum(values, 1e-30))
    ls = {"p0.5": float(np.percentile(logs, 0.5)), "median": float(np.median(logs)),
          "p99.5": float(np.percentile(logs, 99.5))}
    as_magnitude = _unlikeness(ls, 1.0)
    as_power = _unlikeness(ls, 0.5)
    tail = f"{summary}: no negative values, median {s['median']:.3g} ≪ 99th percentile {s['p99']:.3g}"
    # noisy power and clean magnitude can look alike: name the other reading too
    if as_power < as_magnitude:
        return LINEAR_POWER, "power", (f"{tail}; half its natural log looks like a natural-log mel "
                                       "(if it is magnitude, not power: convert='magnitude')")
    return LINEAR_MAGNITUDE, "magnitude", (f"{tail}; its natural log looks like a natural-log mel "
                                           "(if it is power, not magnitude: convert='power')")
