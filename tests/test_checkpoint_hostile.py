"""Hostile and broken checkpoints, each built here: every one is refused with a CheckpointError that names the
file, without running the file's code, without a traceback from deeper down and without a large allocation."""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Tuple

import pytest
import torch

from waveglow_lib import checkpoint, safe_reader
from waveglow_lib.checkpoint import expected_shapes, load_waveglow, read_stft_config, save_waveglow
from waveglow_lib.config import ModelConfig
from waveglow_lib.errors import CheckpointError, MelError
from waveglow_lib.model import WaveGlow
from waveglow_lib.safe_reader import load_tensor_file

from support import TINY, ReferenceModules, make_reference

REAL_JIT_LOAD = torch.jit.load


@pytest.fixture(autouse=True)
def no_code_running_loader(monkeypatch):
    """The loaders that can run a file's code must never be reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a loader that can execute code was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)


def refused(path: Path, match: str, **kwargs) -> CheckpointError:
    """load_waveglow(path) raises exactly CheckpointError, naming the file, with `match` in its message."""
    with pytest.raises(CheckpointError, match=match) as info:
        load_waveglow(path, **kwargs)
    assert type(info.value) is CheckpointError
    assert str(path) in str(info.value) and info.value.path == path
    assert "\n" not in str(info.value)  # one line
    return info.value


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture
def never_builds(monkeypatch):
    """Fails the test if a WaveGlow is constructed (the checks must come first)."""
    def spy(*args, **kwargs):
        raise AssertionError("a WaveGlow was built before the checkpoint was validated")

    monkeypatch.setattr(checkpoint, "WaveGlow", spy)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in WaveGlow(ModelConfig(**TINY)).state_dict().items() if "W_inverse" not in k}


def safetensors_bytes(state: dict[str, torch.Tensor], info: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={checkpoint.FORMAT_NAME: json.dumps(info)} if info is not None else None)


# --- code execution: TorchScript, foreign archives, bare pickles ---------------------------------------

class MarkerOnLoad(torch.nn.Module):
    """TorchScript module whose __setstate__ (run by torch.jit.load) creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        created = torch.from_file(self.marker, True, 1)  # shared=True creates the file
        self.training = bool(created.numel() == 1) and state[1]


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_archive_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(MarkerOnLoad(str(marker))), str(path))
    assert not marker.exists()
    refused(path, "TorchScript")
    gz = tmp_path / "scripted.pt.gz"
    gz.write_bytes(zlib.compress(path.read_bytes(), wbits=31))
    refused(gz, "TorchScript")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_tensor_file(path)
    assert not marker.exists()
    # the control: the archive does run its code when torch loads it
    REAL_JIT_LOAD(str(path))
    assert marker.exists()


def _zip_with(tmp_path, extra: dict[str, bytes]) -> Path:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    path = tmp_path / "extra.pt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        for name, data in extra.items():
            target.writestr(name, data)
    return path


@pytest.mark.parametrize("member", ["archive/extra/hook.py", "archive/constants.pkl", "archive/code/x.py",
                                    "other/data.pkl", "archive/data/../../evil"])
def test_zip_with_members_torch_save_never_writes_is_refused(tmp_path, member):
    path = _zip_with(tmp_path, {member: b"x"})
    refused(path, "refused: ")


