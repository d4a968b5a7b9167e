"""WaveGlow checkpoints in and out: what `safe_reader` reads, mapped to a `WaveGlow`. No code from a checkpoint runs.

Formats `load_waveglow` reads (detected from the file's content, not its name):
1. NVIDIA/waveglow training checkpoints (`waveglow_256channels_universal_v5.pt`): a pickle of
   `{"model": glow.WaveGlow, ...}`, in torch's zip or legacy format. `safe_reader` unpickles it with
   NVIDIA's classes (and the torch classes a pickled module holds, `WAVEGLOW_PICKLE`) as inert containers,
   so neither NVIDIA's `glow` module nor anything else runs; any other global is refused. The hyper-parameters
   are read off the pickled modules' attributes.
2. DeepLearningExamples checkpoints `{"state_dict": ..., "config": ...}` or a bare state dict,
   keys possibly prefixed `module.`; read the same way; missing hyper-parameters are read off the shapes.
3. Our own format, written by `save_waveglow`: safetensors (no pickle at all) with the model and STFT
   config as JSON in the header metadata; optionally gzip-compressed (`.gz`), as the demo model is.

Then: weight norm is folded (`fold_weight_norm`), glow_old's layer names are mapped to glow's, and the
hyper-parameters are checked (sane limits, then the shapes they imply against the tensors) before a
model is built. `safe_reader` bounds the file, what a `.gz` inflates to, every tensor and the module graph.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as save_safetensors

from .config import DEMO_MODEL_PATH, ModelConfig, STFTConfig, from_mapping
from .errors import CheckpointError, ConfigError  # noqa: F401 (callers catch CheckpointError from here)
from .io import atomic_write_bytes
from .model import WaveGlow
from .safe_reader import (PickledObject, PickleKind, file_error, is_safetensors, is_torch_container,
                          pickled_module_state, read_bytes, read_pickled, read_safetensors)
from .safe_reader import load_tensor_file  # noqa: F401 (imported from here before the reader was split off)

FORMAT_NAME = "waveglow-workflow"
FORMAT_VERSION = "1"

#: hyper-parameters beyond these are not a WaveGlow anyone trained (NVIDIA's: 80, 12, 8, 4, 2, 8, 256/512, 3)
MODEL_LIMITS = {
    "n_mel_channels": 1024, "n_flows": 64, "n_group": 256, "n_early_every": 64, "n_early_size": 256,
    "n_layers": 16, "n_channels": 4096, "kernel_size": 63, "upsample_kernel": 16384, "upsample_stride": 4096,
}
#: what a pickled NVIDIA WaveGlow (or a DeepLearningExamples config) is built from: each class is read as
#: an inert `PickledObject`; tensors and containers are `safe_reader`'s part of the allow-list
WAVEGLOW_PICKLE = PickleKind("a WaveGlow checkpoint", frozenset({
    "glow.WaveGlow", "glow.WN", "glow.Invertible1x1Conv", "glow.WaveGlowLoss",
    "glow_old.WaveGlow", "glow_old.WN",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.ConvTranspose1d",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.modules.module._WrappedHook",
    "argparse.Namespace",
}))


# --- from pickled objects / state dicts to our model -------------------------------------------

def _check_weights(state: Any, source: Any) -> dict[str, torch.Tensor]:
    """Every entry a named floating-point tensor with finite values (or the error names the entry)."""
    if not isinstance(state, Mapping):
        raise file_error(source, f"expected a state dict (names to tensors), found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise file_error(source, f"weight name {reprlib.repr(key)} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise file_error(source, f"weight '{key}' is a {type(value).__name__}, expected a tensor")
        if not value.is_floating_point():
            raise file_error(source, f"weight '{key}' has dtype {value.dtype}, expected floating point")
        if not bool(torch.isfinite(value).all()):
            raise file_error(source, f"weight '{key}' holds NaN or Inf values: the checkpoint is corrupt")
    return dict(state)


def _config_from_pickled(model: Any, source: Any) -> dict[str, Any]:
    attrs = model.__dict__
    try:
        modules = attrs["_modules"]
        wn = modules["WN"].__dict__["_modules"]["0"].__dict__
        in_layer = wn["_modules"]["in_layers"].__dict__["_modules"]["0"].__dict__
        upsample = modules["upsample"].__dict__
        return dict(
            n_mel_channels=int(upsample["in_channels"]),
            n_flows=int(attrs["n_flows"]), n_group=int(attrs["n_group"]),
            n_early_every=int(attrs["n_early_every"]), n_early_size=int(attrs["n_early_size"]),
            n_layers=int(wn["n_layers"]), n_channels=int(wn["n_channels"]),
            kernel_size=int(in_layer["kernel_size"][0]),
            upsample_kernel=int(upsample["kernel_size"][0]), upsample_stride=int(upsample["stride"][0]),
            layout="glow_old" if model.pickled_name.startswith("glow_old.") else "glow",
        )
    except (KeyError, AttributeError, TypeError, IndexError, ValueError, RuntimeError, OverflowError) as error:
        raise file_error(source, f"pickled WaveGlow lacks an expected attribute ({reprlib.repr(error)})") from None


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each `<name>_g`, `<name>_v` pair of `torch.nn.utils.weight_norm` (NVIDIA's checkpoints, our training)
    becomes the `<name>` it stands for, g * v / |v|; the other entries are kept."""
    folded = {}
    for key, value in state.items():
        if key.endswith("_g") and key[:-2] + "_v" in state:
            base = key[:-2]
            # dim 0, as torch.nn.utils.weight_norm uses by default and NVIDIA kept
            folded[base] = torch._weight_norm(state[base + "_v"].float(), value.float(), 0)
        elif key.endswith("_v") and key[:-2] + "_g" in state:
            continue
        else:
            folded[key] = value
    return folded


