"""Audio in and out of the model: WAV reading and writing, resampling/down-mixing, and the Tacotron2 STFT mel.

The mel front-end reproduces NVIDIA's tacotron2 `stft.STFT` + `layers.TacotronSTFT.mel_spectrogram`
(the features `waveglow_256channels_universal_v5.pt` was trained on):

* reflect-pad `filter_length // 2` samples on both sides (their `F.pad(..., mode='reflect')`), so frame t
  is centred on sample t * hop and there are `1 + N // hop` frames;
* windowed DFT of each frame with the periodic Hann window (`scipy.signal.get_window('hann', win_length,
  fftbins=True)`) zero-padded to `filter_length` in the centre; their conv1d with the rows of
  `np.fft.fft(np.eye(filter_length))` is exactly a real FFT, which is what we compute (in float64, so the
  only difference from their float32 convolution is their own rounding);
* magnitude sqrt(re^2 + im^2), the Slaney mel filterbank of `librosa.filters.mel` (htk=False,
  norm='slaney': what NVIDIA's `layers.py` calls), then `log(clamp(x, 1e-5))`.

`STFT.inverse` is their inverse transform: overlap-add of the windowed inverse DFT, divided by the
window's sum-square envelope where it is not ~0 (their `window_sumsquare` + `librosa.util.tiny`). Their pinv-based
synthesis basis, scaled by filter_length / hop and then multiplied back, equals the plain inverse real
DFT for any spectrum a real signal can have, so `irfft` is used.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Literal

import librosa
import numpy as np
import soundfile
import soxr
import torch
from scipy.signal import get_window

from .config import STFTConfig
from .errors import AudioError
from .io import file_kind

#: NVIDIA's settings (STFTConfig is their home): the defaults below
_NVIDIA = STFTConfig()
#: float → int16 PCM scale: ±1.0 → ±32767 (symmetric, so +1.0 does not wrap around)
INT16_SCALE = 32767

__all__ = [
    "AudioError",
    "STFT",
    "downmix",
    "frames_for_samples",
    "hz_to_mel",
    "load_wav",
    "WavStream",
    "WavWriter",
    "mel_blocks",
    "mel_filterbank",
    "mel_spectrogram",
    "mel_to_hz",
    "resample",
]


# --------------------------------------------------------------------------------------------------
# WAV files
# --------------------------------------------------------------------------------------------------
def wav_file_stat(path: str | Path) -> os.stat_result:
    """The stat of a wav path that is a regular file (through links); AudioError saying what it is otherwise
    (missing, a link to nothing, a folder, a FIFO, a device). Nothing is opened: opening a FIFO blocks."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        dangling = path.is_symlink()
        raise AudioError(f"{path}: " + ("a symbolic link to a missing file" if dangling else "no such WAV file")
                         + ("" if isinstance(exc, FileNotFoundError) else f" ({exc.strerror})"), path=path) from None
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(f"{path}: {file_kind(info)}, not a WAV file (left unread)", path=path)
    return info


def load_wav(path: str | Path, expected_rate: int | None = _NVIDIA.sampling_rate, resample: bool = False,
             downmix: bool = False) -> tuple[np.ndarray, int]:
    """Read a WAV or FLAC file (anything libsndfile reads) as float32 mono in [-1, 1] and its sample rate.

    Integer PCM is scaled like NVIDIA's loader (int16 / 32768; 8-, 24- and 32-bit by their full scale),
    float files are taken as they are (clipped to [-1, 1], with a warning, if they exceed it). A rate other
    than `expected_rate` (None accepts any) is an error unless `resample=True`; more than one channel is an
    error unless `downmix=True` (mean of the channels). The whole file in memory: `WavStream` reads the
    same samples block by block.
    """
    stream = WavStream(path, expected_rate, resample=resample, downmix=downmix)
    return np.concatenate(list(stream.pieces())), stream.rate


