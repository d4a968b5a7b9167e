"""WaveGlow checkpoints in and out, without executing untrusted pickles.

Formats `load_waveglow` reads (detected from the file's content, not its name):
1. NVIDIA/waveglow training checkpoints (`waveglow_256channels_universal_v5.pt`): a pickle of
   `{"model": glow.WaveGlow, ...}`, in torch's zip or legacy format. It is read by an allow-listed
   unpickler that maps NVIDIA's classes (and the torch classes a pickled module holds) to inert
   containers, so neither NVIDIA's `glow` module nor anything else runs. Any other global is refused.
2. DeepLearningExamples checkpoints `{"state_dict": ..., "config": ...}` or a bare state dict,
   keys possibly prefixed `module.`; read through the same unpickler.
3. Our own format, written by `save_waveglow`: safetensors (no pickle at all) with the model and STFT
   config as JSON in the header metadata; optionally gzip-compressed (`.gz`), as the demo model is.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import DEMO_MODEL_PATH, ModelConfig, STFTConfig
from .io import atomic_write_bytes
from .model import WaveGlow
from .errors import CheckpointError, InputNotFound

FORMAT_NAME = "waveglow-workflow"
FORMAT_VERSION = "1"


# --- the allow-listed unpickler ---------------------------------------------------------------

class PickledObject:
    """Inert stand-in for a pickled class instance: it only stores the pickled state."""

    pickled_name = "?"
    dump_patches = False  # read by torch's legacy loader when it compares module sources

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self.pickled_name}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


#: classes a pickled NVIDIA model is built from; each becomes an inert `PickledObject`
STUB_CLASSES = frozenset({
    "glow.WaveGlow", "glow.WN", "glow.Invertible1x1Conv", "glow.WaveGlowLoss",
    "glow_old.WaveGlow", "glow_old.WN",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.ConvTranspose1d",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.modules.module._WrappedHook",
    "argparse.Namespace",
})

#: functions and types that rebuild tensors and plain containers; all are side-effect free
SAFE_GLOBALS = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Tensor": torch.Tensor,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.object": object,
}


def _no_backend() -> None:
    """torch < 1.4 modules kept a `_backend` attribute pickled as a call of this name; it is unused."""
    return None


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor for protocol 0/1 pickles, restricted to our inert classes."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)) or base is not object:
        raise pickle.UnpicklingError("copyreg._reconstructor is only allowed for allow-listed classes")
    return object.__new__(cls)


def _safe_global(module: str, name: str) -> Any:
    module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name Python 2 modules
    qualified = f"{module}.{name}"
    if qualified in STUB_CLASSES:
        return _stub_class(qualified)
    if qualified in SAFE_GLOBALS:
        return SAFE_GLOBALS[qualified]
    if qualified == "copyreg._reconstructor":
        return _reconstructor
    if qualified == "torch.nn.backends.thnn._get_thnn_function_backend":
        return _no_backend
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.device)):
        return getattr(torch, name)
    if module == "torch" and name == "device":
        return torch.device
    raise CheckpointError(
        f"refused to unpickle global '{qualified}': it is not on the allow-list of classes a WaveGlow "
        "checkpoint may contain (this file may run code when loaded with plain torch.load)")


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STUBS: dict[str, type] = {}


def _stub_class(qualified: str) -> type:
    if qualified not in _STUBS:
        module, _, name = qualified.rpartition(".")
        _STUBS[qualified] = type(name, (PickledObject,), {"pickled_name": qualified, "__module__": __name__})
    return _STUBS[qualified]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _safe_global(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: handed to torch.load as `pickle_module`: torch keeps its storage handling, we decide every global
restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                          __name__="waveglow_lib.checkpoint.restricted_pickle")


def _torch_load_restricted(data: bytes, source: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", pickle_module=restricted_pickle,
                              weights_only=False)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    except Exception as error:  # zip/pickle errors of all kinds: the file is not what it claims to be
        cause = error.__cause__ or error.__context__
        if isinstance(cause, CheckpointError):
            raise CheckpointError(f"{source}: {cause}") from None
        raise CheckpointError(f"{source}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(error).__name__}: {error}") from None


# --- from pickled objects / state dicts to our model -------------------------------------------

def _module_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a pickled (inert) nn.Module tree, with weight norm still unfolded."""
    state: dict[str, torch.Tensor] = {}
    attrs = getattr(obj, "__dict__", {})
    for group in ("_parameters", "_buffers"):
        for name, tensor in (attrs.get(group) or {}).items():
            if tensor is not None:
                state[prefix + name] = tensor
    for name, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            state.update(_module_state(child, f"{prefix}{name}."))
    return state


def _config_from_pickled(model: Any) -> dict[str, Any]:
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
    except (KeyError, AttributeError, TypeError, IndexError) as error:
        raise CheckpointError(f"pickled WaveGlow lacks expected attribute ({error})") from None


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _normalise_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel prefixes, drop cached inverses, fold weight norm, map glow_old names."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("W_inverse")}
    return _to_current_layout(_fold_weight_norm(state))


