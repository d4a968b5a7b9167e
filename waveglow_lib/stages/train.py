"""The train stage: a params file (+ overrides) → `TrainConfig` → `waveglow_lib.train.train` (or Ray Train).

Thin on purpose: the loop, its checkpoints and its checks live in `waveglow_lib.train`. The parameters
used are written to `<out_dir>/params.yaml` by rank 0, so the folder says how its model was made.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..io import atomic_write_text
from ..train import TrainConfig, train, train_with_ray


def load_train_config(params: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A params YAML file (None = TrainConfig defaults) with `overrides` (e.g. from --set) on top."""
    if params is None:
        return TrainConfig.from_dict(dict(overrides or {}), source="command line")
    return TrainConfig.from_yaml(params, overrides)


def run_train(config: TrainConfig, on_log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train as `config` says (engine local: this process or its torchrun group; engine ray: Ray Train)."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.out_dir) / "params.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.engine == "ray":
        return train_with_ray(config, num_workers=config.ray_workers, use_gpu=config.device.startswith("cuda"))
    return train(config, on_log=on_log)