def _to_current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map glow_old's per-layer `cond_layers` and split `res_layers`/`skip_layers` to glow.py names."""
    out: dict[str, torch.Tensor] = {}
    grouped: dict[tuple[str, str, str], dict[int, torch.Tensor]] = collections.defaultdict(dict)
    pattern = re.compile(r"^(WN\.\d+)\.(cond_layers|res_layers|skip_layers)\.(\d+)\.(weight|bias)$")
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            wn, kind, index, param = match.groups()
            grouped[(wn, kind, param)][int(index)] = value
        else:
            out[key] = value
    for (wn, kind, param), layers in grouped.items():
        ordered = [layers[i] for i in sorted(layers)]
        if kind == "cond_layers":
            out[f"{wn}.cond_layer.{param}"] = torch.cat(ordered, 0)
        elif kind == "skip_layers":
            residual = grouped.get((wn, "res_layers", param), {})
            for i, skip in enumerate(ordered):
                merged = torch.cat([residual[i], skip], 0) if i in residual else skip
                out[f"{wn}.res_skip_layers.{i}.{param}"] = merged
    return out


def _normalise_state(state: Any, source: Any) -> dict[str, torch.Tensor]:
    """Check the weights, strip DataParallel prefixes, drop cached inverses, fold weight norm, map glow_old."""
    state = _check_weights(state, source)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("W_inverse")}
    try:
        return _to_current_layout(fold_weight_norm(state))
    except (RuntimeError, ValueError, IndexError, KeyError) as error:  # shapes that do not fit together
        raise file_error(source, f"weights do not fit together as a WaveGlow's: {str(error)[:300]}") from None