#: a wav whose peak stays below this (≈3 LSB of int16) is silent: nothing to vocode or to learn from
SILENCE_PEAK = 1e-4
#: float samples beyond this (60 dB over full scale) are not audio scaled to [-1, 1]: clipped, they would be a
#: square wave (a slightly hot float file, peak 1.2, is clipped and used, with a warning)
BEYOND_FULL_SCALE = 1e3


#: samples (per channel) read from a wav at a time: what a `WavStream` holds, whatever the file's length
WAV_BLOCK_SAMPLES = 2**16


class WavStream:
    """A WAV or FLAC file read block by block: `pieces()` yields float32 mono pieces in [-1, 1] at `rate`
    whose concatenation is exactly `load_wav`'s samples (same scaling, clipping, down-mix; the resampler
    runs as a stream, which gives libsoxr's one-shot samples). The file's header is checked here (empty,
    unreadable, zero samples, channels, rate: AudioError naming the file); NaN/Inf samples when met.
    After `pieces()`: `samples` (the count) and `peak` (max |sample|).
    Memory: one block of the file (plus libsoxr's filter state when resampling), not the file.
    """

    def __init__(self, path: str | Path, expected_rate: int | None = _NVIDIA.sampling_rate, *,
                 resample: bool = False, downmix: bool = False, block: int = WAV_BLOCK_SAMPLES) -> None:
        self.path = path = Path(path)
        self.block = int(block)
        if wav_file_stat(path).st_size == 0:
            raise AudioError(f"{path}: the file is empty (0 bytes), not a WAV file", path=path)
        with self._open() as handle:
            self.source_rate, channels, frames = int(handle.samplerate), int(handle.channels), int(handle.frames)
        if frames == 0:
            raise AudioError(f"{path}: the WAV file holds zero samples", path=path)
        if channels > 1 and not downmix:
            raise AudioError(f"{path}: {channels} channels, expected mono; pass downmix=True "
                             f"(--set downmix=true) to average the channels", path=path)
        self.rate = self.source_rate
        if expected_rate is not None and self.source_rate != expected_rate:
            if not resample:
                raise AudioError(f"{path}: sample rate {self.source_rate} Hz, expected {expected_rate} Hz; pass "
                                 f"resample=True (--set resample=true) to convert it", path=path)
            self.rate = int(expected_rate)
        self.samples = 0
        self.peak = 0.0
        self.loudest = 0.0

    def unusable(self) -> str | None:
        """After `pieces()`: why the wav holds no usable audio (silent, or float samples far beyond full scale),
        or None. The one rule preprocess (which skips such a wav) and train (which refuses it) share."""
        if self.loudest > BEYOND_FULL_SCALE:
            return (f"float samples peak at {self.loudest:.3g}, far beyond full scale (1.0): not audio scaled to "
                    f"[-1, 1]; rescale it")
        if self.peak < SILENCE_PEAK:
            return f"silent (peak {self.peak:.2e})"
        return None

    def _open(self) -> soundfile.SoundFile:
        try:
            return soundfile.SoundFile(self.path)
        except Exception as exc:  # libsndfile's errors (LibsndfileError, RuntimeError, TypeError) for broken files
            raise AudioError(f"{self.path}: not a readable WAV file ({type(exc).__name__}: {exc})",
                             path=self.path) from None

    def _blocks(self) -> Iterator[np.ndarray]:
        """The file's float64 frames `[k, channels]`, a block at a time (libsndfile scales integer PCM)."""
        with self._open() as handle:
            while True:
                try:
                    data = handle.read(self.block, dtype="float64", always_2d=True)
                except Exception as exc:  # a file cut or damaged after its header
                    raise AudioError(f"{self.path}: not a readable WAV file ({type(exc).__name__}: {exc})",
                                     path=self.path) from None
                if not data.shape[0]:
                    return
                yield data

    def pieces(self) -> Iterator[np.ndarray]:
        """float32 mono pieces in [-1, 1] at `self.rate` (see the class)."""
        self.samples, self.peak, self.loudest, loudest = 0, 0.0, 0.0, 0.0
        resampler = (soxr.ResampleStream(self.source_rate, self.rate, 1, dtype="float64", quality="VHQ")
                     if self.rate != self.source_rate else None)
        for data in self._blocks():
            if not np.all(np.isfinite(data)):
                raise AudioError(f"{self.path}: the WAV file holds NaN or Inf samples", path=self.path)
            block_peak = float(np.max(np.abs(data)))
            if block_peak > 1.0:  # float samples beyond full scale: clipped (players do too), loudly below
                loudest = max(loudest, block_peak)
                data = np.clip(data, -1.0, 1.0)
            audio = data.astype(np.float32)
            audio = audio[:, 0] if audio.shape[1] == 1 else _downmix(audio)
            if resampler is not None:
                audio = self._resampled(resampler, audio, last=False)
            yield from self._counted(audio)
        if resampler is not None:
            yield from self._counted(self._resampled(resampler, np.zeros(0, np.float32), last=True))
        self.loudest = loudest
        if 0 < loudest <= BEYOND_FULL_SCALE:
            warnings.warn(f"{self.path}: float samples peak at {loudest:.3f}, beyond full scale; clipping to [-1, 1]",
                          stacklevel=2)

    @staticmethod
    def _resampled(resampler, audio: np.ndarray, last: bool) -> np.ndarray:
        out = resampler.resample_chunk(audio.astype(np.float64), last=last).astype(np.float32)
        # the resampler's filter can overshoot full scale by a hair; the mel front-end expects [-1, 1]
        return np.clip(out, -1.0, 1.0)

    def _counted(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        if audio.size:
            self.samples += audio.size
            self.peak = max(self.peak, float(np.max(np.abs(audio))))
            yield np.ascontiguousarray(audio, dtype=np.float32)


def _downmix(audio: np.ndarray) -> np.ndarray:
    return audio.astype(np.float64).mean(axis=1).astype(np.float32)


def _resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    return soxr.resample(audio.astype(np.float64), int(orig_rate), int(target_rate), quality="VHQ").astype(np.float32)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling (libsoxr, very high quality) from `orig_rate` to `target_rate`."""
    if orig_rate <= 0 or target_rate <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    audio = np.asarray(audio, dtype=np.float32)
    return audio if orig_rate == target_rate else _resample(audio, orig_rate, target_rate)


def downmix(audio: np.ndarray) -> np.ndarray:
    """[N, channels] -> [N] mean of the channels (mono input comes back unchanged)."""
    audio = np.asarray(audio, dtype=np.float32)
    return audio if audio.ndim == 1 else _downmix(audio)


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float audio → int16 PCM: clip to [-1, 1], ×32767, round (no wrap-around at +1.0)."""
    audio = np.asarray(audio, dtype=np.float32)
    return np.rint(np.clip(audio, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def wav_bytes(audio: np.ndarray, sample_rate: int = _NVIDIA.sampling_rate,
              sample_format: Literal["int16", "float32"] = "int16") -> bytes:
    """A complete mono .wav file in memory (the caller writes it atomically or sends it): `WavWriter`'s bytes.

    "int16": 16-bit PCM, the guide's wavs (float audio through `to_int16`; int16 samples as they are);
    "float32": 32-bit float, the exact samples a backend made (the service's answer).
    """
    buffer = io.BytesIO()
    with WavWriter(buffer, sample_rate, sample_format) as writer:
        writer.write(audio)
    return buffer.getvalue()


class WavWriter:
    """The one writer of every .wav the workflow makes (libsndfile, through soundfile): a mono file written
    piece by piece into an open binary file (`io.atomic_stream`, a BytesIO ...) with `write(samples)`, its
    header's sizes fixed by `close()` when they are known; the same bytes, whatever the pieces.
    `sample_format` as `wav_bytes`'."""

    SUBTYPES = {"int16": "PCM_16", "float32": "FLOAT"}

    def __init__(self, handle: BinaryIO, sample_rate: int = _NVIDIA.sampling_rate,
                 sample_format: Literal["int16", "float32"] = "int16") -> None:
        if sample_format not in self.SUBTYPES:
            raise AudioError(f"wav sample format must be 'int16' or 'float32', got {sample_format!r}")
        self.sample_format, self.samples = sample_format, 0
        self.file = soundfile.SoundFile(handle, mode="w", samplerate=int(sample_rate), channels=1, format="WAV",
                                        subtype=self.SUBTYPES[sample_format])

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio).reshape(-1)
        if self.sample_format == "float32":
            audio = audio.astype(np.float32, copy=False)
        elif audio.dtype != np.int16:
            audio = to_int16(audio)
        if (self.samples + audio.size) * audio.itemsize > 0xFFFFFFFF - 36:
            raise AudioError(f"audio of more than {0xFFFFFFFF // audio.itemsize} samples does not fit a .wav "
                             "file (4 GiB)")
        self.file.write(audio)
        self.samples += audio.size

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- streamed audio (issue 36): the bytes a pipe or an HTTP stream sends, beside wav_bytes / WavWriter ----
#: the sizes a WAV header states when the length is not known as it is sent (ffmpeg's and sox's pipes)
STREAM_WAV_SIZE = 0xFFFFFFFF


def pcm_int16_bytes(audio: np.ndarray) -> bytes:
    """The data chunk of `wav_bytes(audio)`'s int16 file: 16-bit little-endian PCM (`aplay -f S16_LE`)."""
    return to_int16(audio).astype("<i2").tobytes()


class PcmWriter:
    """Raw int16 PCM written piece by piece to a binary stream (a pipe): `WavWriter`'s data chunk without its
    header, each piece flushed at once so a player gets it as it is made."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.data_bytes = handle, 0

    def write(self, audio: np.ndarray) -> None:
        data = pcm_int16_bytes(audio)
        self.handle.write(data)
        self.handle.flush()
        self.data_bytes += len(data)

    def close(self) -> None:
        self.handle.flush()


def stream_wav_header(sample_rate: int) -> bytes:
    """The header of a mono 32-bit float WAV sent before its length is known: RIFF and data sizes are
    STREAM_WAV_SIZE (the streaming convention: read to the end), then float32 little-endian samples follow.
    soundfile / libsndfile and scipy read it, stopping at the end of what arrived."""
    rate = int(sample_rate)
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", STREAM_WAV_SIZE, b"WAVE", b"fmt ", 16, 3, 1, rate, 4 * rate,
                       4, 32, b"data", STREAM_WAV_SIZE)


def frames_for_samples(n_samples: int, hop: int = _NVIDIA.hop_length) -> int:
    """Mel frames NVIDIA's centred STFT gives for `n_samples` samples: 1 + n // hop."""
    return 1 + int(n_samples) // int(hop)


# --------------------------------------------------------------------------------------------------
# Slaney mel filterbank (librosa.filters.mel with htk=False, norm='slaney')
# --------------------------------------------------------------------------------------------------
def hz_to_mel(freq: Any) -> np.ndarray:
    """Slaney's Auditory Toolbox mel scale (librosa `hz_to_mel(htk=False)`): linear below 1 kHz."""
    return np.asarray(librosa.hz_to_mel(np.asarray(freq, dtype=np.float64), htk=False))


def mel_to_hz(mel: Any) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    return np.asarray(librosa.mel_to_hz(np.asarray(mel, dtype=np.float64), htk=False))


@functools.lru_cache(maxsize=16)
def _mel_filterbank_cached(sampling_rate: int, n_fft: int, n_mels: int, fmin: float,
                           fmax: float) -> np.ndarray:
    weights = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                                  htk=False, norm="slaney", dtype=np.float64)
    weights.setflags(write=False)
    return weights


def mel_filterbank(sampling_rate: int = _NVIDIA.sampling_rate, n_fft: int = _NVIDIA.filter_length,
                   n_mels: int = _NVIDIA.n_mel_channels, fmin: float = _NVIDIA.mel_fmin,
                   fmax: float | None = _NVIDIA.mel_fmax) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float64 Slaney mel filterbank (`librosa.filters.mel`, as NVIDIA builds it)."""
    fmax = sampling_rate / 2.0 if fmax is None else float(fmax)
    return _mel_filterbank_cached(int(sampling_rate), int(n_fft), int(n_mels), float(fmin), fmax).copy()


# --------------------------------------------------------------------------------------------------
# STFT (NVIDIA tacotron2 stft.STFT)
# --------------------------------------------------------------------------------------------------
#: librosa.util.tiny of NVIDIA's float32 window sum: below this the envelope counts as zero
_TINY = float(librosa.util.tiny(np.float32(0.0)))


class STFT:
    """NVIDIA's tacotron2 STFT: centred (reflect-padded) Hann-windowed transform and its inverse.

    Works on torch tensors [B, N] (use `as_batch` for numpy/1-D input). Computes in float64 on CPU and
    CUDA (float32 elsewhere); results stay on the input's device.
    """

    def __init__(self, filter_length: int = _NVIDIA.filter_length, hop_length: int = _NVIDIA.hop_length,
                 win_length: int = _NVIDIA.win_length, window: str = "hann") -> None:
        if not 0 < win_length <= filter_length:
            raise AudioError(f"win_length must be in 1..filter_length, got {win_length} > {filter_length}")
        if hop_length <= 0:
            raise AudioError(f"hop_length must be positive, got {hop_length}")
        self.filter_length = int(filter_length)
        self.hop_length = int(hop_length)
        self.win_length = int(win_length)
        win = get_window(window, self.win_length, fftbins=True)
        self.window = torch.from_numpy(librosa.util.pad_center(win, size=self.filter_length))

    @classmethod
    def from_config(cls, config: STFTConfig) -> "STFT":
        return _stft_for(config.filter_length, config.hop_length, config.win_length)

    @property
    def n_freqs(self) -> int:
        return self.filter_length // 2 + 1

    @property
    def pad(self) -> int:
        return self.filter_length // 2

    def n_frames(self, n_samples: int) -> int:
        return 1 + (n_samples + 2 * self.pad - self.filter_length) // self.hop_length

    def check(self, audio: torch.Tensor, what: str = "audio") -> None:
        """Reject what NVIDIA's code would choke on (or silently turn into NaN mels)."""
        if audio.ndim != 2:
            raise AudioError(f"{what}: expected [N] or [B, N] samples, got shape {tuple(audio.shape)}")
        if audio.shape[-1] <= self.pad:
            raise AudioError(f"{what}: {audio.shape[-1]} samples is too short; the STFT's reflect padding "
                             f"needs more than filter_length // 2 = {self.pad} samples")
        if not bool(torch.isfinite(audio).all()):
            raise AudioError(f"{what}: contains NaN or Inf samples")

    def _spectrum(self, audio: torch.Tensor) -> torch.Tensor:
        """Complex spectrum [B, n_freqs, frames] of [B, N] audio."""
        self.check(audio)
        x = audio.to(_compute_dtype(audio.device))
        x = torch.nn.functional.pad(x[:, None, :], (self.pad, self.pad), mode="reflect")[:, 0, :]
        return self.padded_spectrum(x)

    def padded_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Complex spectrum [B, n_freqs, frames] of [B, M] samples already padded (frame t starts at t * hop)."""
        dtype = _compute_dtype(x.device)
        x = x.to(dtype)
        frames = x.unfold(-1, self.filter_length, self.hop_length)          # [B, T, filter_length]
        frames = frames * self.window.to(device=x.device, dtype=dtype)
        return torch.fft.rfft(frames, dim=-1).transpose(1, 2)                # [B, F, T]

    def transform(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] audio -> (magnitude, phase), each [B, filter_length // 2 + 1, 1 + N // hop]."""
        spec = self._spectrum(audio)
        return spec.abs(), torch.atan2(spec.imag, spec.real)

    def magnitude(self, audio: torch.Tensor) -> torch.Tensor:
        return self._spectrum(audio).abs()

    def inverse(self, magnitude: torch.Tensor, phase: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(magnitude, phase) [B, F, T] -> audio [B, length].

        `length=None` trims like NVIDIA (filter_length // 2 off both ends: (T - 1) * hop samples); a
        `length` up to (T - 1) * hop + filter_length // 2 keeps that many samples from the start, which
        for T = 1 + N // hop recovers all N input samples (NVIDIA's output is the first (T - 1) * hop).
        """
        dtype = _compute_dtype(magnitude.device)
        spec = torch.polar(magnitude.to(dtype), phase.to(dtype))                 # [B, F, T]
        frames = torch.fft.irfft(spec.transpose(1, 2), n=self.filter_length, dim=-1)
        window = self.window.to(device=magnitude.device, dtype=dtype)
        n_frames = frames.shape[1]
        total = self.filter_length + self.hop_length * (n_frames - 1)
        signal = self._overlap_add(frames * window, total)
        envelope = self._overlap_add((window ** 2).expand(1, n_frames, -1), total)[0]
        nonzero = envelope > _TINY
        signal[:, nonzero] = signal[:, nonzero] / envelope[nonzero]
        end = total - self.pad if length is None else self.pad + int(length)
        if end > total:
            raise AudioError(f"length {length} is longer than {n_frames} frames can give "
                             f"({total - self.pad} samples)")
        return signal[:, self.pad:end]

    def _overlap_add(self, frames: torch.Tensor, total: int) -> torch.Tensor:
        """[B, T, filter_length] -> [B, total]: frame t added at sample t * hop."""
        folded = torch.nn.functional.fold(
            frames.transpose(1, 2), output_size=(1, total), kernel_size=(1, self.filter_length),
            stride=(1, self.hop_length))
        return folded[:, 0, 0, :]


@functools.lru_cache(maxsize=8)
def _stft_for(filter_length: int, hop_length: int, win_length: int) -> STFT:
    return STFT(filter_length, hop_length, win_length)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps our numbers at the true values; some accelerators (mps, npu) lack it
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def as_batch(audio: Any) -> tuple[torch.Tensor, dict]:
    """numpy / torch audio [N] or [B, N] -> torch [B, N] plus what `restore` needs to give it back."""
    was_numpy = not isinstance(audio, torch.Tensor)
    tensor = torch.from_numpy(np.asarray(audio)) if was_numpy else audio
    if not tensor.is_floating_point():
        raise AudioError(f"audio: expected float samples in [-1, 1], got {tensor.dtype} (divide int16 "
                         f"PCM by 32768, or read it with load_wav)")
    if tensor.ndim not in (1, 2):
        raise AudioError(f"audio: expected [N] or [B, N] samples, got shape {tuple(tensor.shape)}")
    info = {"numpy": was_numpy, "squeeze": tensor.ndim == 1, "dtype": tensor.dtype}
    return (tensor[None] if tensor.ndim == 1 else tensor).detach(), info


def restore(result: torch.Tensor, info: dict, dtype: Any = "input") -> Any:
    """Undo `as_batch`: same container (numpy/torch), batch axis dropped for 1-D input.

    `dtype="input"` keeps the input's float dtype; None gives float32.
    """
    if info["squeeze"]:
        result = result[0]
    target = info["dtype"] if dtype == "input" else torch.float32
    result = result.to(target)
    return result.cpu().numpy() if info["numpy"] else result


# --------------------------------------------------------------------------------------------------
# mel spectrogram (NVIDIA tacotron2 layers.TacotronSTFT.mel_spectrogram)
# --------------------------------------------------------------------------------------------------
def mel_spectrogram(audio: Any, stft: STFTConfig = STFTConfig()) -> Any:
    """Log-mel spectrogram of float audio in [-1, 1]: [N] -> [n_mel, 1 + N // hop], [B, N] -> [B, n_mel, T].

    numpy in gives numpy float32 out; torch in gives a float32 tensor on the input's device.
    """
    batch, info = as_batch(audio)
    return restore(_log_mel(STFT.from_config(stft).magnitude(batch), stft), info, dtype=None)


def _log_mel(magnitude: torch.Tensor, stft: STFTConfig) -> torch.Tensor:
    """[B, n_freqs, T] STFT magnitude -> [B, n_mel, T] log(clamp(Slaney mel, clip_val))."""
    basis = torch.from_numpy(mel_filterbank(stft.sampling_rate, stft.filter_length, stft.n_mel_channels,
                                            stft.mel_fmin, stft.mel_fmax))
    mel = torch.matmul(basis.to(device=magnitude.device, dtype=magnitude.dtype), magnitude)
    return torch.log(torch.clamp(mel, min=stft.clip_val))


#: mel frames computed at a time by `mel_blocks` (about 12 MB of float64 STFT frames at filter 1024)
MEL_BLOCK_FRAMES = 512


def mel_blocks(pieces: Iterable[np.ndarray], stft: STFTConfig = STFTConfig(),
               block_frames: int = MEL_BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """`mel_spectrogram` of a stream of float mono sample pieces, as float32 `[n_mel, k]` blocks of frames:
    joined, they equal the one-shot mel of the joined samples (to float rounding; the same float64 frames).

    Exact seams: frame t reads samples [t·hop - pad, t·hop - pad + filter_length), pad = filter_length // 2,
    so a block of frames needs its own samples plus filter_length - hop of overlap; the reflect padding of
    the centred STFT exists only at the stream's two ends (the end is known when the stream ends). Memory:
    one block of frames and that overlap, whatever the stream's length.
    """
    transform = STFT.from_config(stft)
    hop, width, pad = transform.hop_length, transform.filter_length, transform.pad
    block_frames = max(1, int(block_frames))
    buffer = np.zeros(0, dtype=np.float64)   # samples [base, base + buffer.size) of the stream
    base = start = 0                         # the next block starts at frame `start`

    def block(t0: int, t1: int, total: int | None) -> np.ndarray:
        index = np.arange(t0 * hop - pad, (t1 - 1) * hop - pad + width)
        index = np.abs(index)  # reflect at the start: sample -i is sample i
        if total is not None:  # reflect at the end: sample total - 1 + i is sample total - 1 - i
            index = np.where(index >= total, 2 * (total - 1) - index, index)
        padded = torch.from_numpy(buffer[index - base])[None]
        return _log_mel(transform.padded_spectrum(padded).abs(), stft)[0].to(torch.float32).numpy()

    def keep_from(frame: int) -> None:
        nonlocal buffer, base
        drop = max(0, frame * hop - pad - width) - base  # a margin for the end's reflection
        if drop > 0:
            buffer, base = buffer[drop:], base + drop

    for index, piece in enumerate(pieces):
        piece = np.asarray(piece, dtype=np.float64).reshape(-1)
        if not np.isfinite(piece).all():
            raise AudioError(f"audio piece {index}: contains NaN or Inf samples")
        buffer = np.concatenate([buffer, piece])
        # a block whose last frame ends inside what has arrived needs no reflection at the end
        while (start + block_frames - 1) * hop - pad + width <= base + buffer.size:
            yield block(start, start + block_frames, None)
            start += block_frames
            keep_from(start)
    total = base + buffer.size
    if total <= pad:
        raise AudioError(f"audio: {total} samples is too short; the STFT's reflect padding needs more than "
                         f"filter_length // 2 = {pad} samples")
    frames = transform.n_frames(total)
    while start < frames:
        stop = min(frames, start + block_frames)
        yield block(start, stop, total)
        start = stop
