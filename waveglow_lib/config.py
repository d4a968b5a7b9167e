"""All settings in one place: model hyper-parameters, STFT/mel settings, workflow parameters.

The workflow parameters are what `params/*.yaml`, the notebooks' `parameters` cells and the CLI flags
share; `WorkflowConfig.from_yaml` rejects unknown keys and wrong types by name before anything runs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from .errors import ConfigError, ConfigTypeError, InputNotFound, WaveGlowError
from .io import atomic_write_text, read_bounded
from .layout import RunLayout, run_folder
from .records import first_problem, is_type_error

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
#: the largest chunk_frames (3 min of audio at hop 256): a chunk's memory grows with it, and more turns
#: chunking off in all but name
MAX_CHUNK_FRAMES = 16384
GUIDE_THROUGHPUT = {
    "Ascend 310P3 (guide)": {1: 0.59, 4: 2.34, 8: 4.68, 16: 9.35},
    "NVIDIA T4 (guide)": {1: 0.037, 4: 0.057, 8: 0.061, 16: 0.076},
}


# --- one typed model for every set of parameters (pydantic dataclasses) -----------------------------------
def bound(predicate: Callable[[Any], bool], rule: str) -> AfterValidator:
    """A value's bound: `must be <rule>, got <value>` when `predicate(value)` is false."""
    def check(value: Any) -> Any:
        if not predicate(value):
            raise ValueError(f"must be {rule}, got {value!r}")
        return value
    return AfterValidator(check)


def at_least(low: float, note: str = "") -> AfterValidator:
    return bound(lambda value: value >= low, f">= {low}{note}")


def above(low: float) -> AfterValidator:
    return bound(lambda value: value > low, f"> {low}")


def within(low: float, high: float, note: str = "") -> AfterValidator:
    return bound(lambda value: low <= value <= high, f"in {low}..{high}{note}")


#: every float parameter and record number: NaN (which passes every comparison: a NaN grad_clip turns every
#: gradient to NaN) and ±inf are refused
Finite = Annotated[float, bound(math.isfinite, "a finite number")]


def _no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError(f"holds a NUL byte: {text!r}")
    return text


#: every string parameter: no NUL byte (no file name, device or address holds one)
Text = Annotated[str, AfterValidator(_no_nul)]
#: a list, from a YAML list or a tuple (its items: the field's own bound)
AnyList = Annotated[list, Field(strict=False)]


def parameters(cls: type | None = None, *, frozen: bool = False, label: str = "parameter {key!r}") -> Any:
    """Make `cls` a pydantic dataclass of parameters: strict types (no "1" for 1, no 1 for true; an int for a
    float is fine), each field's bounds in its `Annotated` type, cross-field checks in `__post_init__`; every
    refusal a one-line ConfigError (ConfigTypeError for a wrong type) naming the field with `label`."""
    def make(cls: type) -> type:
        model = pydantic_dataclass(cls, frozen=frozen, config=ConfigDict(strict=True))
        validate = model.__init__

        @functools.wraps(validate)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as error:
                raise _config_error(error, model, kwargs, None, {}) from None

        model.__init__, model._validate, model._label = __init__, validate, label
        return model
    return make(cls) if cls is not None else make


