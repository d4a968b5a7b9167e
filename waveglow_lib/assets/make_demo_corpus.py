"""Regenerate the demo corpus: LJSpeech's first ten transcripts spoken by espeak-ng.

    apt-get install -y espeak-ng          # (any Debian/Ubuntu; brew install espeak-ng on macOS)
    python -m waveglow_lib.assets.make_demo_corpus [--out DIR] [--speed WPM]

Writes, in LJSpeech-1.1 layout, `wavs/LJ001-0001.wav` ... `LJ001-0010.wav` (22050 Hz, mono, int16) and
`metadata.csv` (`id|text|normalized text`, the real LJSpeech lines). The guide's test set is exactly these
ten utterances, so a real LJSpeech-1.1 folder drops in with one parameter (`corpus: /path/LJSpeech-1.1`).

Settings are fixed (voice en-us+f3, 230 words/min, pitch 50, amplitude 100, no word gap), so the same
espeak-ng release gives byte-identical files; the committed ones were made with espeak-ng 1.51. Silence
beyond 0.1 s at either end is trimmed to keep the corpus small (about 1.9 MB).
This is synthetic speech: good for exercising the pipeline and the mel front-end, not for judging a
trained vocoder's quality (use the real recordings for that).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from ..audio import resample, wav_bytes
from ..config import DEMO_CORPUS_DIR, STFTConfig
from ..io import atomic_write_bytes, atomic_write_text
from ..layout import CORPUS_METADATA_FILE, CORPUS_WAVS_DIR

#: the model's rate: the corpus is preprocessed without resampling
SAMPLE_RATE = STFTConfig().sampling_rate
VOICE = "en-us+f3"
SPEED_WPM = 230
PITCH = 50
AMPLITUDE = 100
#: samples kept before the first and after the last sound (0.1 s)
MARGIN = SAMPLE_RATE // 10
#: |sample| above this (int16) counts as sound when trimming
SILENCE_LEVEL = 64
MAX_TOTAL_BYTES = 2_000_000

#: LJSpeech-1.1 metadata.csv, LJ001-0001 ... LJ001-0010: (id, text, normalized text)
TRANSCRIPTS: tuple[tuple[str, str, str], ...] = (
    ("LJ001-0001",
     "Printing, in the only sense with which we are at present concerned, differs from most if not from "
     "all the arts and crafts represented in the Exhibition",
     "Printing, in the only sense with which we are at present concerned, differs from most if not from "
     "all the arts and crafts represented in the Exhibition"),
    ("LJ001-0002", "in being comparatively modern.", "in being comparatively modern."),
    ("LJ001-0003",
     "For although the Chinese took impressions from wood blocks engraved in relief for centuries before "
     "the woodcutters of the Netherlands, by a similar process",
     "For although the Chinese took impressions from wood blocks engraved in relief for centuries before "
     "the woodcutters of the Netherlands, by a similar process"),
    ("LJ001-0004",
     "produced the block books, which were the immediate predecessors of the true printed book,",
     "produced the block books, which were the immediate predecessors of the true printed book,"),
    ("LJ001-0005",
     "the invention of movable metal letters in the middle of the fifteenth century may justly be "
     "considered as the invention of the art of printing.",
     "the invention of movable metal letters in the middle of the fifteenth century may justly be "
     "considered as the invention of the art of printing."),
    ("LJ001-0006",
     "And it is worth mention in passing that, as an example of fine typography,",
     "And it is worth mention in passing that, as an example of fine typography,"),
    ("LJ001-0007",
     'the earliest book printed with movable types, the Gutenberg, or "forty-two line Bible" of about 1455,',
     'the earliest book printed with movable types, the Gutenberg, or "forty-two line Bible" of about '
     'fourteen fifty-five,'),
    ("LJ001-0008", "has never been surpassed.", "has never been surpassed."),
    ("LJ001-0009",
     "Printing, then, for our purpose, may be considered as the art of making books by means of movable "
     "types.",
     "Printing, then, for our purpose, may be considered as the art of making books by means of movable "
     "types."),
    ("LJ001-0010",
     "Now, as all books not primarily intended as picture-books consist principally of types composed to "
     "form letterpress,",
     "Now, as all books not primarily intended as picture-books consist principally of types composed to "
     "form letterpress,"),
)


def espeak_binary() -> str:
    for name in ("espeak-ng", "espeak"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("espeak-ng not found: install it (apt-get install -y espeak-ng, or brew install espeak-ng)")


def speak(text: str, speed: int = SPEED_WPM, binary: str | None = None) -> np.ndarray:
    """Speak `text` with the fixed espeak-ng settings; int16 mono at SAMPLE_RATE."""
    binary = binary or espeak_binary()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        # text goes in on stdin so quotes and leading dashes are never parsed as options
        subprocess.run([binary, "-v", VOICE, "-s", str(speed), "-p", str(PITCH), "-a", str(AMPLITUDE),
                        "-g", "0", "-w", str(out), "--stdin"], input=text.encode("utf-8"), check=True,
                       capture_output=True)
        rate, data = wavfile.read(out)
    if data.ndim != 1:
        data = data.mean(axis=1)
    if data.dtype != np.int16:
        raise SystemExit(f"espeak-ng wrote {data.dtype} samples, expected int16")
    if rate != SAMPLE_RATE:  # espeak-ng speaks at 22050 Hz; other builds/voices (mbrola) may not
        converted = resample(data.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)
        data = np.clip(np.round(converted * 32768.0), -32768, 32767).astype(np.int16)
    return trim_silence(data)


def trim_silence(data: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(data.astype(np.int32)) > SILENCE_LEVEL)
    if loud.size == 0:
        return data
    return data[max(0, loud[0] - MARGIN): loud[-1] + 1 + MARGIN]


def make_corpus(out_dir: Path = DEMO_CORPUS_DIR, speed: int = SPEED_WPM) -> dict[str, float]:
    """Write the corpus under `out_dir`; returns {utterance id: seconds}."""
    binary = espeak_binary()
    durations: dict[str, float] = {}
    total = 0
    for utt_id, _text, normalized in TRANSCRIPTS:
        # the normalized column spells numbers out ("fourteen fifty-five"), as a reader would say them
        samples = speak(normalized, speed, binary)
        payload = wav_bytes(samples, SAMPLE_RATE)  # int16 samples, written as they are
        atomic_write_bytes(out_dir / CORPUS_WAVS_DIR / f"{utt_id}.wav", payload)
        durations[utt_id] = len(samples) / SAMPLE_RATE
        total += len(payload)
    lines = "".join(f"{utt_id}|{text}|{normalized}\n" for utt_id, text, normalized in TRANSCRIPTS)
    atomic_write_text(out_dir / CORPUS_METADATA_FILE, lines)
    total += len(lines.encode("utf-8"))
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"corpus is {total} bytes, over the {MAX_TOTAL_BYTES} byte budget: raise --speed")
    return durations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_CORPUS_DIR, help="corpus folder (default: %(default)s)")
    parser.add_argument("--speed", type=int, default=SPEED_WPM, help="espeak-ng words per minute")
    args = parser.parse_args(argv)
    durations = make_corpus(args.out, args.speed)
    for utt_id, seconds in durations.items():
        print(f"{utt_id}  {seconds:6.2f} s")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(durations)} utterances, {sum(durations.values()):.1f} s, {size / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
