"""The run folder: every file one run makes has its name here and nowhere else.

    runs/<name>/params.yaml            the parameters the run was made with
               .file_stamps.json                              content hashes of the run's files (`stamps`)
               mel/<id>.bin, <id>.txt, manifest.json          preprocess (+ .preprocess.jsonl while running)
               onnx/waveglow.onnx (+ .json), waveglow_openvino.xml/.bin, waveglow_optimized.onnx
               om/waveglow.om, waveglow.gears.json, convert_atc.sh, atc.log
               out/<id>_out.bin, timings.json                  infer
               wav/<id>_syn.wav, postprocess.json              postprocess
               vocode/<id>_syn.wav (+ <id>_out.bin), vocode.json   vocode (mels from elsewhere)
               notebooks/*.ipynb, report.html                  the notebook runner
               metrics.json, throughput.json                   evaluate, the notebooks' throughput rows
               bench.json/.md, bench_stream.json/.md, serve_load.json/.md, bench_models/, bench_cache/

    <train out_dir>/params.yaml, train_state.safetensors, model.safetensors, history.json, .waveglow-train
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ManifestError, RunFolderError
from .io import MAX_RECORD_BYTES, read_bounded

ONNX_NAME = "waveglow.onnx"
GUIDE_ONNX_NAME = "WaveGlow_onnx.onnx"
OPENVINO_NAME = "waveglow_openvino.xml"
ORT_OPT_NAME = "waveglow_optimized.onnx"
OM_NAME = "waveglow"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "waveglow_lib mel manifest v1"
#: per-run settings (incl. what `auto` became) and per-utterance timings, in the output folder
TIMINGS_FILE = "timings.json"
#: the vocode stage's record (settings, sources, per-item and per-worker timings) in its output folder
VOCODE_RECORD_FILE = "vocode.json"
#: the notebooks' quick throughput rows, collected into metrics.json
THROUGHPUT_FILE = "throughput.json"
PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
#: the postprocess stage's record (settings per finished wav: what may be skipped) in the wav folder
POSTPROCESS_RECORD_FILE = "postprocess.json"
#: measurements written as a record and its table side by side (`measurement_files`), in the run folder or
#: the --out-dir named: the benchmark harness, the streaming bench, the service's load test
BENCH, BENCH_STREAM, SERVE_LOAD = "bench", "bench_stream", "serve_load"
#: the benchmark's exported graphs, and the streaming bench's engine cache, in the same folder
BENCH_MODELS_DIR = "bench_models"
BENCH_CACHE_DIR = "bench_cache"
#: an LJSpeech-layout corpus: wavs/ (or the wavs at its top) and metadata.csv
CORPUS_WAVS_DIR = "wavs"
CORPUS_METADATA_FILE = "metadata.csv"
#: the preprocess stage's journal in the mel folder: one JSON line per finished item, until the manifest holds them
PREPROCESS_JOURNAL_FILE = ".preprocess.jsonl"
#: atc's output when convert runs it, in the om folder
ATC_LOG_FILE = "atc.log"
#: what the run's files hash to (content sha256; the checkpoint's fingerprint and STFT settings), kept by `stamps`
FILE_STAMPS_FILE = ".file_stamps.json"
#: a training folder (the train stage's out_dir, beside its PARAMS_FILE): the resume state, the folded model
#: (what `load_waveglow` reads), the loss history, and the marker that makes the folder one training may overwrite
TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_MODEL_FILE = "model.safetensors"
TRAIN_HISTORY_FILE = "history.json"
TRAIN_MARKER_FILE = ".waveglow-train"
#: what `convert` may build
CONVERT_TARGETS = ("atc", "openvino", "onnxruntime")
#: the run folder's subfolders a stage writes (`RunLayout.owned_folders`)
OWNED_FOLDERS = ("mel", "onnx", "om", "out", "wav", "vocode", "notebooks", BENCH_MODELS_DIR)
#: an utterance id is a file stem: no folders, no leading dot
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.#@+-]{0,199}$")


def record_path(artefact: str | Path) -> Path:
    """The record written beside a model file (`waveglow.onnx` → `waveglow.json`): what made it, its sizes."""
    return Path(artefact).with_suffix(".json")


def measurement_files(folder: str | Path, stem: str) -> tuple[Path, Path]:
    """(`<stem>.json`, `<stem>.md`) in `folder`: a measurement's record and its table (BENCH, ...)."""
    return Path(folder) / f"{stem}.json", Path(folder) / f"{stem}.md"


def sample_count_file(mel_path: str | Path) -> Path:
    """The guide's `<id>.txt` beside a mel `<id>.bin`: the source wav's sample count."""
    return Path(mel_path).with_suffix(".txt")


