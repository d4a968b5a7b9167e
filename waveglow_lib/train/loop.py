"""The training loop: one process, or each rank of a data-parallel run (torchrun, Ray Train).

Every rank draws the same global batch from the same generator and trains on its slice; DDP averages the
gradients, so N ranks follow the trajectory of one process with the same global batch. Rank 0 alone
writes files.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import save_waveglow
from ..hardware import CpuMeter, choose_threads, usable_cpus
from ..config import ModelConfig, STFTConfig
from ..errors import ConfigError, MissingDependency, TrainingError
from ..io import atomic_write_json
from ..layout import TRAIN_HISTORY_FILE, TRAIN_MODEL_FILE, TRAIN_STATE_FILE
from ..model import WaveGlow
from .config import TrainConfig, lr_at
from .data import draw_batch, load_corpus, segments_and_mels, validation_batch
from .loss import FlowLoss, GenerationLoss
from .state import read_train_state, restore_train_state, save_train_state
from .weights import apply_weight_norm, folded_copy, init_from_scratch, warm_start_model


class ThreadPlan:
    """Torch's threads for the training steps. `num_threads` > 0: that many, always. 0: one per core not
    busy with other processes' work (`hardware.choose_threads`, the inference path's rule),
    measured every `every` seconds: OpenMP splits each op evenly across its threads and waits for the
    slowest, so a thread sharing its core with another process slows every op to that thread's pace (a
    busy machine then costs training far more than its fair share of the cores)."""

    def __init__(self, num_threads: int, world_size: int = 1, every: float = 5.0):
        self.fixed = num_threads
        self.cap = max(1, usable_cpus() // max(1, world_size))
        self.meter = CpuMeter(reuse=every)
        self.threads = num_threads or self.cap

    def update(self) -> int:
        if not self.fixed:
            # this run's other ranks count as others' work: each rank takes its share of the free cores
            chosen = choose_threads(usable_cpus(), self.meter.others_busy(), self.cap)
            if chosen != torch.get_num_threads():
                torch.set_num_threads(chosen)
            self.threads = chosen
        return self.threads


def train(config: TrainConfig, stft: STFTConfig = STFTConfig(),
          on_log: Callable[[dict], None] | None = None,
          on_sample: Callable[[int, WaveGlow], None] | None = None, sample_every: int = 0,
          progress: bool = False) -> dict[str, Any]:
    """Train (or fine-tune, or resume) as `config` says; returns a summary. Rank 0 writes into `out_dir`:
    `model.safetensors` (folded, for `load_waveglow`), `train_state.safetensors` (resume) and `history.json`.

    On rank 0, `on_log(entry)` gets each history entry (loss, lr, samples/s, validation loss) and
    `on_sample(step, model)` the folded model (eval mode) before the first step, every `sample_every` steps
    and after the last, to listen to; `progress`: a tqdm bar over the steps with the loss and the speed.
    Threads: `ThreadPlan` (`num_threads` 0: as many as there are free cores, re-measured as it runs).
    """
    threads_before = torch.get_num_threads()   # a notebook's kernel goes on after training
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    info = setup_distributed(config.device)
    try:
        return _train(config, stft, info, on_log, on_sample if sample_every > 0 else None, sample_every,
                      progress and info.is_main)
    finally:
        torch.set_num_threads(threads_before)
        if info.initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, stft: STFTConfig, info: DistInfo, on_log: Callable[[dict], None] | None,
           on_sample: Callable[[int, WaveGlow], None] | None, sample_every: int,
           progress: bool = False) -> dict[str, Any]:
    if config.batch_size % info.world_size:
        raise ConfigError(f"parameter 'batch_size' ({config.batch_size}, the global batch) must be a "
                          f"multiple of the number of processes ({info.world_size})")
    device = _resolve_device(config.device, info)
    out_dir = Path(config.out_dir)
    state_path, model_path = out_dir / TRAIN_STATE_FILE, out_dir / TRAIN_MODEL_FILE
    history_path = out_dir / TRAIN_HISTORY_FILE
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

    threads = ThreadPlan(config.num_threads, info.world_size) if device.type == "cpu" else None
    bar = None
    if progress:
        bar = tqdm(total=config.max_steps, initial=step, unit="step", desc="train")
    if on_sample is not None and info.is_main and step < config.max_steps:
        on_sample(step, folded_copy(glow))   # before: what the model makes now
    sampled_step = step
    started = time.monotonic()
    window_start, window_samples, window_losses, window_terms = time.monotonic(), 0, [], []
    stopped_by = "max_steps"
    while step < config.max_steps:
        if config.max_seconds and time.monotonic() - started >= config.max_seconds:
            stopped_by = "max_seconds"
            break
        if threads is not None:
            threads.update()
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
        if bar is not None:
            speed = window_samples / max(time.monotonic() - window_start, 1e-9)
            bar.set_postfix_str(f"loss {global_loss:.3f}, {speed / 1000:.1f} k samples/s"
                                + (f", {threads.threads} thread{'s' if threads.threads > 1 else ''}" if threads else ""),
                                refresh=False)
            bar.update(1)
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
            sampled_step = step
    if bar is not None:
        bar.close()
    if saved_step != step:
        checkpoint(step)
    if on_sample is not None and info.is_main and sampled_step != step:
        on_sample(step, folded_copy(glow))   # after: what it makes now
    glow.eval()
    return {"step": step, "stopped_by": stopped_by, "out_dir": str(out_dir), "model": str(model_path),
            "state": str(state_path), "final_loss": history[-1]["loss"] if history else None,
            "world_size": info.world_size, "model_config": glow.config.to_dict(), "history": history}


# --- the ranks of a data-parallel run -------------------------------------------------------------

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