def _config_error(error: ValidationError, cls: Any, data: Mapping[str, Any], source: str | None,
                  sources: Mapping[str, str]) -> ConfigError:
    """The first of pydantic's errors (`records.first_problem`) in a parameter's words."""
    item = first_problem(error, data)
    cause = (item.get("ctx") or {}).get("error")
    if isinstance(cause, WaveGlowError):  # a cross-field check's own message (__post_init__)
        return cause
    key = item["loc"][0] if item["loc"] else None
    where = sources.get(key, source) if key is not None else source
    prefix = f"{where}: " if where else ""
    if key is None:
        return ConfigError(prefix + str(cause or item["msg"]))
    name, value, hint = cls._label.format(key=key), data.get(key, item["input"]), typing.get_type_hints(cls).get(key)
    if item["type"] == "unexpected_keyword_argument":
        return ConfigTypeError(f"{prefix}unknown {name}")
    if is_type_error(item, data):
        return ConfigTypeError(f"{prefix}{name} expects {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if item["type"] == "literal_error":
        return ConfigError(f"{prefix}{name}: {value!r} is not one of {', '.join(typing.get_args(hint))}")
    return ConfigError(f"{prefix}{name} {cause or item['msg']}")


@parameters(frozen=True)
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
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown WaveGlow config keys: {', '.join(unknown)}")
        return from_mapping(cls, data, "config")


@parameters(frozen=True)
class STFTConfig:
    """NVIDIA's `data_config` (Tacotron2 STFT mel) for waveglow_256channels_universal_v5.pt."""

    sampling_rate: Annotated[int, at_least(1)] = 22050
    filter_length: Annotated[int, at_least(1)] = 1024
    hop_length: Annotated[int, at_least(1)] = 256
    win_length: Annotated[int, at_least(1)] = 1024
    n_mel_channels: Annotated[int, at_least(1)] = 80
    mel_fmin: Annotated[Finite, at_least(0)] = 0.0
    mel_fmax: Annotated[Finite, at_least(0)] = 8000.0
    max_wav_value: Annotated[Finite, above(0)] = 32768.0
    #: log(clamp(x, clip_val)): also the value a silent frame gets, used to pad mels in batches
    clip_val: Annotated[Finite, above(0)] = 1e-5

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
#: 04_infer's throughput table: quick (one timed pass per batch size), full (bench_repeats passes, and the
#: benchmark harness's smoke comparison of backends), off
ThroughputMode = Literal["quick", "full", "off"]


class ParamsFile:
    """What a set of parameters read from a params/*.yaml file offers (WorkflowConfig, train.TrainConfig):
    reading (`from_yaml`: overrides named as the command line's in errors, `from_dict`), copying with changes,
    and the corpus it names."""

    @property
    def corpus_dir(self) -> Path:
        return DEMO_CORPUS_DIR if self.corpus == "demo" else Path(self.corpus).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "parameters") -> Any:
        return from_mapping(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
        overrides = dict(overrides or {})
        return from_mapping(cls, {**read_params_file(path), **overrides}, str(path),
                            {key: "command line" for key in overrides})

    def with_overrides(self, **changes: Any) -> Any:
        return type(self).from_dict({**self.to_dict(), **changes})


@parameters
class WorkflowConfig(ParamsFile):
    """Parameters of one run of the workflow (one params/*.yaml file)."""

    name: Text = "demo"
    #: LJSpeech-layout folder (wavs/ + metadata.csv); "demo" means the bundled demo corpus
    corpus: Text = "demo"
    #: number of utterances, in sorted file order like the guide's `ls wavs/*.wav | head -n10`; 0 = all
    limit: Annotated[int, at_least(0, " (0 = all)")] = 10
    #: checkpoint path; "demo" means the bundled demo model (small, briefly trained)
    checkpoint: Text = "demo"
    #: parent of the run folder runs/<name>/
    runs_dir: Text = "runs"
    resample: bool = False
    downmix: bool = False
    #: auto | fast (our CPU path, backends/fast/) | torch | onnxruntime | openvino | om
    backend: Backend = "auto"
    #: cpu | cuda | npu:<id>
    device: Text = "cpu"
    #: auto | fp32 | bf16 | fp16 | int8 (fast only). auto: the fast backend runs the fastest of int8, bf16 that
    #: the CPU has natively and that passes a quality probe (backends/fast/auto.py), else fp32; other backends fp32
    precision: Precision = "auto"
    batch_size: Annotated[int, at_least(1)] = 1
    #: padded batches: recompute each padded utterance's last receptive field alone (a short window),
    #: so batched output equals unbatched output; false = plain padding (the tail differs slightly)
    exact_batching: bool = True
    #: bounds keep bad values from being blamed on the mel later
    sigma: Annotated[Finite, within(0.0, MAX_SIGMA)] = 0.6
    seed: Annotated[int, within(0, 2**63 - 2)] = 1234
    denoiser_strength: Annotated[Finite, within(0.0, 1.0)] = 0.0
    opset: Annotated[int, within(*ONNX_OPSETS, " (the opsets torch's ONNX exporter writes as asked)")] = 17
    #: exact | buckets | chunks (the chunk window and a few buckets below it: any length, see chunk_frames)
    gear_policy: GearPolicy = "exact"
    n_buckets: Annotated[int, within(1, 4096)] = 8
    soc_version: Text = "Ascend310P3"
    #: batch sizes of the throughput table
    bench_batch_sizes: Annotated[AnyList, bound(lambda sizes: sizes and all(
        isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4096 for n in sizes),
        "a non-empty list of ints in 1..4096")] = field(default_factory=lambda: [1, 4, 8, 16])
    bench_repeats: Annotated[int, within(1, 1000)] = 3
    bench_quick: bool = False
    #: 04_infer's throughput table, after the players: quick | full | off (ThroughputMode); re-measured only
    #: when what it measures changed
    throughput: ThroughputMode = "quick"
    #: run the metrics that need optional packages (pystoi, pesq) when installed
    metrics: bool = True
    #: where infer's batches run: local (this process) | ray (a Ray Data actor pool; waveglow_lib.engines)
    engine: Engine = "local"
    #: engine ray: None = start a local Ray on demand; "auto" = the cluster `ray start` made; "ray://host:10001"
    ray_address: Text | None = None
    #: engine ray: CPUs each actor reserves, and the threads its backend runs with
    ray_cpus_per_actor: Annotated[int, at_least(1)] = 1
    #: engine ray: actors in the pool; 0 = as many as the cluster's CPUs allow (NPUs for om). Not training's
    #: `ray_workers` (TrainConfig): a Ray Data actor pool and Ray Train's workers, each named as in its Ray API
    ray_actors: Annotated[int, at_least(0, " (0 = as many as fit)")] = 0
    #: utterances longer than chunk_frames + the model's context are vocoded in chunks of this many mel
    #: frames (plus context each side), exactly equal to one-shot synthesis, in memory bounded by the
    #: chunk (which grows with it); 0 = never chunk (batching.vocode_stream); at most MAX_CHUNK_FRAMES
    chunk_frames: Annotated[int, within(0, MAX_CHUNK_FRAMES, f" (0 = never chunk; {MAX_CHUNK_FRAMES} frames = "
                                        "3 min of audio per chunk)")] = 2048
    #: vocode: the layout of the input mels (auto: the axis with n_mel entries is the band axis)
    mel_layout: MelLayout = "auto"
    #: vocode: convert mels from log10 / dB / linear to natural-log magnitudes (none: refuse them)
    mel_convert: MelConvert = "none"
    #: vocode: also write the guide's `<id>_out.bin` (float32 audio) beside each wav
    vocode_out_bin: bool = False
    #: the fast backend's engine cache (built engines, auto's verdict): "" = $WAVEGLOW_CACHE_DIR or
    #: ~/.cache/waveglow-workflow; "off" = build at every load
    cache_dir: Text = ""

    def __post_init__(self) -> None:
        check_run_name(self.name)
        for key in PATH_PARAMETERS:
            check_os_path(getattr(self, key), f"parameter {key!r}")
        check_os_path(Path(self.runs_dir).expanduser() / self.name, "the run folder <runs_dir>/<name>",
                      room=RUN_PATH_ROOM)

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
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint == "demo" else Path(self.checkpoint).expanduser()

    def to_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


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


def from_mapping(cls: type, data: Mapping[str, Any], source: str = "parameters",
                 sources: Mapping[str, str] | None = None) -> Any:
    """`cls(**data)` (a `parameters` dataclass), its errors naming where the values came from (`source`;
    `sources`: another origin for some keys, e.g. the command line's overrides of a params file)."""
    sources = sources or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        origin = sorted({sources.get(k, source) for k in unknown})
        raise ConfigError(f"{' and '.join(origin)}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    made = object.__new__(cls)
    try:
        cls._validate(made, **data)
    except ValidationError as error:
        raise _config_error(error, cls, data, source, sources) from None
    return made


#: set by `run --force` (notebook.runner.run_notebooks(force=True)) for the notebooks' kernels: their stage
#: calls redo finished work as the CLI's --force does, though the notebooks do not pass `force` themselves
FORCE_ENV = "WAVEGLOW_FORCE"
#: what an error about outputs made otherwise tells the user to do, wherever it is shown
FORCE_ADVICE = ("redo them with --force (`python -m waveglow_lib <stage> --force`, or `run --force` for the "
                "notebooks; force=True when calling the stage in Python)")


def forced(force: bool) -> bool:
    """Whether a stage redoes finished work: its own `force`, or `run --force` for the notebooks' kernels."""
    return bool(force) or os.environ.get(FORCE_ENV) == "1"


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