def gears_file(om_path: str | Path) -> Path:
    """convert writes `<om stem>.gears.json` beside the `.om`: batch and mel-length gears it was built for."""
    om_path = Path(om_path)
    return om_path.with_name(om_path.stem + ".gears.json")


def check_utterance_id(utt_id: object, source: str | Path) -> str:
    """An id becomes a file name in the run folder: it must be a plain name (no `/`, `..`, or control chars)."""
    if not isinstance(utt_id, str) or not _PLAIN_ID.fullmatch(utt_id) or ".." in utt_id:  # `$` passes a final \n
        raise ManifestError(f"{source}: utterance id {utt_id!r} is not a plain file name "
                            "(letters, digits, _ . - + # @; no folders)", path=source)
    return utt_id


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (`runs/<name>/`)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def mel_dir(self) -> Path:
        return self.folder("mel", "the mel folder")

    @property
    def manifest(self) -> Path:
        return self.mel_dir / MANIFEST_NAME

    @property
    def onnx_dir(self) -> Path:
        return self.folder("onnx", "the onnx folder")

    @property
    def onnx(self) -> Path:
        return self.onnx_dir / ONNX_NAME

    @property
    def guide_onnx(self) -> Path:
        return self.onnx_dir / GUIDE_ONNX_NAME

    @property
    def openvino_ir(self) -> Path:
        return self.onnx_dir / OPENVINO_NAME

    @property
    def onnx_optimized(self) -> Path:
        return self.onnx_dir / ORT_OPT_NAME

    @property
    def om_dir(self) -> Path:
        return self.folder("om", "the om folder")

    @property
    def om(self) -> Path:
        return self.om_dir / f"{OM_NAME}.om"

    @property
    def atc_script(self) -> Path:
        return self.om_dir / "convert_atc.sh"

    @property
    def atc_log(self) -> Path:
        return self.om_dir / ATC_LOG_FILE

    @property
    def out_dir(self) -> Path:
        return self.folder("out", "the output folder")

    @property
    def timings(self) -> Path:
        return self.out_dir / TIMINGS_FILE

    @property
    def wav_dir(self) -> Path:
        return self.folder("wav", "the wav folder")

    @property
    def postprocess_record(self) -> Path:
        return self.wav_dir / POSTPROCESS_RECORD_FILE

    @property
    def vocode_dir(self) -> Path:
        """The vocode stage's wavs (and `<id>_out.bin` when asked) for mels from elsewhere."""
        return self.folder("vocode", "the vocode folder")

    @property
    def vocode_record(self) -> Path:
        return self.vocode_dir / VOCODE_RECORD_FILE

    @property
    def notebooks_dir(self) -> Path:
        return self.folder("notebooks", "the notebooks folder")

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def throughput(self) -> Path:
        return self.root / THROUGHPUT_FILE

    @property
    def bench_json(self) -> Path:
        return measurement_files(self.root, BENCH)[0]

    def check(self, path: str | Path, what: str = "path") -> Path:
        """`path` must resolve inside the run folder (no link or `..` out of it)."""
        return inside(self.root, path, what)

    def folder(self, name: str, what: str) -> Path:
        """A folder of the run (`mel/`, `out/`, `vocode/` ...), checked each time a stage, the report or a
        notebook asks for it, so nothing reads or writes through a link leading out of the run folder: the one
        place that holds every folder, and the files in them, to the rule (a link within the run is fine)."""
        return self.check(self.root / name, what)

    def owned_folders(self) -> list[Path]:
        """The folders whose files this project writes: the run folder itself and OWNED_FOLDERS in it (not their
        subfolders: a folder a user made there is the user's). Where a killed run's temp files may be removed."""
        return [self.root] + [self.root / name for name in OWNED_FOLDERS]

    def model_files(self) -> dict[str, Path]:
        """The exported / compiled model files a backend may read."""
        return {"onnx": self.onnx, "openvino_ir": self.openvino_ir, "onnx_optimized": self.onnx_optimized,
                "om": self.om}


def inside(folder: str | Path, path: str | Path, what: str = "path",
           fix: str = "remove the link (a real folder or file there is fine)") -> Path:
    """`path`, once links and `..` are resolved, must lie in `folder` (resolved too): RunFolderError otherwise."""
    folder, path = Path(folder), Path(path)
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise RunFolderError(f"{path}: {what} resolves to {resolved}, outside {folder} "
                             f"(a symbolic link or '..' leading out of the folder); {fix}", path=path)
    return path


def run_folder(runs_dir: str | Path, name: str) -> Path:
    """`runs_dir/name`, held to the rule of the folders inside it (`mel/`, `out/`, ...): a link leading out
    of its parent is refused, so a run never writes through a link somewhere the user did not name."""
    return inside(runs_dir, Path(runs_dir) / name, "the run folder",
                  fix="remove the link, and set runs_dir to where the runs should go")


