"""The parameters of one training run (`TrainConfig`, one params/train_*.yaml file) and its learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import field
from typing import Annotated, Literal

from ..config import Finite, ModelConfig, ParamsFile, Text, above, at_least, check_os_path, parameters
from ..errors import ConfigError

Positive = Annotated[int, at_least(1)]
Count = Annotated[int, at_least(0)]
NonNegative = Annotated[Finite, at_least(0)]


@parameters
class TrainConfig(ParamsFile):
    """Parameters of one training run (one params/train_*.yaml file)."""

    #: LJSpeech-layout folder (wavs/*.wav); "demo" = the bundled demo corpus
    corpus: Text = "demo"
    #: where checkpoints, the trained model and the history go
    out_dir: Text = "runs/train"
    #: "" = from scratch with `model`; a path = warm start from any checkpoint `load_waveglow` reads
    warm_start: Text = ""
    #: continue from `<out_dir>/train_state.safetensors` when it exists
    resume: bool = True
    #: architecture for a run from scratch (ModelConfig keys; missing keys take ModelConfig's defaults)
    model: dict = field(default_factory=dict)
    #: keep the upsampler as initialised (a per-band interpolation kernel from scratch): fewer weights to learn
    freeze_upsample: bool = False
    #: from scratch: initialise the upsampler as a per-band Hann interpolation (else torch's default init)
    hann_upsample: bool = False
    segment_length: Positive = 16000
    batch_size: Positive = 12
    sigma: Annotated[Finite, above(0)] = 1.0
    learning_rate: Annotated[Finite, above(0)] = 1e-4
    warmup_steps: Count = 0
    #: cosine decay from learning_rate to final_learning_rate over max_steps; 0 = constant
    final_learning_rate: NonNegative = 0.0
    cosine_decay: bool = False
    grad_clip: NonNegative = 0.0
    max_steps: Positive = 1000
    #: stop (and checkpoint) after this many seconds of this sitting; 0 = no limit
    max_seconds: NonNegative = 0.0
    checkpoint_every: Positive = 100
    #: also keep the folded model of every checkpoint as model_step<N>.safetensors(.gz)
    keep_snapshots: bool = False
    log_every: Positive = 10
    #: validation loss on fixed segments every N steps; 0 = never
    validate_every: Count = 100
    #: hold out the last N utterances for validation; 0 = validate on fixed segments of the training set
    n_validation: Count = 0
    validation_segments: Positive = 4
    #: generation-direction losses (audio = model(mel, gen_sigma * z) against the recording), added to the
    #: flow loss from step `gen_start_step` on: multi-resolution STFT (spectral convergence + log magnitude)
    #: and log-mel L1, each with its weight; 0 = off (NVIDIA's objective alone)
    stft_loss_weight: NonNegative = 0.0
    mel_loss_weight: NonNegative = 0.0
    gen_sigma: NonNegative = 0.6
    gen_start_step: Count = 0
    #: fp32 | bf16 (bf16 = autocast of the forward pass; the loss terms are summed in fp32)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Text = "cpu"
    seed: int = 1234
    #: torch threads per process; 0 = one per core not busy with other work, re-measured as it trains
    num_threads: Count = 0
    #: dtype of the model snapshots (keep_snapshots): float32 | float16 (gzipped)
    save_dtype: Literal["float32", "float16"] = "float32"
    #: local (this process, or each torchrun process) | ray (Ray Train TorchTrainer, ray_workers workers)
    engine: Literal["local", "ray"] = "local"
    ray_workers: Positive = 2

    def __post_init__(self) -> None:
        for key in ("corpus", "out_dir", "warm_start"):  # the OS's limits, named before anything opens them
            check_os_path(getattr(self, key), f"parameter {key!r}")
        try:
            self.model_config()
        except ValueError as error:
            raise ConfigError(f"parameter 'model': {error}") from None

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def uses_generation_loss(self) -> bool:
        return self.stft_loss_weight > 0 or self.mel_loss_weight > 0



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
