"""The training loop on a Ray cluster, through Ray Train's `TorchTrainer`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import STFTConfig
from ..errors import MissingDependency
from .config import TrainConfig
from .loop import train


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