def corpus_wav(corpus_dir: str | Path, wav: str | Path, record: str | Path = "the mel manifest",
               field: str = "wav") -> Path:
    """A wav path read from a record (the manifest): a record only points inside the folders the parameters
    name, so it must name a file of the corpus folder (or its `wavs/`); the file itself may be a link the
    user put there, but its folder must be the corpus's. RunFolderError naming the record and the field."""
    corpus_dir, wav = Path(corpus_dir).resolve(), Path(wav)
    folder = wav.parent.resolve()
    if wav.name in ("", ".", "..") or folder not in (corpus_dir, corpus_dir / CORPUS_WAVS_DIR):
        raise RunFolderError(f"{record}: field {field} names {wav}, a wav outside the corpus folder {corpus_dir} "
                             "(a record may only point inside the folders the parameters name)", path=wav)
    return wav


def out_bin(out_dir: Path, utt_id: str) -> Path:
    return Path(out_dir) / f"{utt_id}_out.bin"


def syn_wav(wav_dir: Path, utt_id: str) -> Path:
    return Path(wav_dir) / f"{utt_id}_syn.wav"


def mel_file(mel_dir: Path, utt_id: str) -> Path:
    """`<id>.bin`, the preprocess stage's raw float32 mel of an utterance (its `sample_count_file` beside it)."""
    return Path(mel_dir) / f"{utt_id}.bin"


def mel_bin(mel_dir: Path, item: dict) -> Path:
    """The `.bin` of a manifest item; it must lie in `mel_dir` (a manifest cannot point elsewhere)."""
    mel_dir = Path(mel_dir)
    name = item.get("bin", mel_file(mel_dir, item["id"]).name)
    path = mel_dir / str(name)
    if Path(str(name)).name != str(name) or path.resolve().parent != mel_dir.resolve():
        raise ManifestError(f"{mel_dir / MANIFEST_NAME}: item {item['id']!r} names the mel file {name!r} "
                            "outside the mel folder", path=mel_dir / MANIFEST_NAME)
    return path


def load_manifest(mel_dir: str | Path) -> dict:
    """Read `<mel_dir>/manifest.json`; a clear error when it is missing, not ours, or unsafe."""
    path = Path(mel_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        raise ManifestError(f"{path}: manifest not found; run the preprocess stage first", path=path)
    try:
        manifest = json.loads(read_bounded(path, "a mel manifest", MAX_RECORD_BYTES, ManifestError))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})", path=path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("items"), list):
        raise ManifestError(f"{path}: not a mel manifest (no 'items' list)", path=path)
    for key in ("sampling_rate", "hop_length"):
        value = manifest.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ManifestError(f"{path}: field {key} must be a positive integer, got {value!r}", path=path)
    seen: set[tuple[str, str]] = set()
    for item in manifest["items"]:
        if not isinstance(item, dict):
            raise ManifestError(f"{path}: an item is {type(item).__name__}, expected an object", path=path)
        missing = {"id", "shape", "mel_frames", "samples"} - set(item)
        if missing:
            raise ManifestError(f"{path}: item {item.get('id', '?')} lacks {sorted(missing)}", path=path)
        check_utterance_id(item["id"], path)
        shape = item["shape"]
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
            raise ManifestError(f"{path}: item {item['id']!r}: field shape must be [mel channels, frames] "
                                f"(positive integers), got {shape!r}", path=path)
        if not isinstance(item.get("wav", ""), str):
            raise ManifestError(f"{path}: item {item['id']!r}: field wav must be a path (a string), "
                                f"got {item['wav']!r}", path=path)
        if item.get("sha256") is not None and not isinstance(item["sha256"], str):
            raise ManifestError(f"{path}: item {item['id']!r}: field sha256 must be a string, "
                                f"got {item['sha256']!r}", path=path)
        for key in ("mel_frames", "samples"):
            if not isinstance(item[key], int) or isinstance(item[key], bool) or item[key] < 1:
                raise ManifestError(f"{path}: item {item['id']!r}: {key} must be a positive integer, "
                                    f"got {item[key]!r}", path=path)
        mel_file_name = mel_bin(path.parent, item).name
        # one id, one mel: a second item with the id or the mel of another would be vocoded (or skipped) twice
        # under one name while the other is left out in silence
        for kind, value in (("utterance id", item["id"]), ("mel file", mel_file_name)):
            if (kind, value) in seen:
                raise ManifestError(f"{path}: two items name the {kind} {value!r} (an edited manifest?); "
                                    "run the preprocess stage again", path=path)
            seen.add((kind, value))
    return manifest
