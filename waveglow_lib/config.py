"""All settings in one place: model hyper-parameters, STFT/mel settings, workflow parameters.

The workflow parameters are what `params/*.yaml`, the notebooks' `parameters` cells and the CLI flags
share; `WorkflowConfig.from_yaml` rejects unknown keys and wrong types by name before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .errors import ConfigError, ConfigTypeError, InputNotFound
from .io import atomic_write_text, read_bounded
from .layout import RunLayout, run_folder

from .safe_yaml import MAX_YAML_BYTES, load_yaml

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEMO_MODEL_PATH = ASSETS_DIR / "demo_waveglow.safetensors.gz"
#: how the bundled demo model was made and what it scores (written by `assets.train_demo_model --install`)
DEMO_MODEL_CARD = ASSETS_DIR / "demo_waveglow.card.json"
DEMO_CORPUS_DIR = ASSETS_DIR / "demo_corpus"

#: mel frame counts of LJ001-0001 ... LJ001-0010 (the guide's test set and ATC gears)
GUIDE_MEL_LENGTHS = (832, 164, 833, 443, 699, 490, 723, 154, 651, 760)
#: the guide's published throughput, utterances/s by batch size (theirs, not measured here)
#: opsets torch's exporter writes as asked (it silently writes opset 18 for older ones with the dynamo route)
ONNX_OPSETS = (13, 20)
#: WaveGlow is trained at sigma 1 and run at 0.6-1.0; far larger values only overflow the audio
MAX_SIGMA = 10.0
GUIDE_THROUGHPUT = {
    "Ascend 310P3 (guide)": {1: 0.59, 4: 2.34, 8: 4.68, 16: 9.35},
    "NVIDIA T4 (guide)": {1: 0.037, 4: 0.057, 8: 0.061, 16: 0.076},
}


@dataclass(frozen=True)
class ModelConfig:
    """WaveGlow hyper-parameters, named as in NVIDIA's config.json (`WN_config` flattened)."""

    n_mel_channels: int = 80
    n_flows: int = 12
    n_group: int = 8
    n_early_every: int = 4
    n_early_size: int = 2
    n_layers: int = 8
    n_channels: int = 256
    kernel_size: int = 3
    #: "glow": one cond_layer per WN (NVIDIA glow.py); "glow_old": cond_layers per layer and the
    #: coupling halves swap on odd flows (NVIDIA glow_old.py)
    layout: str = "glow"
    #: the upsampler is a ConvTranspose1d(kernel 1024, stride 256) in NVIDIA's code: stride = hop length
    upsample_kernel: int = 1024
    upsample_stride: int = 256

    def __post_init__(self) -> None:
        problems = []
        if self.layout not in ("glow", "glow_old"):
            problems.append(f"layout must be 'glow' or 'glow_old', got {self.layout!r}")
        if self.n_group % 2 or self.n_group <= 0:
            problems.append(f"n_group must be a positive even number, got {self.n_group}")
        if self.n_channels % 2 or self.n_channels <= 0:
            problems.append(f"n_channels must be a positive even number, got {self.n_channels}")
        if self.kernel_size % 2 == 0:
            problems.append(f"kernel_size must be odd, got {self.kernel_size}")
        if self.n_early_size % 2:
            problems.append(f"n_early_size must be even, got {self.n_early_size}")
        if self.upsample_stride % self.n_group:
            problems.append("upsample_stride must be a multiple of n_group")
        if self.n_flows < 1 or self.n_layers < 1 or self.n_early_every < 1:
            problems.append("n_flows, n_layers and n_early_every must be >= 1")
        elif self.n_remaining_channels < 2:
            problems.append("n_early_size * number of early outputs leaves fewer than 2 channels")
        if problems:
            raise ConfigError("invalid WaveGlow config: " + "; ".join(problems))

    @property
    def n_early_outputs(self) -> int:
        return (self.n_flows - 1) // self.n_early_every

    @property
    def n_remaining_channels(self) -> int:
        return self.n_group - self.n_early_size * self.n_early_outputs

    @property
    def hop_length(self) -> int:
        return self.upsample_stride

    @property
    def steps_per_frame(self) -> int:
        """Steps of the folded time axis (groups of n_group samples) per mel frame."""
        return self.upsample_stride // self.n_group

    @property
    def upsample_taps(self) -> int:
        """Mel frames that reach one audio sample through the upsampler."""
        return self.upsample_kernel // self.upsample_stride

    # --- the flow schedule: one place for what every implementation of the flows must agree on ---------
    def has_early_output(self, k: int) -> bool:
        """Flow k hands `n_early_size` channels straight to the output (before it, in the forward pass)."""
        return k > 0 and k % self.n_early_every == 0

    def swaps_halves(self, k: int) -> bool:
        """glow_old.py: on odd flows the coupling's halves swap (audio_0 is the upper half)."""
        return self.layout == "glow_old" and k % 2 == 1

    def flow_channels(self) -> list[int]:
        """Channels entering each flow's 1x1 conv, flow 0 first."""
        channels, n = [], self.n_group
        for k in range(self.n_flows):
            if self.has_early_output(k):
                n -= self.n_early_size
            channels.append(n)
        return channels

    def receptive_field(self) -> int:
        """How far (in noise steps) one output step sees along time, each side.

        Every flow's WN stacks dilated convolutions (kernel k, dilations 1, 2, ..., 2^(L-1)); everything else
        is pointwise in time, and the upsampler is causal.
        """
        return self.n_flows * (self.kernel_size // 2) * (2 ** self.n_layers - 1)

    def tail_window(self) -> tuple[int, int]:
        """(frames, samples): the window rerun to make a padded utterance exact, and the tail it replaces.

        In a padded batch only an utterance's last `receptive_field` steps see the padding. Rerunning its
        last `frames` mel frames alone gives those samples exactly: the window's own left edge (zero padding
        of the convolutions, and the upsampler's missing frames of context) is far enough away.
        """
        reach = self.receptive_field()
        context = (self.upsample_kernel - self.upsample_stride) // self.n_group
        return -(-(2 * reach + context) // self.steps_per_frame), reach * self.n_group

    def chunk_context(self) -> tuple[int, int]:
        """(left, right): mel frames of context a chunk needs on each side for its centre to be exact.

        A centre step sees `receptive_field()` steps each side through the flows; on the left, the
        upsampler adds `upsample_taps - 1` frames (a sample of frame f is made from frames f-taps+1 … f,
        so the first taps-1 frames of a window lack the contributions of the frames before it).
        Tight: one frame less on either side changes the centre's edge samples (tests/test_batching.py).
        """
        flows = -(-self.receptive_field() // self.steps_per_frame)
        return self.upsample_taps - 1 + flows, flows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Accepts our flat keys or NVIDIA's nested `waveglow_config` (with `WN_config`)."""
        data = dict(data)
        wn = data.pop("WN_config", None) or {}
        data.update(wn)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown WaveGlow config keys: {', '.join(unknown)}")
        return cls(**{k: _coerce(k, v, _field_type(cls, k)) for k, v in data.items()})


@dataclass(frozen=True)
class STFTConfig:
    """NVIDIA's `data_config` (Tacotron2 STFT mel) for waveglow_256channels_universal_v5.pt."""

    sampling_rate: int = 22050
    filter_length: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mel_channels: int = 80
    mel_fmin: float = 0.0
    mel_fmax: float = 8000.0
    max_wav_value: float = 32768.0
    #: log(clamp(x, clip_val)): also the value a silent frame gets, used to pad mels in batches
    clip_val: float = 1e-5

    @property
    def pad_value(self) -> float:
        """The log-mel of silence: what mels are padded with."""
        return math.log(self.clip_val)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Backend = Literal["auto", "torch", "onnxruntime", "openvino", "om", "fast"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
GearPolicy = Literal["exact", "buckets", "chunks"]
#: how vocode reads mels (mel_input.read_mel): which axis is the band axis
MelLayout = Literal["auto", "mel_first", "time_first"]
#: the explicit conversion of a mel in another format (mel_input.CONVERSIONS); none = refuse it
MelConvert = Literal["none", "log10", "db_amplitude", "db_power", "magnitude", "power"]
Engine = Literal["local", "ray"]


@dataclass
class WorkflowConfig:
    """Parameters of one run of the workflow (one params/*.yaml file)."""

    name: str = "demo"
    #: LJSpeech-layout folder (wavs/ + metadata.csv); "demo" means the bundled demo corpus
    corpus: str = "demo"
    #: number of utterances, in sorted file order like the guide's `ls wavs/*.wav | head -n10`; 0 = all
    limit: int = 10
    #: checkpoint path; "demo" means the bundled demo model (small, briefly trained)
    checkpoint: str = "demo"
    #: parent of the run folder runs/<name>/
    runs_dir: str = "runs"
    resample: bool = False
    downmix: bool = False
    #: auto | fast (our CPU path, backends/fast/) | torch | onnxruntime | openvino | om
    backend: Backend = "auto"
    #: cpu | cuda | npu:<id>
    device: str = "cpu"
    #: auto | fp32 | bf16 | fp16 | int8 (fast only). auto: the fast backend runs the fastest of int8, bf16 that
    #: the CPU has natively and that passes a quality probe (backends/fast/auto.py), else fp32; other backends fp32
    precision: Precision = "auto"
    batch_size: int = 1
    #: padded batches: recompute each padded utterance's last receptive field alone (a short window),
    #: so batched output equals unbatched output; false = plain padding (the tail differs slightly)
    exact_batching: bool = True
    sigma: float = 0.6
    seed: int = 1234
    denoiser_strength: float = 0.0
    opset: int = 17
    #: exact | buckets | chunks (the chunk window and a few buckets below it: any length, see chunk_frames)
    gear_policy: GearPolicy = "exact"
    n_buckets: int = 8
    soc_version: str = "Ascend310P3"
    #: batch sizes of the throughput table
    bench_batch_sizes: list = field(default_factory=lambda: [1, 4, 8, 16])
    bench_repeats: int = 3
    bench_quick: bool = False
    #: run the metrics that need optional packages (pystoi, pesq) when installed
    metrics: bool = True
    #: where infer's batches run: local (this process) | ray (a Ray Data actor pool; waveglow_lib.engines)
    engine: Engine = "local"
    #: engine ray: None = start a local Ray on demand; "auto" = the cluster `ray start` made; "ray://host:10001"
    ray_address: str | None = None
    #: engine ray: CPUs each actor reserves, and the threads its backend runs with
    ray_cpus_per_actor: int = 1
    #: engine ray: actors in the pool; 0 = as many as the cluster's CPUs allow (NPUs for om). Not training's
    #: `ray_workers` (TrainConfig): a Ray Data actor pool and Ray Train's workers, each named as in its Ray API
    ray_actors: int = 0
    #: utterances longer than chunk_frames + the model's context are vocoded in chunks of this many mel
    #: frames (plus context each side), exactly equal to one-shot synthesis, in memory bounded by the
    #: chunk; 0 = never chunk (batching.vocode_stream); at most MAX_CHUNK_FRAMES
    chunk_frames: int = 2048
    #: vocode: the layout of the input mels (auto: the axis with n_mel entries is the band axis)
    mel_layout: MelLayout = "auto"
    #: vocode: convert mels from log10 / dB / linear to natural-log magnitudes (none: refuse them)
    mel_convert: MelConvert = "none"
    #: vocode: also write the guide's `<id>_out.bin` (float32 audio) beside each wav
    vocode_out_bin: bool = False
    #: the fast backend's engine cache (built engines, auto's verdict): "" = $WAVEGLOW_CACHE_DIR or
    #: ~/.cache/waveglow-workflow; "off" = build at every load
    cache_dir: str = ""

    def __post_init__(self) -> None:
        check_choices(self)
        check_run_name(self.name)
        for key in PATH_PARAMETERS:
            if isinstance(getattr(self, key), str):  # other types: from_mapping's type check names them
                check_os_path(getattr(self, key), f"parameter {key!r}")
        if isinstance(self.runs_dir, str):
            check_os_path(Path(self.runs_dir).expanduser() / self.name, "the run folder <runs_dir>/<name>",
                          room=RUN_PATH_ROOM)
        for key in ("batch_size", "bench_repeats", "n_buckets", "ray_cpus_per_actor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parameter {key!r} must be >= 1, got {getattr(self, key)}")
        if self.ray_actors < 0:
            raise ConfigError(f"parameter 'ray_actors' must be >= 0 (0 = as many as fit), got {self.ray_actors}")
        if not 0 <= self.chunk_frames <= MAX_CHUNK_FRAMES:  # a chunk's memory grows with it
            raise ConfigError(f"parameter 'chunk_frames' must be in 0..{MAX_CHUNK_FRAMES} (0 = never chunk; "
                              f"{MAX_CHUNK_FRAMES} frames = 3 min of audio per chunk), got {self.chunk_frames}")
        if self.limit < 0:
            raise ConfigError(f"parameter 'limit' must be >= 0 (0 = all), got {self.limit}")
        if self.sigma < 0:
            raise ConfigError(f"parameter 'sigma' must be >= 0, got {self.sigma}")
        # NaN passes every comparison above; bounds keep bad values from being blamed on the mel later
        bounds = {"sigma": (0.0, MAX_SIGMA), "denoiser_strength": (0.0, 1.0), "opset": ONNX_OPSETS,
                  "seed": (0, 2**63 - 2), "n_buckets": (1, 4096), "bench_repeats": (1, 1000)}
        for key, (low, high) in bounds.items():
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                why = " (the opsets torch's ONNX exporter writes as asked)" if key == "opset" else ""
                raise ConfigError(f"parameter {key!r} must be a finite number in {low}..{high}{why}, got {value!r}")
        sizes = self.bench_batch_sizes
        if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4096 for n in sizes):
            raise ConfigError(f"parameter 'bench_batch_sizes' must be a non-empty list of ints in 1..4096, "
                              f"got {sizes!r}")

    @classmethod
    def choices(cls) -> dict[str, tuple[str, ...]]:
        """The fields typed `Literal[...]` and their allowed values (drives validation and the CLI)."""
        return literal_choices(cls)

    # --- resolved paths --------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """`runs_dir/name`; RunFolderError when it is a link leading out of runs_dir (layout.run_folder)."""
        return run_folder(self.runs_dir, self.name)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def corpus_dir(self) -> Path:
        return DEMO_CORPUS_DIR if self.corpus == "demo" else Path(self.corpus).expanduser()

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint == "demo" else Path(self.checkpoint).expanduser()

    # --- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "parameters") -> "WorkflowConfig":
        return from_mapping(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "WorkflowConfig":
        overrides = dict(overrides or {})
        return from_mapping(cls, {**read_params_file(path), **overrides}, str(path),
                            {key: "command line" for key in overrides})

    def to_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, **changes: Any) -> "WorkflowConfig":
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)


def check_run_name(name: object) -> None:
    """The run's name is one folder name in runs_dir: a path in it (`../x`, `/x`, `.`) would write elsewhere."""
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
           or not name.isprintable())  # control characters, C1 (NEL) and bidi overrides included
    if bad:
        raise ConfigError(f"parameter 'name' must be a plain folder name (no '/', '\\', control characters, "
                          f"and not '', '.' or '..'): the run folder is <runs_dir>/<name>; got {name!r}. "
                          "To put runs elsewhere, set runs_dir")


def check_os_path(path: str | os.PathLike, what: str, room: int = 0) -> Path:
    """`path` as a Path, once the OS can take it: ConfigError naming `what` for a NUL byte, a name longer than
    the file system's NAME_MAX, or a path (made absolute, plus `room` bytes for what goes inside) longer than
    PATH_MAX. Without this, the first open is an `embedded null byte` or ENAMETOOLONG traceback."""
    text = os.fspath(path)
    if "\0" in text:
        raise ConfigError(f"{what}: {text!r} holds a NUL byte, which no file name may hold")
    try:
        full = os.fsencode(os.path.abspath(os.path.expanduser(text)))
    except UnicodeEncodeError as error:  # a lone surrogate ("\ud800" in YAML): no file name's bytes
        raise ConfigError(f"{what}: {text!r} holds {error.object[error.start]!r}, which no file name can be encoded "
                          f"with ({error.reason})") from None
    name_max, path_max = _os_limits(full)
    longest = max(full.split(b"/"), key=len)
    if len(longest) > name_max:
        raise ConfigError(f"{what}: the name {os.fsdecode(longest[:40])!r}... is {len(longest)} bytes, longer "
                          f"than the {name_max} the file system allows")
    if len(full) + room >= path_max:
        needs = f" (plus {room} for the files in it)" if room else ""
        raise ConfigError(f"{what}: {os.fsdecode(full[:40])!r}... is {len(full)} bytes long{needs}, longer than "
                          f"the {path_max} the OS allows in a path")
    return Path(text)


def _os_limits(path: bytes) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the file system holding `path`'s nearest existing folder (255, 4096 if unknown)."""
    folder = os.path.dirname(path)
    while folder and not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(folder or b"/", name) or default)
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]


