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
- data parallel: under `torchrun` (or Ray Train, or any caller that set up `torch.distributed`), N ranks
  follow the trajectory of one process with the same global batch (see `loop`). Rank 0 alone writes files.

The package, in the order a step uses it: `config` (TrainConfig, lr_at), `data` (the corpus, batches and
their mels), `weights` (initialisation, warm start, weight norm on and folded off), `loss` (the objective),
`state` (the resume state), `loop` (train, data-parallel set-up), `ray` (train_with_ray).
"""
from __future__ import annotations

from .config import TrainConfig, lr_at
from .data import Corpus, draw_batch, load_corpus, segments_and_mels, validation_batch
from .loop import DistInfo, setup_distributed, train
from .loss import FlowLoss, GenerationLoss, condition, upsample
from .ray import train_with_ray
from .state import (HISTORY_NAME, MAX_STATE_BYTES, MODEL_NAME, STATE_FORMAT, STATE_NAME, STATE_VERSION,
                    read_train_state, restore_train_state, save_train_state)
from .weights import WEIGHT_NORM_LAYERS, apply_weight_norm, folded_copy, init_from_scratch, warm_start_model

__all__ = [
    "TrainConfig", "lr_at", "Corpus", "draw_batch", "load_corpus", "segments_and_mels", "validation_batch",
    "DistInfo", "setup_distributed", "train", "FlowLoss", "GenerationLoss", "condition", "upsample",
    "train_with_ray", "HISTORY_NAME", "MAX_STATE_BYTES", "MODEL_NAME", "STATE_FORMAT", "STATE_NAME",
    "STATE_VERSION", "read_train_state", "restore_train_state", "save_train_state", "WEIGHT_NORM_LAYERS",
    "apply_weight_norm", "folded_copy", "init_from_scratch", "warm_start_model",
]