def _config_from_state(state: Mapping[str, torch.Tensor], layout: str = "glow") -> dict[str, Any]:
    """Hyper-parameters read off the shapes of a normalised state dict."""
    try:
        n_flows = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("WN."))
        n_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("WN.0.in_layers."))
        in_weight = state["WN.0.in_layers.0.weight"]
        sizes = [state[f"convinv.{k}.conv.weight"].shape[0] for k in range(n_flows)]
        upsample = state["upsample.weight"]
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"state dict does not look like WaveGlow (missing {error})") from None
    drops = [k for k in range(1, n_flows) if sizes[k] < sizes[k - 1]]
    return dict(
        n_mel_channels=int(upsample.shape[0]), n_flows=n_flows, n_group=int(sizes[0]),
        n_early_every=drops[0] if drops else n_flows, n_early_size=int(sizes[0] - sizes[drops[0]]) if drops else 2,
        n_layers=n_layers, n_channels=int(in_weight.shape[0] // 2), kernel_size=int(in_weight.shape[2]),
        upsample_kernel=int(upsample.shape[2]), layout=layout,
    )


def _build(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str) -> WaveGlow:
    """`state` must be normalised (see `_normalise_state`)."""
    try:
        model_config = ModelConfig.from_dict(config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: {error}") from None
    model = WaveGlow(model_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else ""]))
        raise CheckpointError(f"{source}: weights do not match a WaveGlow with {_describe(model_config)}: {detail}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(state[key].shape)} but a WaveGlow with "
                f"{_describe(model_config)} needs {tuple(tensor.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.refresh_inverses()
    return model


def _describe(config: ModelConfig) -> str:
    return (f"n_mel_channels={config.n_mel_channels}, n_flows={config.n_flows}, n_group={config.n_group}, "
            f"n_layers={config.n_layers}, n_channels={config.n_channels}, layout={config.layout}")


def _model_from_pickle(obj: Any, source: str, override: Mapping[str, Any]) -> WaveGlow:
    if isinstance(obj, dict) and isinstance(obj.get("model"), PickledObject):
        obj = obj["model"]
    if isinstance(obj, PickledObject):
        if not obj.pickled_name.endswith(".WaveGlow"):
            raise CheckpointError(f"{source}: expected a pickled WaveGlow, found {obj.pickled_name}")
        return _build(_normalise_state(_module_state(obj)), {**_config_from_pickled(obj), **override}, source)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        config = obj.get("config") or {}
        if isinstance(config, PickledObject):  # an argparse.Namespace
            config = dict(config.__dict__)
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        config, state = {}, obj
    else:
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: not a WaveGlow checkpoint: expected a pickled model under 'model', "
                              f"a 'state_dict', or a state dict of tensors; found {keys}")
    layout = "glow_old" if any(".cond_layers." in k for k in state) else "glow"
    state = _normalise_state(state)
    known = set(ModelConfig.__dataclass_fields__) | {"WN_config"}
    config = {k: v for k, v in dict(config).items() if k in known}
    return _build(state, {**_config_from_state(state, layout), **config, **override}, source)


# --- our format ---------------------------------------------------------------------------------

def save_waveglow(model: WaveGlow, path: str | Path, dtype: torch.dtype = torch.float32,
                  stft: STFTConfig = STFTConfig()) -> Path:
    """Write `model` as safetensors (+ JSON config in the header); `.gz` suffix compresses it."""
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("W_inverse")}
    # one metadata key: safetensors writes several in hash order, and we want byte-identical files
    info = {"version": FORMAT_VERSION, "model_config": model.config.to_dict(), "stft_config": stft.to_dict()}
    data = save_safetensors(state, metadata={FORMAT_NAME: json.dumps(info, sort_keys=True)})
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return atomic_write_bytes(path, data)


def _load_safetensors(data: bytes, source: str, override: Mapping[str, Any]) -> WaveGlow:
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + header_len])
        state = load_safetensors(data)
    except Exception as error:
        raise CheckpointError(f"{source}: unreadable safetensors file (truncated or corrupt?): {error}") from None
    info = _our_metadata(header)
    state = _normalise_state(state)
    config = info["model_config"] if "model_config" in info else _config_from_state(state)
    return _build(state, {**config, **override}, source)


def read_stft_config(path: str | Path | None = None) -> STFTConfig:
    """The STFT settings stored with a model in our format (defaults for other formats)."""
    data = _read_bytes(Path(path) if path else DEMO_MODEL_PATH)
    if not _is_safetensors(data):
        return STFTConfig()
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    return STFTConfig(**_our_metadata(header).get("stft_config", {}))


def _our_metadata(header: Mapping[str, Any]) -> dict[str, Any]:
    stored = (header.get("__metadata__") or {}).get(FORMAT_NAME)
    return json.loads(stored) if stored else {}


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputNotFound(f"checkpoint not found: {path}", path=path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise CheckpointError(f"{path}: corrupt gzip file: {error}") from None
    return data


# --- entry point ------------------------------------------------------------------------------------

def load_waveglow(checkpoint: str | Path | None = None, config: ModelConfig | Mapping[str, Any] | None = None,
                  device: str | torch.device = "cpu") -> WaveGlow:
    """Load a WaveGlow in eval mode; `checkpoint=None` gives the bundled (untrained) demo model.

    `config` overrides or fills in hyper-parameters the checkpoint does not carry.
    """
    path = Path(checkpoint) if checkpoint is not None else DEMO_MODEL_PATH
    override = config.to_dict() if isinstance(config, ModelConfig) else dict(config or {})
    data = _read_bytes(path)
    if not data:
        raise CheckpointError(f"{path}: empty file")
    if _is_safetensors(data):
        model = _load_safetensors(data, str(path), override)
    elif data[:2] == b"PK" or data[:1] == b"\x80":  # torch zip archive, or a legacy pickle stream
        model = _model_from_pickle(_torch_load_restricted(data, str(path)), str(path), override)
    else:
        raise CheckpointError(f"{path}: not a WaveGlow checkpoint (expected a torch .pt/.pth file or "
                              "safetensors written by save_waveglow)")
    return model.to(device).eval()


def model_fingerprint(model) -> str:
    """16 hex digits of sha256 over the config and every weight: what derived artefacts are stamped with."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
