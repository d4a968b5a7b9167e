"""PyTorch backend: the model itself (CPU, or CUDA when present), in fp32, bf16 or fp16."""
from __future__ import annotations

import copy

import numpy as np
import torch

from .base import Backend, BackendError, BackendUnavailable, ModelSpec

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_device(device: str):
    """'cpu', 'cuda', 'cuda:1' → torch.device; CUDA only when this torch build sees a GPU."""
    text = str(device or "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"torch backend: device {text!r} asked for, but this torch build sees no "
                                     "CUDA GPU (install a CUDA build of torch, or use device=cpu)")
        return torch.device(text)
    if text != "cpu":
        raise BackendError(f"torch backend: device {text!r} is not supported here (cpu or cuda[:N]); "
                           "for an Ascend NPU use the om backend")
    return torch.device("cpu")


class TorchBackend(Backend):
    """Runs `model.infer(mel, sigma=1.0, z=z)` under `torch.inference_mode()`.

    A cast (bf16/fp16) or a move to CUDA works on a copy, so the caller's model stays fp32 on the CPU.
    Output is returned as float32 whatever the compute precision.
    """

    name = "torch"

    def __init__(self, model, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        if model is None:
            raise BackendError("torch backend needs the model: get_backend('torch', model=load_waveglow(...))")
        if precision not in DTYPES:
            raise BackendError(f"torch backend: precision {precision!r} is not supported "
                               f"(one of {', '.join(DTYPES)}; int8: use the fast backend)")
        super().__init__(ModelSpec.from_model_config(model.config), precision, device)
        self.torch_device = torch_device(device)
        self.dtype = getattr(torch, DTYPES[precision])
        if threads:
            torch.set_num_threads(int(threads))
        param = next(model.parameters())
        if param.dtype != self.dtype or param.device != self.torch_device:
            model = copy.deepcopy(model).to(device=self.torch_device, dtype=self.dtype)
        self.model = model.eval()
        self.description = f"torch {torch.__version__} {self.torch_device} {precision}"

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            mel_t = torch.from_numpy(mel).to(self.torch_device, self.dtype)
            z_t = torch.from_numpy(z).to(self.torch_device, self.dtype)
            audio = self.model.infer(mel_t, sigma=1.0, z=z_t)
            return audio.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
