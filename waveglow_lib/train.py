"""Training and fine-tuning WaveGlow: NVIDIA's objective, data, optimiser and checkpoints, made resumable.

What NVIDIA's `train.py` does, and what is ours:
- objective: the flow's negative log-likelihood of audio under N(0, sigma^2) (`WaveGlowLoss`):
  sum(z^2) / (2 sigma^2) - sum(log s) - sum(log det W), divided by the number of audio samples;
- data: a random utterance of an LJSpeech-layout corpus, a random `segment_length` window of it, and the
  mel of that window (our front-end, `audio.mel_spectrogram`, is NVIDIA's Tacotron2 STFT mel);
- Adam; the learning rate follows `lr_at(step)` (optional warm-up and cosine decay), set every step;
- weight norm on the layers NVIDIA puts it on (`start`, `in_layers`, `res_skip_layers`, `cond_layer`)
  while training; `save_waveglow` writes the folded weights, so inference never sees it;
- resume: `<out_dir>/train_state.safetensors` holds the raw training parameters, Adam's moments and the
  data generator's state as tensors, and step, learning rate and history as JSON in its header: no
  pickle anywhere. An interrupted run resumed from it continues with the same numbers as one that was
  never interrupted;
- data parallel: under `torchrun` (or Ray Train, or any caller that set up `torch.distributed`) every
  rank draws the same global batch from the same generator and trains on its slice; DDP averages the
  gradients, so N ranks follow the trajectory of one process with the same global batch. Rank 0 alone
  writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .audio import load_wav, mel_filterbank, mel_spectrogram
from .checkpoint import load_waveglow, save_waveglow
from .config import DEMO_CORPUS_DIR, ModelConfig, STFTConfig, check_choices, from_mapping, read_params_file
from .errors import AudioError, CheckpointError, ConfigError, MissingDependency, TrainingError
from .io import atomic_write_bytes, atomic_write_json, read_bounded
from .model import WaveGlow

STATE_NAME = "train_state.safetensors"
MODEL_NAME = "model.safetensors"
HISTORY_NAME = "history.json"
STATE_FORMAT = "waveglow-workflow train state"
STATE_VERSION = "1"


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Parameters of one training run (one params/train_*.yaml file)."""

    #: LJSpeech-layout folder (wavs/*.wav); "demo" = the bundled demo corpus
    corpus: str = "demo"
    #: where checkpoints, the trained model and the history go
    out_dir: str = "runs/train"
    #: "" = from scratch with `model`; a path = warm start from any checkpoint `load_waveglow` reads
    warm_start: str = ""
    #: continue from `<out_dir>/train_state.safetensors` when it exists
    resume: bool = True
    #: architecture for a run from scratch (ModelConfig keys; missing keys take ModelConfig's defaults)
    model: dict = field(default_factory=dict)
    #: keep the upsampler as initialised (a per-band interpolation kernel from scratch): fewer weights to learn
    freeze_upsample: bool = False
    #: from scratch: initialise the upsampler as a per-band Hann interpolation (else torch's default init)
    hann_upsample: bool = False
    segment_length: int = 16000
    batch_size: int = 12
    sigma: float = 1.0
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    #: cosine decay from learning_rate to final_learning_rate over max_steps; 0 = constant
    final_learning_rate: float = 0.0
    cosine_decay: bool = False
    grad_clip: float = 0.0
    max_steps: int = 1000
    #: stop (and checkpoint) after this many seconds of this sitting; 0 = no limit
    max_seconds: float = 0.0
    checkpoint_every: int = 100
    #: also keep the folded model of every checkpoint as model_step<N>.safetensors(.gz)
    keep_snapshots: bool = False
    log_every: int = 10
    #: validation loss on fixed segments every N steps; 0 = never
    validate_every: int = 100
    #: hold out the last N utterances for validation; 0 = validate on fixed segments of the training set
    n_validation: int = 0
    validation_segments: int = 4
    #: generation-direction losses (audio = model(mel, gen_sigma * z) against the recording), added to the
    #: flow loss from step `gen_start_step` on: multi-resolution STFT (spectral convergence + log magnitude)
    #: and log-mel L1, each with its weight; 0 = off (NVIDIA's objective alone)
    stft_loss_weight: float = 0.0
    mel_loss_weight: float = 0.0
    gen_sigma: float = 0.6
    gen_start_step: int = 0
    #: fp32 | bf16 (bf16 = autocast of the forward pass; the loss terms are summed in fp32)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "cpu"
    seed: int = 1234
    #: torch threads per process; 0 = torch's default
    num_threads: int = 0
    #: dtype of the model snapshots (keep_snapshots): float32 | float16 (gzipped)
    save_dtype: Literal["float32", "float16"] = "float32"
    #: local (this process, or each torchrun process) | ray (Ray Train TorchTrainer, ray_workers workers)
    engine: Literal["local", "ray"] = "local"
    ray_workers: int = 2

    def __post_init__(self) -> None:
        check_choices(self)
        positive = ("segment_length", "batch_size", "max_steps", "checkpoint_every", "log_every",
                    "validation_segments", "ray_workers")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"parameter {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("sigma", "learning_rate"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"parameter {key!r} must be > 0, got {getattr(self, key)}")
        for key in ("warmup_steps", "final_learning_rate", "grad_clip", "max_seconds", "validate_every",
                    "n_validation", "num_threads", "stft_loss_weight", "mel_loss_weight", "gen_sigma",
                    "gen_start_step"):
            if getattr(self, key) < 0:
                raise ConfigError(f"parameter {key!r} must be >= 0, got {getattr(self, key)}")
        try:
            self.model_config()
        except ValueError as error:
            raise ConfigError(f"parameter 'model': {error}") from None

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def uses_generation_loss(self) -> bool:
        return self.stft_loss_weight > 0 or self.mel_loss_weight > 0

    @property
    def corpus_dir(self) -> Path:
        return DEMO_CORPUS_DIR if self.corpus == "demo" else Path(self.corpus).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "parameters") -> "TrainConfig":
        if "model" in data and not isinstance(data["model"], dict):
            raise ConfigError(f"{source}: parameter 'model' expects a mapping of ModelConfig keys, "
                              f"got {data['model']!r}")
        return from_mapping(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        return cls.from_dict({**read_params_file(path), **(overrides or {})}, source=str(path))

    def with_overrides(self, **changes: Any) -> "TrainConfig":
        return type(self).from_dict({**self.to_dict(), **changes})


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then constant or cosine decay."""
    lr = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.cosine_decay:
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.final_learning_rate + 0.5 * (lr - config.final_learning_rate) * (1 + math.cos(math.pi * progress))
    return lr


# --------------------------------------------------------------------------------------------------
# the model in the training direction
# --------------------------------------------------------------------------------------------------
#: the sub-layers NVIDIA wraps in weight norm (glow.py WN.__init__); `end` is not (it starts at zero)
WEIGHT_NORM_LAYERS = ("start", "cond_layer", "in_layers", "res_skip_layers")


class FlowLoss(nn.Module):
    """WaveGlow run audio → noise with gradients; forward returns NVIDIA's loss (a scalar).

    With a `generation` loss, forward adds it (weighted): the model also runs noise → audio with gradients.
    A module (not a function) so that DDP can wrap it: DDP syncs gradients of what its forward ran.
    """

    def __init__(self, glow: WaveGlow, sigma: float = 1.0, generation: "GenerationLoss | None" = None):
        super().__init__()
        self.glow = glow
        self.sigma = sigma
        self.generation = generation
        #: the last call's terms (flow, stft, mel), for the history
        self.terms: dict[str, float] = {}

    def forward(self, mel: torch.Tensor, audio: torch.Tensor,
                autocast_dtype: torch.dtype | None = None, with_generation: bool = False) -> torch.Tensor:
        z, log_s_total, log_det_w_total = self.flow(mel, audio, autocast_dtype)
        sum_sq = torch.sum(z.float() * z.float())
        loss = (sum_sq / (2 * self.sigma ** 2) - log_s_total - log_det_w_total) / z.numel()
        self.terms = {"flow": float(loss.detach())}
        if with_generation and self.generation is not None:
            columns = audio.shape[1] // self.glow.n_group
            with torch.autocast(audio.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                spect = condition(self.glow, mel, columns)
                noise = torch.randn(audio.shape[0], self.glow.n_group, columns, device=audio.device)
                generated = self.glow.flows_reverse(noise * self.generation.sigma, spect)
            extra, parts = self.generation(generated.float(), audio[:, : generated.shape[1]])
            loss = loss + extra
            self.terms.update(parts)
        return loss


    def flow(self, mel: torch.Tensor, audio: torch.Tensor, autocast_dtype: torch.dtype | None = None):
        """(z, sum of log s, sum of log|det W|) for audio [B, N] (N a multiple of n_group, ≤ frames*hop)."""
        glow = self.glow
        batch, n_samples = audio.shape
        columns = n_samples // glow.n_group
        with torch.autocast(audio.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            spect = condition(glow, mel, columns)
            x = audio.reshape(batch, columns, glow.n_group).transpose(1, 2)
            z, log_s_total, log_det_w = glow.flows_forward(x, spect)
        # NVIDIA's batch * n_of_groups * logdet(W)
        return z, log_s_total, batch * columns * log_det_w


class GenerationLoss(nn.Module):
    """Generated audio against the recording, both [B, N]: multi-resolution STFT loss (spectral convergence
    + L1 of log magnitudes, averaged over resolutions, as Parallel WaveGAN's) and L1 of the log-mel
    (the front-end's filterbank on a magnitude STFT). What the flow loss learns last, voicing, is what
    these see first."""

    #: (fft size, hop, window) per resolution
    RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))

    def __init__(self, sigma: float, stft_weight: float, mel_weight: float, stft: STFTConfig = STFTConfig()):
        super().__init__()
        self.sigma, self.stft_weight, self.mel_weight, self.stft = sigma, stft_weight, mel_weight, stft
        basis = mel_filterbank(stft.sampling_rate, stft.filter_length, stft.n_mel_channels, stft.mel_fmin,
                               stft.mel_fmax)
        self.register_buffer("mel_basis", torch.from_numpy(basis).float(), persistent=False)

    @staticmethod
    def magnitude(audio: torch.Tensor, n_fft: int, hop: int, window: int) -> torch.Tensor:
        spec = torch.stft(audio, n_fft, hop, window, torch.hann_window(window, device=audio.device),
                          return_complex=True)
        return torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = generated.new_zeros(()), {}
        if self.stft_weight:
            stft_loss = generated.new_zeros(())
            for n_fft, hop, window in self.RESOLUTIONS:
                mag_g, mag_t = self.magnitude(generated, n_fft, hop, window), self.magnitude(target, n_fft, hop, window)
                convergence = torch.linalg.norm(mag_t - mag_g) / torch.linalg.norm(mag_t).clamp(min=1e-7)
                stft_loss = stft_loss + convergence + F.l1_loss(torch.log(mag_g), torch.log(mag_t))
            stft_loss = stft_loss / len(self.RESOLUTIONS)
            total, parts["stft"] = total + self.stft_weight * stft_loss, float(stft_loss.detach())
        if self.mel_weight:
            c = self.stft
            mels = [torch.log(torch.clamp(self.mel_basis @ self.magnitude(x, c.filter_length, c.hop_length,
                                                                          c.win_length), min=c.clip_val))
                    for x in (generated, target)]
            mel_loss = F.l1_loss(*mels)
            total, parts["mel"] = total + self.mel_weight * mel_loss, float(mel_loss.detach())
        return total, parts

def upsample(layer: nn.ConvTranspose1d, mel: torch.Tensor) -> torch.Tensor:
    """`layer(mel)` as one matmul and an overlap-add: the same numbers, and on the CPU many times faster
    than torch's transposed convolution for the few frames of a training segment."""
    weight = layer.weight  # [in, out, kernel]
    channels_in, channels_out, kernel = weight.shape
    stride = layer.stride[0]
    frames = mel.shape[2]
    columns = torch.matmul(weight.reshape(channels_in, -1).t().to(mel.dtype), mel)  # [B, out*kernel, T]
    out = F.fold(columns, output_size=(1, (frames - 1) * stride + kernel), kernel_size=(1, kernel),
                 stride=(1, stride))[:, :, 0]
    return out + layer.bias.to(out.dtype)[None, :, None]


def condition(glow: WaveGlow, mel: torch.Tensor, columns: int) -> torch.Tensor:
    """`glow.condition(mel)` trimmed to `columns` groups of audio (NVIDIA trims the upsampled mel to the
    audio): [B, n_mel * n_group, columns]."""
    g = glow.n_group
    spect = upsample(glow.upsample, mel)[:, :, : columns * g]
    batch, channels, _ = spect.shape
    return spect.reshape(batch, channels, columns, g).transpose(2, 3).reshape(batch, channels * g, columns)


def apply_weight_norm(glow: WaveGlow) -> WaveGlow:
    """Wrap NVIDIA's weight-normed layers in `torch.nn.utils.weight_norm` (parameters weight_g, weight_v)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the hook version; its names are NVIDIA's
        for wn in glow.WN:
            for name in WEIGHT_NORM_LAYERS:
                layer = getattr(wn, name)
                for module in (layer if isinstance(layer, nn.ModuleList) else [layer]):
                    torch.nn.utils.weight_norm(module, name="weight")
    return glow


def folded_copy(glow: WaveGlow) -> WaveGlow:
    """A plain (inference) WaveGlow with the weight norm folded in; the training model is left alone."""
    with torch.random.fork_rng(devices=[]):  # building it draws random weights: leave the run's RNG alone
        plain = WaveGlow(glow.config)
    state = {}
    for key, value in glow.state_dict().items():
        if key.endswith("weight_g"):
            base = key[: -len("weight_g")]
            state[base + "weight"] = torch._weight_norm(glow.state_dict()[base + "weight_v"], value, 0)
        elif not key.endswith("weight_v"):
            state[key] = value
    plain.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    plain.refresh_inverses()
    return plain.eval()


def init_from_scratch(config: ModelConfig, seed: int, hann_upsample: bool = False) -> WaveGlow:
    """NVIDIA's initialisation: torch defaults, random rotations, and each WN `end` at zero (flows start as identity)."""
    torch.manual_seed(seed)
    glow = WaveGlow(config)
    with torch.no_grad():
        for wn in glow.WN:
            wn.end.weight.zero_()
            wn.end.bias.zero_()
        if hann_upsample:  # each band interpolated to audio rate by itself; overlap-added Hann sums to 1
            # at the kernel's start: frame t is centred on sample t*hop, and the transposed convolution
            # places it from sample t*hop on, so a window at the start is as close to aligned as it gets
            width = 2 * config.upsample_stride
            glow.upsample.weight.zero_()
            for band in range(config.n_mel_channels):
                glow.upsample.weight[band, band, :width] = torch.hann_window(width, periodic=True)
            glow.upsample.bias.zero_()
    glow.refresh_inverses()
    return glow


def warm_start_model(path: str | Path, expected: ModelConfig | None = None) -> WaveGlow:
    """Any checkpoint `load_waveglow` reads; with `expected`, a different architecture is refused."""
    glow = load_waveglow(path)
    if expected is not None and glow.config != expected:
        diff = {k: (v, getattr(glow.config, k)) for k, v in expected.to_dict().items()
                if getattr(glow.config, k) != v}
        detail = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: warm-start checkpoint has another architecture than the run's "
                              f"'model' parameter ({detail}); remove 'model' to take the checkpoint's, "
                              "or start from scratch", path=path)
    return glow.train()


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    ids: list[str]
    audio: list[np.ndarray]
    sampling_rate: int


def load_corpus(folder: str | Path, segment_length: int, stft: STFTConfig = STFTConfig()) -> Corpus:
    """Every `wavs/*.wav` of an LJSpeech-layout folder, sorted; each must have the STFT's rate and be at
    least one segment long (the message names the files and says what is expected)."""
    folder = Path(folder)
    wav_dir = folder / "wavs"
    if not wav_dir.is_dir():
        raise AudioError(f"{folder}: not an LJSpeech-layout corpus (expected a wavs/ folder of .wav files)",
                         path=folder)
    paths = sorted(wav_dir.glob("*.wav"))
    if not paths:
        raise AudioError(f"{wav_dir}: no .wav files", path=wav_dir)
    ids, audio, wrong_rate, too_short = [], [], [], []
    for path in paths:
        samples, rate = load_wav(path, expected_rate=None)
        if rate != stft.sampling_rate:
            wrong_rate.append(f"{path.name} ({rate} Hz)")
            continue
        if len(samples) < segment_length:
            too_short.append(f"{path.name} ({len(samples)} samples)")
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


# --------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE), or one set up by the caller (Ray)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _resolve_device(device: str, info: DistInfo) -> torch.device:
    if device == "cuda" and info.world_size > 1:
        device = f"cuda:{info.local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise MissingDependency(f"device {device!r}: torch has no CUDA device here (torch {torch.__version__})")
        torch.cuda.set_device(resolved)
    return resolved


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    if info.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return float(value.detach())


# --------------------------------------------------------------------------------------------------
# the resume state: safetensors tensors + JSON, no pickle
# --------------------------------------------------------------------------------------------------
def save_train_state(path: Path, glow: WaveGlow, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     step: int, config: TrainConfig, history: list[dict]) -> Path:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in glow.state_dict().items()
               if not k.endswith("W_inverse")}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.data"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    info = {"version": STATE_VERSION, "step": step, "param_groups": groups,
            "model_config": glow.config.to_dict(), "train_config": config.to_dict(), "history": history}
    data = save_safetensors(tensors, metadata={STATE_FORMAT: json.dumps(info)})
    return atomic_write_bytes(path, data)