class _Exploit:
    """Unpickling it creates `marker` (builtins.open in write mode)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save(obj, path: Path, legacy: bool = False) -> Path:
    with open(path, "wb") as file:
        torch.serialization.save(obj, file, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_exploit_pickles_in_both_torch_formats_are_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = _save({"state_dict": {"x": _Exploit(marker)}}, tmp_path / "evil.pt", legacy)
    refused(path, r"refused to unpickle global '(io|builtins)\.open'")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    refused(raw, "bare pickle stream")
    assert not marker.exists()


def test_tensor_files_refuse_anything_but_tensors(tmp_path):
    tensor = _save(torch.arange(6.0).reshape(2, 3), tmp_path / "mel.pt")
    assert torch.equal(load_tensor_file(tensor), torch.arange(6.0).reshape(2, 3))
    named = _save({"mel": torch.ones(2)}, tmp_path / "mels.pt", legacy=True)
    assert torch.equal(load_tensor_file(named)["mel"], torch.ones(2))
    st = tmp_path / "mels.safetensors"
    st.write_bytes(safetensors_bytes({"mel": torch.ones(3)}))
    assert torch.equal(load_tensor_file(st)["mel"], torch.ones(3))
    with ReferenceModules() as ref:  # a pickled module is fine in a checkpoint, not in a tensor file
        module = _save(ref.glow.Invertible1x1Conv(2), tmp_path / "module.pt")
    for path, message in [(module, "refused.*glow.Invertible1x1Conv"),
                          (_save({"mel": [1.0, 2.0]}, tmp_path / "list.pt"), "expected a tensor or a dict"),
                          (_save({"x": _Exploit(tmp_path / "m")}, tmp_path / "evil.pt"), "refused")]:
        with pytest.raises(MelError, match=message) as info:
            load_tensor_file(path, error=MelError)
        assert str(path) in str(info.value)
    assert not (tmp_path / "m").exists()


# --- bounded resources --------------------------------------------------------------------------------

def test_gzip_bomb_stops_at_the_size_its_header_declares(tmp_path):
    head = safetensors_bytes({"w": torch.zeros(4)})
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 24)
    chunks = [packer.compress(head)] + [packer.compress(zeros) for _ in range(32)] + [packer.flush()]
    path = tmp_path / "bomb.safetensors.gz"
    path.write_bytes(b"".join(chunks))
    del zeros, chunks
    assert path.stat().st_size < (512 << 20) // 100  # 512 MiB inflated, a few MB on disk
    before = resident_bytes()
    refused(path, f"inflates to more than the {len(head)} bytes its safetensors header declares")
    assert resident_bytes() - before < 128 << 20


def test_gzip_of_anything_else_stops_at_the_absolute_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_reader, "MAX_FILE_BYTES", 1 << 20)
    path = tmp_path / "zeros.pt.gz"
    path.write_bytes(zlib.compress(bytes(8 << 20), wbits=31))
    refused(path, f"inflates to more than {1 << 20} bytes")
    big = tmp_path / "big.pt"
    big.write_bytes(bytes((1 << 20) + 1))
    refused(big, "more than the 1048576 a checkpoint may have")


def _run_with_deadline(function, seconds: float = 120.0):
    """Run `function` in a thread; the test fails (instead of hanging) if it does not finish."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 (handed back to the test)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome


def _pickled_model_with(tmp_path, name: str, change) -> Path:
    """A pickled NVIDIA-layout WaveGlow, as train.py saves it, after `change(model)`."""
    path = tmp_path / name
    config = dict(TINY)
    wn_config = {k: config.pop(k) for k in ("n_layers", "n_channels", "kernel_size")}
    torch.manual_seed(3)
    with ReferenceModules() as ref:  # importable while pickling only
        model = ref.glow.WaveGlow(WN_config=wn_config, **config)
        change(model)
        _save({"model": model, "iteration": 1}, path)
    return path


def test_module_graph_shared_as_a_dag_of_2_to_the_40_paths_is_refused_quickly(tmp_path):
    def add_dag(model):
        node = torch.nn.ModuleList()
        for _ in range(40):  # each level holds the one below twice: 2**40 paths to the bottom
            node = torch.nn.ModuleList([node, node])
        model._modules["dag"] = node

    path = _pickled_model_with(tmp_path, "dag.pt", add_dag)
    plain = _pickled_model_with(tmp_path, "plain.pt", lambda model: None)
    assert path.stat().st_size - plain.stat().st_size < 64 << 10  # pickle's memo keeps the DAG small
    outcome = _run_with_deadline(lambda: load_waveglow(path))
    error = outcome.get("error")
    assert type(error) is CheckpointError and str(path) in str(error)
    assert "refused: " in str(error) and "module" in str(error)


