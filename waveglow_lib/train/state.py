"""The resume state: safetensors tensors (weights, Adam's moments, the generators' states) + JSON, no pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import TrainingError
from ..io import atomic_write_bytes, read_bounded
# what a run keeps in its out_dir (the resume state, the folded model, the history), under their older names
from ..layout import TRAIN_HISTORY_FILE as HISTORY_NAME
from ..layout import TRAIN_MODEL_FILE as MODEL_NAME
from ..layout import TRAIN_STATE_FILE as STATE_NAME
from ..model import WaveGlow
from .config import TrainConfig

__all__ = ["HISTORY_NAME", "MAX_STATE_BYTES", "MODEL_NAME", "STATE_FORMAT", "STATE_NAME", "STATE_VERSION",
           "read_train_state", "restore_train_state", "save_train_state"]
STATE_FORMAT = "waveglow-workflow train state"
STATE_VERSION = "1"


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