#: the weights and Adam's two moments of a model of at most the 4 GiB a checkpoint may have, and the JSON
MAX_STATE_BYTES = 16 * 2**30


def read_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON of a resume state; TrainingError naming the file when it is not a regular file
    of a sane size, not ours, or holds values no run saves (a negative step, ...)."""
    data = read_bounded(path, "a training state", MAX_STATE_BYTES, TrainingError)
    try:
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        info = json.loads(header["__metadata__"][STATE_FORMAT])
        tensors = load_safetensors(data)
    except Exception as error:
        raise TrainingError(f"{path}: not a readable training state (truncated or not ours?): {error}; "
                            "delete it or set resume: false to start over", path=path) from None
    problem = _state_problem(info)
    if problem:
        raise TrainingError(f"{path}: not a usable training state: {problem}; delete it or set resume: false "
                            "to start over", path=path)
    return tensors, info


def _state_problem(info: Any) -> str | None:
    """What in a state's JSON no run saves (the loop would start from it), or None."""
    if not isinstance(info, dict):
        return f"its metadata is a JSON {type(info).__name__}, not an object"
    step = info.get("step")
    if type(step) is not int or step < 0:  # bool is an int subclass: `type` refuses it
        return f"step is {step!r}, not a non-negative integer"
    for key, kind in (("history", list), ("param_groups", list), ("model_config", dict)):
        if not isinstance(info.get(key), kind):
            return f"{key} is {type(info.get(key)).__name__}, not a JSON {'array' if kind is list else 'object'}"
    return None


