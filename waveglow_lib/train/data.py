"""The training data: an LJSpeech-layout corpus in memory, random segments of it and their mels, and the
fixed segments validation is measured on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio import WavStream, mel_spectrogram
from ..config import STFTConfig
from ..errors import AudioError
from ..layout import CORPUS_WAVS_DIR


@dataclass
class Corpus:
    ids: list[str]
    audio: list[np.ndarray]
    sampling_rate: int


def load_corpus(folder: str | Path, segment_length: int, stft: STFTConfig = STFTConfig()) -> Corpus:
    """Every `wavs/*.wav` of an LJSpeech-layout folder, sorted; each must have the STFT's rate, be at least
    one segment long and hold usable audio (`WavStream.unusable`, preprocess's rule: not silent, not float
    samples far beyond full scale); the message names the files and says what is expected."""
    folder = Path(folder)
    wav_dir = folder / CORPUS_WAVS_DIR
    if not wav_dir.is_dir():
        raise AudioError(f"{folder}: not an LJSpeech-layout corpus (expected a wavs/ folder of .wav files)",
                         path=folder)
    paths = sorted(wav_dir.glob("*.wav"))
    if not paths:
        raise AudioError(f"{wav_dir}: no .wav files", path=wav_dir)
    ids, audio, wrong_rate, too_short, unusable = [], [], [], [], []
    for path in paths:
        stream = WavStream(path, expected_rate=None)
        samples, rate = np.concatenate(list(stream.pieces())), stream.rate
        if rate != stft.sampling_rate:
            wrong_rate.append(f"{path.name} ({rate} Hz)")
            continue
        if len(samples) < segment_length:
            too_short.append(f"{path.name} ({len(samples)} samples)")
            continue
        why = stream.unusable()
        if why:
            unusable.append(f"{path.name} ({why})")
            continue
        ids.append(path.stem)
        audio.append(samples)
    problems = []
    if wrong_rate:
        problems.append(f"{len(wrong_rate)} wav(s) not at {stft.sampling_rate} Hz: {', '.join(wrong_rate[:5])} "
                        "(resample the corpus first, e.g. with sox)")
    if too_short:
        problems.append(f"{len(too_short)} wav(s) shorter than segment_length={segment_length} samples: "
                        f"{', '.join(too_short[:5])} (remove them or lower segment_length)")
    if unusable:
        problems.append(f"{len(unusable)} of {len(paths)} wav(s) hold no usable audio: {', '.join(unusable[:3])} "
                        "(remove them; a model cannot learn from them)")
    if problems:
        raise AudioError(f"{wav_dir}: " + "; ".join(problems), path=wav_dir)
    return Corpus(ids, audio, stft.sampling_rate)


def draw_batch(corpus: Corpus, indices: list[int], batch_size: int, segment_length: int,
               generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Utterance indices and start offsets of one global batch (NVIDIA: a random file, a random window)."""
    picks = torch.randint(len(indices), (batch_size,), generator=generator).tolist()
    utterances = [indices[i] for i in picks]
    starts = []
    for u in utterances:
        room = len(corpus.audio[u]) - segment_length
        starts.append(int(torch.randint(room + 1, (1,), generator=generator)))
    return utterances, starts


def segments_and_mels(corpus: Corpus, utterances: list[int], starts: list[int], segment_length: int,
                      stft: STFTConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    audio = torch.from_numpy(np.stack([corpus.audio[u][s: s + segment_length] for u, s in zip(utterances, starts)]))
    mel = mel_spectrogram(audio, stft)
    return mel.to(device), audio.to(device)


def validation_batch(corpus: Corpus, indices: list[int], n_segments: int,
                     segment_length: int) -> tuple[list[int], list[int]]:
    """Fixed segments: the middle window of the first `n_segments` utterances (cycled)."""
    utterances = [indices[i % len(indices)] for i in range(n_segments)]
    starts = [(len(corpus.audio[u]) - segment_length) // 2 for u in utterances]
    return utterances, starts