def test_shared_module_and_cycle_are_refused(tmp_path):
    def share(model):
        model._modules["again"] = model.WN[0]

    def loop(model):
        model.WN[1]._modules["back"] = model.WN

    refused(_pickled_model_with(tmp_path, "shared.pt", share), "reached twice")
    outcome = _run_with_deadline(lambda: load_waveglow(_pickled_model_with(tmp_path, "cycle.pt", loop)))
    assert type(outcome.get("error")) is CheckpointError and "reached twice" in str(outcome["error"])


def test_header_declaring_100000_channels_is_refused_before_any_allocation(tmp_path, never_builds):
    huge, big = tmp_path / "huge.safetensors", tmp_path / "big.safetensors"
    huge.write_bytes(safetensors_bytes(tiny_state(), {"model_config": {**TINY, "n_channels": 100_000}}))
    # within the limits, but not what the tensors hold: their shapes say so, still before building
    big.write_bytes(safetensors_bytes(tiny_state(), {"model_config": {**TINY, "n_channels": 2048}}))
    before = resident_bytes()
    refused(huge, r"n_channels=100000 \(at most 4096\)")
    refused(big, r"'WN.0.start.weight' has shape \(16, 4, 1\) but .*n_channels=2048.* needs \(2048, 4, 1\)")
    assert resident_bytes() - before < 256 << 20  # a 100,000-channel WaveGlow would need about 240 GB


def test_pickled_hyper_parameters_beyond_limits_are_refused(tmp_path, never_builds):
    path = _pickled_model_with(tmp_path, "flows.pt", lambda m: setattr(m, "n_flows", 10**9))
    refused(path, r"n_flows=1000000000 \(at most 64\)")
    path = _pickled_model_with(tmp_path, "text.pt", lambda m: setattr(m, "n_group", "8" * 5000))
    refused(path, "lacks an expected attribute")


def test_config_override_beyond_limits_is_refused(tmp_path, never_builds):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(tiny_state(), {"model_config": TINY}))
    refused(path, r"n_layers=40 \(at most 16\)", config={"n_layers": 40})


class _View:
    """Pickles as a tensor of `size` elements over a one-element storage (stride 0)."""

    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        storage = torch.zeros(1).untyped_storage()
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        return (torch._utils._rebuild_tensor_v2,
                (typed, 0, (self.size,), (0,), False, collections.OrderedDict()))


@pytest.mark.parametrize("legacy", [False, True])
def test_tensor_larger_than_its_storage_is_refused(tmp_path, legacy):
    path = _save({"upsample.weight": _View(10**12)}, tmp_path / "view.pt", legacy)
    refused(path, "does not fit its storage")


def test_legacy_storage_declaring_more_than_the_file_holds_is_refused(tmp_path):
    data = _save({"w": torch.zeros(3)}, tmp_path / "w.pt", legacy=True).read_bytes()
    at = data.index(b"X\x03\x00\x00\x00cpu")
    count = data.index(b"K\x03", at)  # BININT1 3: the storage's element count
    path = tmp_path / "huge_storage.pt"
    path.write_bytes(data[:count] + b"J" + struct.pack("<i", 2**30) + data[count + 2:])
    refused(path, "declares 1073741824 elements, more than the file holds")


# --- what the weights are --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("not a tensor", r"weight 'WN.0.start.weight' is a str, expected a tensor"),
    (torch.zeros(16, 4, 1, dtype=torch.int32), "has dtype torch.int32, expected floating point"),
])
def test_non_tensor_or_non_float_weight_is_refused(tmp_path, value, message):
    state = tiny_state()
    state["WN.0.start.weight"] = value
    path = _save({"state_dict": state, "config": {}}, tmp_path / "dle.pt")
    refused(path, message)


def test_non_tensor_weight_inside_a_pickled_module_is_refused(tmp_path):
    def text_weight(model):
        model.upsample._parameters["bias"] = "zeros"

    def list_params(model):
        model.upsample.__dict__["_parameters"] = ["weight"]

    refused(_pickled_model_with(tmp_path, "text.pt", text_weight), "weight 'upsample.bias' is a str")
    refused(_pickled_model_with(tmp_path, "list.pt", list_params), r"_parameters is a list, expected a dict")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("form", ["bare", "safetensors", "pickled"])