def restore_train_state(tensors: dict[str, torch.Tensor], info: dict, glow: WaveGlow,
                        optimizer: torch.optim.Optimizer, generator: torch.Generator, path: Path) -> None:
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = glow.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if not k.endswith("W_inverse")]
    if missing or unexpected:
        raise TrainingError(f"{path}: the saved training state does not fit this run's model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use another out_dir "
                            "or set resume: false", path=path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ValueError as error:  # e.g. freeze_upsample changed: another set of trained parameters
        raise TrainingError(f"{path}: the saved optimizer state does not fit this run ({error}); keep the "
                            "run's parameters, or set resume: false", path=path) from None
    generator.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def train(config: TrainConfig, stft: STFTConfig = STFTConfig(),
          on_log: Callable[[dict], None] | None = None,
          on_sample: Callable[[int, WaveGlow], None] | None = None, sample_every: int = 0) -> dict[str, Any]:
    """Train (or fine-tune, or resume) as `config` says; returns a summary. Rank 0 writes into `out_dir`:
    `model.safetensors` (folded, for `load_waveglow`), `train_state.safetensors` (resume) and `history.json`.

    On rank 0, `on_log(entry)` gets each history entry (loss, lr, samples/s, validation loss) and
    `on_sample(step, model)` the folded model (eval mode) every `sample_every` steps, to listen to.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    info = setup_distributed(config.device)
    try:
        return _train(config, stft, info, on_log, on_sample if sample_every > 0 else None, sample_every)
    finally:
        if info.initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, stft: STFTConfig, info: DistInfo, on_log: Callable[[dict], None] | None,
           on_sample: Callable[[int, WaveGlow], None] | None, sample_every: int) -> dict[str, Any]:
    if config.batch_size % info.world_size:
        raise ConfigError(f"parameter 'batch_size' ({config.batch_size}, the global batch) must be a "
                          f"multiple of the number of processes ({info.world_size})")
    device = _resolve_device(config.device, info)
    out_dir = Path(config.out_dir)
    state_path, model_path, history_path = out_dir / STATE_NAME, out_dir / MODEL_NAME, out_dir / HISTORY_NAME
    model_suffix = ".safetensors.gz" if config.save_dtype == "float16" else ".safetensors"
    save_dtype = torch.float16 if config.save_dtype == "float16" else torch.float32

    corpus = load_corpus(config.corpus_dir, config.segment_length, stft)
    n_val = config.n_validation
    if n_val >= len(corpus.ids):
        raise ConfigError(f"parameter 'n_validation' ({n_val}) leaves no training utterances in "
                          f"{config.corpus_dir} ({len(corpus.ids)} usable wavs)")
    train_indices = list(range(len(corpus.ids) - n_val))
    val_indices = list(range(len(corpus.ids) - n_val, len(corpus.ids))) or train_indices

    resuming = config.resume and state_path.is_file()
    if resuming:
        tensors, saved = read_train_state(state_path)
        glow = WaveGlow(ModelConfig.from_dict(saved["model_config"]))
        if config.model and config.model_config() != glow.config:
            raise TrainingError(f"{state_path}: this out_dir holds a run of another architecture than the "
                                "'model' parameter; use another out_dir, or set resume: false to start over",
                                path=state_path)
    elif config.warm_start:
        glow = warm_start_model(config.warm_start, config.model_config() if config.model else None)
    else:
        glow = init_from_scratch(config.model_config(), config.seed, config.hann_upsample)
    glow = apply_weight_norm(glow).train()
    if config.freeze_upsample:
        glow.upsample.requires_grad_(False)
    glow.to(device)
    params = [p for p in glow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    step, history = 0, []
    if resuming:
        restore_train_state(tensors, saved, glow, optimizer, generator, state_path)
        step, history = int(saved["step"]), list(saved["history"])
        del tensors

    generation = (GenerationLoss(config.gen_sigma, config.stft_loss_weight, config.mel_loss_weight, stft).to(device)
                  if config.uses_generation_loss else None)
    loss_module = FlowLoss(glow, config.sigma, generation)
    trainer: nn.Module = loss_module
    if info.world_size > 1:
        trainer = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None
    per_rank = config.batch_size // info.world_size
    mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    val_utts, val_starts = validation_batch(corpus, val_indices, config.validation_segments, config.segment_length)
    last_good = state_path if resuming else None

    saved_step = step if resuming else -1

    def checkpoint(at_step: int) -> None:
        nonlocal last_good, saved_step
        if info.is_main:
            folded = folded_copy(glow)
            save_waveglow(folded, model_path, stft=stft)
            if config.keep_snapshots:
                save_waveglow(folded, out_dir / f"model_step{at_step:06d}{model_suffix}", dtype=save_dtype, stft=stft)
            save_train_state(state_path, glow, optimizer, generator, at_step, config, history)
            atomic_write_json(history_path, history)
        last_good, saved_step = state_path, at_step

    def validation_loss() -> float:
        mel, audio = segments_and_mels(corpus, val_utts, val_starts, config.segment_length, stft, device)
        with torch.no_grad():
            return float(loss_module(mel, audio, autocast_dtype))

    started = time.monotonic()
    window_start, window_samples, window_losses, window_terms = time.monotonic(), 0, [], []
    stopped_by = "max_steps"
    while step < config.max_steps:
        if config.max_seconds and time.monotonic() - started >= config.max_seconds:
            stopped_by = "max_seconds"
            break
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        utterances, starts = draw_batch(corpus, train_indices, config.batch_size, config.segment_length, generator)
        mel, audio = segments_and_mels(corpus, utterances[mine], starts[mine], config.segment_length, stft, device)
        optimizer.zero_grad(set_to_none=True)
        loss = trainer(mel, audio, autocast_dtype, step >= config.gen_start_step)
        global_loss = _mean_over_ranks(loss, info)
        if not math.isfinite(global_loss):
            ids = sorted({corpus.ids[u] for u in utterances})
            where = (f"the last good checkpoint is {last_good}" if last_good
                     else "no checkpoint was written yet")
            raise TrainingError(f"{config.out_dir}: loss is {global_loss} at step {step + 1} (batch of "
                                f"utterances {', '.join(ids)}); stopped without saving this step, {where}. "
                                "Lower learning_rate or set grad_clip, then resume", path=out_dir)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        window_samples += config.batch_size * config.segment_length
        window_losses.append(global_loss)
        window_terms.append(loss_module.terms)
        if step % config.log_every == 0 or step == config.max_steps:
            elapsed = time.monotonic() - window_start
            entry = {"step": step, "loss": float(np.mean(window_losses)), "lr": lr,
                     "samples_per_s": window_samples / max(elapsed, 1e-9), "time": time.time()}
            if generation is not None:  # the terms on rank 0 (the loss is averaged over ranks)
                for key in ("flow", "stft", "mel"):
                    values = [t[key] for t in window_terms if key in t]
                    if values:
                        entry[f"{key}_loss"] = float(np.mean(values))
            if config.validate_every and step % config.validate_every == 0:
                entry["val_loss"] = validation_loss()
            history.append(entry)
            if info.is_main and on_log is not None:
                on_log(entry)
            window_start, window_samples, window_losses, window_terms = time.monotonic(), 0, [], []
        if step % config.checkpoint_every == 0:
            checkpoint(step)
        if on_sample is not None and info.is_main and step % sample_every == 0:
            on_sample(step, folded_copy(glow))
    if saved_step != step:
        checkpoint(step)
    glow.eval()
    return {"step": step, "stopped_by": stopped_by, "out_dir": str(out_dir), "model": str(model_path),
            "state": str(state_path), "final_loss": history[-1]["loss"] if history else None,
            "world_size": info.world_size, "model_config": glow.config.to_dict(), "history": history}


def trained_model(out_dir: str | Path) -> WaveGlow:
    """The folded model a run wrote (for inference)."""
    return load_waveglow(Path(out_dir) / MODEL_NAME)


# --------------------------------------------------------------------------------------------------
# Ray Train
# --------------------------------------------------------------------------------------------------
def train_with_ray(config: TrainConfig, num_workers: int = 2, use_gpu: bool = False,
                   stft: STFTConfig = STFTConfig()) -> dict[str, Any]:
    """The same loop on a Ray cluster through Ray Train's `TorchTrainer` (Ray sets up torch.distributed).

    `out_dir` must be on storage every worker sees (rank 0 writes it). Needs `pip install "ray[train]"`.
    """
    try:
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise MissingDependency("Ray Train is not installed: pip install 'ray[train]' (or the project's "
                                "scale-out extra) to train on a Ray cluster; torchrun needs no extra") from None
    # workers run in their own folders: hand them absolute paths
    config_dict = config.to_dict()
    for key in ("corpus", "out_dir", "warm_start"):
        if config_dict[key] not in ("", "demo"):
            config_dict[key] = str(Path(config_dict[key]).expanduser().resolve())

    def loop(loop_config: dict) -> None:
        import ray.train
        import ray.train.torch

        # Ray Train has set up torch.distributed and picks each worker's device (its GPU, or the CPU)
        worker_config = {**loop_config["train"], "device": str(ray.train.torch.get_device())}
        result = train(TrainConfig.from_dict(worker_config), stft)
        ray.train.report({k: v for k, v in result.items() if k in ("step", "final_loss")})

    trainer = TorchTrainer(loop, train_loop_config={"train": config_dict},
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu))
    result = trainer.fit()
    return {"metrics": dict(result.metrics or {}), "out_dir": config.out_dir}
