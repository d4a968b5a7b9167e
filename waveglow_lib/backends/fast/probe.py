"""The probe: a few frames of real speech (the bundled demo corpus's first utterance) that an engine is
checked on (`auto.py`'s quality gate) and that int8 engines calibrate their activation ranges on
(`engine.FastEngine.calibrate`)."""
from __future__ import annotations

import numpy as np
import torch

from ...audio import load_wav, mel_spectrogram
from ...config import DEMO_CORPUS_DIR, STFTConfig
from ...layout import CORPUS_WAVS_DIR

#: frames of real speech a reduced-precision engine is checked on before `precision: auto` trusts it
PROBE_FRAMES = 48
#: the noise's sigma on the probe (the workflow's default sigma)
PROBE_SIGMA = 0.6


def probe_mel(n_mel: int, frames: int = PROBE_FRAMES) -> torch.Tensor:
    """[1, n_mel, frames]: the log-mel of the bundled demo corpus's first utterance (speech, not noise)."""
    audio, _ = load_wav(sorted((DEMO_CORPUS_DIR / CORPUS_WAVS_DIR).glob("*.wav"))[0])
    mel = mel_spectrogram(audio, STFTConfig(n_mel_channels=n_mel))[:, :frames]
    return torch.from_numpy(np.ascontiguousarray(mel))[None]