def test_nan_or_inf_weights_are_blamed_on_the_checkpoint(tmp_path, bad, form):
    path = tmp_path / f"{form}.pt"
    if form == "pickled":
        def poison(model):
            with torch.no_grad():
                model.WN[1].end.weight[0, 0, 0] = bad
        path = _pickled_model_with(tmp_path, "poisoned.pt", poison)
        key = "WN.1.end.weight"
    else:
        state = tiny_state()
        state["WN.2.end.bias"][1] = bad
        key = "WN.2.end.bias"
        if form == "bare":
            _save(state, path)
        else:
            path.write_bytes(safetensors_bytes(state, {"model_config": TINY}))
    refused(path, f"weight '{key}' holds NaN or Inf values")


def test_singular_1x1_convolution_and_zero_weight_norm_are_refused(tmp_path):
    state = tiny_state()
    state["convinv.0.conv.weight"].zero_()
    path = _save(state, tmp_path / "singular.pt")
    refused(path, "convinv.0.*singular|singular.*convinv")

    def zero_norm(model):
        with torch.no_grad():
            model.WN[0].start.weight_g.zero_()
            model.WN[0].start.weight_v.zero_()
    refused(_pickled_model_with(tmp_path, "zero_norm.pt", zero_norm), "NaN or Inf once loaded")


def test_expected_shapes_match_the_model(tiny_config):
    for config in (tiny_config, ModelConfig(**{**TINY, "layout": "glow_old", "n_early_every": 3})):
        model = WaveGlow(config)
        actual = {k: tuple(v.shape) for k, v in model.state_dict().items() if "W_inverse" not in k}
        assert expected_shapes(config) == actual


# --- truncated and corrupt files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One good file per format (built once: the reference model is the slow part)."""
    folder = tmp_path_factory.mktemp("good")
    make_reference("glow", seed=4, save_to=folder / "zip.pt")
    make_reference("glow", seed=4, save_to=folder / "legacy.pt", legacy_format=True)
    model = checkpoint._model_from_pickle(
        safe_reader.read_pickled((folder / "zip.pt").read_bytes(), "zip.pt", checkpoint.WAVEGLOW_PICKLE), "zip.pt", {})
    save_waveglow(model, folder / "ours.safetensors")
    save_waveglow(model, folder / "ours.safetensors.gz")
    return folder


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt", "ours.safetensors", "ours.safetensors.gz"])
@pytest.mark.parametrize("keep", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files_are_refused(saved, tmp_path, name, keep):
    data = (saved / name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: max(1, int(len(data) * keep))])
    refused(cut, "truncated|corrupt|not a WaveGlow checkpoint|cut short|ends early")


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt", "ours.safetensors"])
def test_flipped_bytes_in_the_weights_are_refused_or_caught(saved, tmp_path, name):
    """A byte flipped in the weight data: the zip's CRC catches it; the other formats have no checksum,
    so the result must either be refused or load as finite weights (never a traceback)."""
    data = bytearray((saved / name).read_bytes())
    data[int(len(data) * 0.6)] ^= 0xFF
    path = tmp_path / f"flipped_{name}"
    path.write_bytes(bytes(data))
    if name == "zip.pt":
        refused(path, "corrupt|CRC")
    else:
        try:
            model = load_waveglow(path)
        except CheckpointError as error:
            assert str(path) in str(error)
        else:
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_directory_and_not_json_metadata_are_refused(tmp_path):
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    refused(folder, "not a regular file")
    path = tmp_path / "meta.safetensors"
    from safetensors.torch import save

    path.write_bytes(save(tiny_state(), metadata={checkpoint.FORMAT_NAME: "{not json"}))
    refused(path, "metadata is not a JSON object")
    path.write_bytes(safetensors_bytes(tiny_state(), {"model_config": [1, 2]}))
    refused(path, "'model_config' in the header is a list")
    path.write_bytes(safetensors_bytes(tiny_state(), {"model_config": TINY, "stft_config": {"hop_length": -1}}))
    with pytest.raises(CheckpointError, match="stft_config") as info:
        read_stft_config(path)
    assert str(path) in str(info.value)