# --- shared by every parameter dataclass (WorkflowConfig here, train.TrainConfig) ------------------------
def literal_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The fields of dataclass `cls` typed `Literal[...]` and their allowed values."""
    return {name: typing.get_args(hint) for name, hint in typing.get_type_hints(cls).items()
            if typing.get_origin(hint) is Literal}


def check_choices(obj: Any) -> None:
    """ConfigError naming the first `Literal` field of `obj` whose value is not one of its choices."""
    for key, choices in literal_choices(type(obj)).items():
        value = getattr(obj, key)
        if value not in choices:
            raise ConfigError(f"parameter {key!r}: {value!r} is not one of {', '.join(choices)}")


def from_mapping(cls: type, data: Mapping[str, Any], source: str = "parameters",
                 sources: Mapping[str, str] | None = None) -> Any:
    """`cls(**data)` after rejecting unknown keys and wrong types by name (`source` says where they came from;
    `sources`: another origin for some keys, e.g. the command line's overrides of a params file)."""
    sources = sources or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        origin = sorted({sources.get(k, source) for k in unknown})
        raise ConfigError(f"{' and '.join(origin)}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(k, v, _field_type(cls, k), sources.get(k, source)) for k, v in data.items()})


#: the largest chunk_frames (3 min of audio at hop 256): a chunk's memory grows with it, and more turns
#: chunking off in all but name
MAX_CHUNK_FRAMES = 16384
#: a params file holds ~30 settings (a few KiB); read whole, so bounded (safe_yaml's bound for any document)
MAX_PARAMS_BYTES = MAX_YAML_BYTES
#: the parameters that name a file or folder (the OS refuses a NUL byte in them, and names too long)
PATH_PARAMETERS = ("corpus", "checkpoint", "runs_dir", "cache_dir")
#: bytes kept free below the run folder for the paths inside it (`vocode/.<200-character id>_syn.wav.<tmp>`)
RUN_PATH_ROOM = 256


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A params YAML file as a mapping, through the bounded safe loader; errors name the file (and line)."""
    path = Path(path)
    try:
        text = read_bounded(path, "a params file (YAML)", MAX_PARAMS_BYTES, ConfigError).decode("utf-8")
    except InputNotFound:
        raise InputNotFound(f"params file not found: {path}", path=path) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot be read as a UTF-8 YAML file ({error})", path=path) from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter: value, got {type(data).__name__}", path=path)
    return data


def parse_set_option(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars (so 4, 0.6, true, [1,4] work)."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        result[key.strip()] = load_yaml(value, f"--set {key.strip()}")
    return result


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, expected: Any, source: str = "config") -> Any:
    """Type check with the few conversions YAML users expect (int → float, a tuple → list); a union
    (`str | None`) takes what one of its members takes. A NUL byte is refused in any string."""
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{source}: parameter {key!r} holds a NUL byte: {value!r}")
    converted = _converted(value, expected)
    if converted is _REFUSED:
        raise ConfigTypeError(f"{source}: parameter {key!r} expects {_type_name(expected)}, "
                              f"got {type(value).__name__} {value!r}")
    return converted


#: what `_converted` answers for a value its type does not take (None is a value some types take)
_REFUSED = object()


def _converted(value: Any, expected: Any) -> Any:
    """`value` as type `expected` holds it, or _REFUSED."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(expected):
            converted = _converted(value, member)
            if converted is not _REFUSED:
                return converted
        return _REFUSED
    if expected is type(None):
        ok = value is None
    elif expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif expected in (bool, float, str):
        ok = isinstance(value, expected)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list or origin is list:
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif expected is dict or origin is dict:
        ok = isinstance(value, dict)
    elif origin is Literal:
        ok = isinstance(value, str)  # which strings: check_choices, with the choices in its message
    else:
        ok = not isinstance(expected, type) or isinstance(value, expected)
    return value if ok else _REFUSED


def _type_name(expected: Any) -> str:
    """`str or None`, `one of 'a', 'b'`, `int`: a type as an error message says it."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(member) for member in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(expected)))
    if expected is type(None):
        return "None (null)"
    return getattr(origin or expected, "__name__", str(expected))