def _config_from_state(state: Mapping[str, torch.Tensor], source: Any, layout: str = "glow") -> dict[str, Any]:
    """Hyper-parameters read off the shapes of a normalised state dict."""
    try:
        n_flows = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("WN."))
        n_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("WN.0.in_layers."))
        in_weight = state["WN.0.in_layers.0.weight"]
        sizes = [state[f"convinv.{k}.conv.weight"].shape[0] for k in range(min(n_flows, MODEL_LIMITS["n_flows"]))]
        upsample = state["upsample.weight"]
        if in_weight.dim() != 3 or upsample.dim() != 3:
            raise ValueError("3-d convolution weights")
    except (KeyError, ValueError, IndexError) as error:
        raise file_error(source, f"state dict does not look like WaveGlow (missing {error})") from None
    drops = [k for k in range(1, len(sizes)) if sizes[k] < sizes[k - 1]]
    return dict(
        n_mel_channels=int(upsample.shape[0]), n_flows=n_flows, n_group=int(sizes[0]),
        n_early_every=drops[0] if drops else n_flows, n_early_size=int(sizes[0] - sizes[drops[0]]) if drops else 2,
        n_layers=n_layers, n_channels=int(in_weight.shape[0] // 2), kernel_size=int(in_weight.shape[2]),
        upsample_kernel=int(upsample.shape[2]), layout=layout,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight a `WaveGlow(config)` holds, computed without building it."""
    c = config
    shapes = {"upsample.weight": (c.n_mel_channels, c.n_mel_channels, c.upsample_kernel),
              "upsample.bias": (c.n_mel_channels,)}
    n_half, n_remaining, channels, layers = c.n_group // 2, c.n_group, c.n_channels, c.n_layers

    def conv(name: str, out: int, into: int, kernel: int = 1, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (out, into, kernel)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    for k in range(c.n_flows):
        if k > 0 and k % c.n_early_every == 0:
            n_half -= c.n_early_size // 2
            n_remaining -= c.n_early_size
        conv(f"convinv.{k}.conv", n_remaining, n_remaining, bias=False)
        conv(f"WN.{k}.start", channels, n_half)
        conv(f"WN.{k}.end", 2 * n_half, channels)
        conv(f"WN.{k}.cond_layer", 2 * channels * layers, c.n_mel_channels * c.n_group)
        for i in range(layers):
            conv(f"WN.{k}.in_layers.{i}", 2 * channels, channels, c.kernel_size)
            conv(f"WN.{k}.res_skip_layers.{i}", 2 * channels if i < layers - 1 else channels, channels)
    return shapes


def _check_config(config: Mapping[str, Any], source: Any) -> ModelConfig:
    """Sane limits first (before ModelConfig derives anything from the values), then its own checks."""
    flat = {**config, **(config.get("WN_config") if isinstance(config.get("WN_config"), Mapping) else {})}
    beyond = [f"{name}={flat[name]} (at most {limit})" for name, limit in MODEL_LIMITS.items()
              if isinstance(flat.get(name), int) and flat[name] > limit]
    if beyond:
        raise file_error(source, f"refused: hyper-parameters beyond what a WaveGlow uses: {', '.join(beyond)}")
    try:
        return ModelConfig.from_dict(config)
    except (ValueError, TypeError) as error:
        raise file_error(source, str(error)) from None


def _build(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: Any) -> WaveGlow:
    """`state` must be normalised (see `_normalise_state`). Everything is checked before the model is built."""
    model_config = _check_config(config, source)
    expected = expected_shapes(model_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else ""]))
        raise file_error(source, f"weights do not match a WaveGlow with {_describe(model_config)}: {detail}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise file_error(source, f"'{key}' has shape {tuple(state[key].shape)} but a WaveGlow with "
                                f"{_describe(model_config)} needs {shape}")
    model = WaveGlow(model_config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise file_error(source, f"'{name}' is NaN or Inf once loaded (a weight-normed layer with zero norm?)")
    for k, conv in enumerate(model.convinv):
        try:
            conv.refresh_inverse()
        except RuntimeError:  # torch.linalg.inv of a singular matrix
            conv.W_inverse = torch.full_like(conv.W_inverse, math.inf)
        if not bool(torch.isfinite(conv.W_inverse).all()):
            raise file_error(source, f"'convinv.{k}.conv.weight' is singular: the flow cannot be inverted")
    return model


def _describe(config: ModelConfig) -> str:
    return (f"n_mel_channels={config.n_mel_channels}, n_flows={config.n_flows}, n_group={config.n_group}, "
            f"n_layers={config.n_layers}, n_channels={config.n_channels}, layout={config.layout}")


def _model_from_pickle(obj: Any, source: Any, override: Mapping[str, Any]) -> WaveGlow:
    if isinstance(obj, dict) and isinstance(obj.get("model"), PickledObject):
        obj = obj["model"]
    if isinstance(obj, PickledObject):
        if not obj.pickled_name.endswith(".WaveGlow"):
            raise file_error(source, f"expected a pickled WaveGlow, found {obj.pickled_name}")
        config = _config_from_pickled(obj, source)
        return _build(_normalise_state(pickled_module_state(obj, source), source), {**config, **override}, source)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        config = obj.get("config") or {}
        if isinstance(config, PickledObject):  # an argparse.Namespace
            config = dict(config.__dict__)
        if not isinstance(config, Mapping):
            raise file_error(source, f"'config' is a {type(config).__name__}, expected a mapping")
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        config, state = {}, obj
    else:
        keys = ", ".join(reprlib.repr(k) for k in list(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
        raise file_error(source, "not a WaveGlow checkpoint: expected a pickled model under 'model', "
                            f"a 'state_dict', or a state dict of tensors; found {keys}")
    state = _normalise_state(state, source)
    layout = "glow_old" if any(".cond_layers." in k for k in obj.get("state_dict", obj)) else "glow"
    known = set(ModelConfig.__dataclass_fields__) | {"WN_config"}
    config = {k: v for k, v in config.items() if k in known}
    return _build(state, {**_config_from_state(state, source, layout), **config, **override}, source)


# --- our format ---------------------------------------------------------------------------------

def save_waveglow(model: WaveGlow, path: str | Path, dtype: torch.dtype = torch.float32,
                  stft: STFTConfig = STFTConfig()) -> Path:
    """Write `model` as safetensors (+ JSON config in the header); `.gz` suffix compresses it.

    This is also how to make an untrusted checkpoint safe once: `save_waveglow(load_waveglow(x), y)`.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("W_inverse")}
    # one metadata key: safetensors writes several in hash order, and we want byte-identical files
    info = {"version": FORMAT_VERSION, "model_config": model.config.to_dict(), "stft_config": stft.to_dict()}
    data = save_safetensors(state, metadata={FORMAT_NAME: json.dumps(info, sort_keys=True)})
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return atomic_write_bytes(path, data)


def _read_ours(data: bytes, source: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, our JSON metadata: {} when the safetensors file was not written by `save_waveglow`)."""
    state, metadata = read_safetensors(data, source)
    try:
        stored = metadata.get(FORMAT_NAME)
        info = json.loads(stored) if stored else {}
        if not isinstance(info, dict):
            raise TypeError(f"a {type(info).__name__}")
    except (ValueError, TypeError, RecursionError) as cause:
        raise file_error(source, f"the '{FORMAT_NAME}' metadata is not a JSON object ({cause})") from None
    return state, info


def _load_safetensors(data: bytes, source: Any, override: Mapping[str, Any]) -> WaveGlow:
    state, info = _read_ours(data, source)
    state = _normalise_state(state, source)
    config = info.get("model_config")
    if config is not None and not isinstance(config, Mapping):
        raise file_error(source, f"'model_config' in the header is a {type(config).__name__}, expected an object")
    config = config if config is not None else _config_from_state(state, source)
    return _build(state, {**config, **override}, source)


def read_stft_config(path: str | Path | None = None) -> STFTConfig:
    """The STFT settings stored with a model in our format (defaults for other formats)."""
    path = Path(path) if path else DEMO_MODEL_PATH
    data = read_bytes(path)
    if not is_safetensors(data):
        return STFTConfig()
    stored = _read_ours(data, path)[1].get("stft_config", {})
    if not isinstance(stored, Mapping):
        raise file_error(path, f"'stft_config' in the header is a {type(stored).__name__}, expected an object")
    try:
        return from_mapping(STFTConfig, stored, "'stft_config' in the header")
    except ConfigError as error:
        raise file_error(path, str(error)) from None


# --- entry points ---------------------------------------------------------------------------------

def load_waveglow(checkpoint: str | Path | None = None, config: ModelConfig | Mapping[str, Any] | None = None,
                  device: str | torch.device = "cpu") -> WaveGlow:
    """Load a WaveGlow in eval mode; `checkpoint=None` gives the bundled demo model.

    `config` overrides or fills in hyper-parameters the checkpoint does not carry.
    """
    path = Path(checkpoint) if checkpoint is not None else DEMO_MODEL_PATH
    override = config.to_dict() if isinstance(config, ModelConfig) else dict(config or {})
    data = read_bytes(path)
    if is_safetensors(data):
        model = _load_safetensors(data, path, override)
    elif is_torch_container(data):  # torch zip archive, or a legacy pickle stream
        model = _model_from_pickle(read_pickled(data, path, WAVEGLOW_PICKLE), path, override)
    else:
        raise file_error(path, "not a WaveGlow checkpoint (expected a torch .pt/.pth file or safetensors written "
                          "by save_waveglow)")
    return model.to(device).eval()


def model_fingerprint(model) -> str:
    """16 hex digits of sha256 over the config and every weight: what derived artefacts are stamped with."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy())  # the buffer itself: no copy
    return digest.hexdigest()[:16]
