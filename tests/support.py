"""What the tests share besides fixtures: tiny model configs and the one tiny-model builder, NVIDIA-layout
reference models (tests/reference/), an uncapped SNR, random batches, and the ais_bench contract double.
Fixtures (built once per session) live in conftest.py."""
from __future__ import annotations

import importlib
import json
import secrets
import socket
import subprocess
import sys
import time
import types
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from waveglow_lib.config import ModelConfig
from waveglow_lib.model import WaveGlow

REFERENCE_DIR = Path(__file__).parent / "reference"

#: small enough for fast tests, big enough to exercise early outputs, odd flows and dilations
TINY = dict(n_mel_channels=80, n_flows=6, n_group=8, n_early_every=2, n_early_size=2,
            n_layers=3, n_channels=16, kernel_size=3)


def randomise_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter (WN `end` convs included, which NVIDIA zero-initialises) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "convinv" in name:
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) * scale / fan_in ** 0.5)
    return module


class ReferenceModules:
    """Imports tests/reference/glow.py (+ glow_old.py) as top-level `glow`/`glow_old`, then removes them."""

    def __enter__(self):
        sys.path.insert(0, str(REFERENCE_DIR))
        self.glow = importlib.import_module("glow")
        self.glow_old = importlib.import_module("glow_old")
        return self

    def __exit__(self, *exc):
        sys.path.remove(str(REFERENCE_DIR))
        for name in ("glow", "glow_old"):
            sys.modules.pop(name, None)


def make_reference(layout: str = "glow", seed: int = 0, save_to: Path | None = None,
                   legacy_format: bool = False, before_save=None, **overrides):
    """A randomised NVIDIA-layout WaveGlow (glow or glow_old) built from the test stand-in classes.

    With `save_to`, it is also saved like NVIDIA's train.py does ({"model": ..., "optimizer": ...}),
    while the stand-in modules are importable (pickle needs them at save time, never at load time).
    """
    cfg = {**TINY, **overrides}
    wn = {k: cfg.pop(k) for k in ("n_layers", "n_channels", "kernel_size")}
    torch.manual_seed(seed)
    with ReferenceModules() as ref:
        cls = ref.glow.WaveGlow if layout == "glow" else ref.glow_old.WaveGlow
        model = cls(WN_config=wn, **cfg)
        randomise_(model, seed)
        with torch.no_grad():  # make the 1x1 convs non-orthogonal so their inverse matters
            for conv in model.convinv:
                w = conv.conv.weight
                w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
        if save_to is not None:
            if before_save is not None:
                before_save(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            torch.save({"model": model, "iteration": 580000, "optimizer": optimizer.state_dict(),
                        "learning_rate": 1e-4}, save_to, _use_new_zipfile_serialization=not legacy_format)
        return model.eval()


def snr_db(reference, estimate) -> float:
    """SNR in dB of two arrays or tensors of the same shape (any batch layout), uncapped."""
    reference = np.asarray(torch.as_tensor(reference).detach().double().cpu())
    estimate = np.asarray(torch.as_tensor(estimate).detach().double().cpu())
    assert reference.shape == estimate.shape, (reference.shape, estimate.shape)
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-300)))


def tiny_waveglow(config: ModelConfig | dict | None = None, *, seed: int = 0, layout: str | None = None,
                  scale: float = 0.3) -> WaveGlow:
    """THE tiny-model builder: a WaveGlow of `config` (default TINY_PIPELINE; a dict is read as ModelConfig
    keys) with every weight random (WN end convs included), inverses refreshed, in eval mode."""
    if config is None:
        config = TINY_PIPELINE
    if isinstance(config, dict):
        config = ModelConfig(**config)
    if layout is not None:
        config = ModelConfig(**{**config.to_dict(), "layout": layout})
    torch.manual_seed(seed)
    model = randomise_(WaveGlow(config), seed=seed, scale=scale)
    model.refresh_inverses()
    return model.eval()


#: tiny but complete: early outputs, two dilations, odd and even flows
TINY_PIPELINE = ModelConfig(n_flows=4, n_group=8, n_early_every=2, n_early_size=2, n_layers=2,
                            n_channels=16, kernel_size=3)
#: demo-corpus utterances used by the stage tests (the guide's order: LJ001-0001..0003)
LIMIT = 3
#: the short demo utterances (125, 281, 99 frames) the infer/backend tests vocode, to keep them fast
SHORT_IDS = ("LJ001-0002", "LJ001-0006", "LJ001-0008")

def random_batch(batch: int, frames: int, seed: int = 0, config: ModelConfig = TINY_PIPELINE):
    """A mel around typical log-mel values and sigma-0.6 noise, float32."""
    rng = np.random.default_rng(seed)
    mel = (rng.standard_normal((batch, config.n_mel_channels, frames)) - 5.0).astype(np.float32)
    z = (0.6 * rng.standard_normal((batch, config.n_group, frames * config.hop_length // config.n_group)))
    return mel, z.astype(np.float32)


# --- a stand-in for ais_bench (contract tests: there is no NPU here) -------------------------------
class FakeInferSession:
    """Contract test double for `ais_bench.infer.interface.InferSession` (no NPU here): it checks the
    documented call shapes (`InferSession(device_id, model_path)`, `infer(feeds, mode="dymdims")` with
    a list of arrays in input order) and computes the answer with the tiny torch model."""

    instances: list = []
    old_api = False

    def __init__(self, device_id, model_path):
        assert isinstance(device_id, int) and isinstance(model_path, str)
        self.device_id, self.model_path = device_id, model_path
        self.calls, self.times, self.released = [], [], None
        self.model = tiny_waveglow(TINY_PIPELINE)
        FakeInferSession.instances.append(self)
        if self.old_api:  # older releases: sumary() and free_resource() only
            self.sumary, self.free_resource = self._summary, lambda: self._release("free_resource")
        else:
            self.summary, self.finalize = self._summary, lambda: self._release("finalize")

    def infer(self, feeds, mode="static"):
        assert isinstance(feeds, list) and len(feeds) == 2 and mode == "dymdims"
        mel, z = feeds
        assert mel.dtype == np.float32 and z.dtype == np.float32
        self.calls.append((mel.shape, z.shape))
        self.times.append(1.5 * len(self.calls))
        with torch.no_grad():
            return [self.model.infer(torch.from_numpy(mel), 1.0, torch.from_numpy(z)).numpy()]

    def _summary(self):
        return types.SimpleNamespace(exec_time_list=list(self.times))

    def _release(self, how):
        self.released = how


def install_fake_ais_bench(monkeypatch) -> type:
    """Put FakeInferSession behind `from ais_bench.infer.interface import InferSession`."""
    interface = types.ModuleType("ais_bench.infer.interface")
    interface.InferSession = FakeInferSession
    for name, module in {"ais_bench": types.ModuleType("ais_bench"),
                         "ais_bench.infer": types.ModuleType("ais_bench.infer"),
                         "ais_bench.infer.interface": interface}.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeInferSession.instances.clear()
    FakeInferSession.old_api = False
    return FakeInferSession


def optional_ray(*submodules: str):
    """(ray or None, a skipif mark) for tests of the `ray` extra (not in `.[all]`); sets the start-up
    tolerance engines.ray uses for a Ray it starts, since these tests start Ray themselves."""
    import os

    import pytest

    from waveglow_lib.engines.ray import LOCAL_RAY_ENV

    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    try:
        ray = importlib.import_module("ray")
        for name in submodules:
            importlib.import_module(name)
    except ImportError:
        ray = None
    reason = f"{', '.join(('ray',) + submodules)} not installed: pip install 'waveglow-workflow[ray]' (not in .[all])"
    return ray, pytest.mark.skipif(ray is None, reason=reason)


# --- JupyterLab on 127.0.0.1 (the notebook and browser tests) --------------------------------------
@dataclass
class JupyterLabServer:
    proc: subprocess.Popen
    port: int
    base: str
    token: str
    log: Any


def start_jupyterlab(root: Path, env: dict, log_path: Path, *, timeout: float = 60,
                     new_session: bool = False) -> JupyterLabServer:
    """`jupyter lab` of this interpreter serving `root` on a free 127.0.0.1 port with a random token, once
    its API answers; RuntimeError with the end of its log when it exits or does not answer in `timeout`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("jupyter-lab")), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--allow-root"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return JupyterLabServer(proc, port, base, token, log)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not start:\n{Path(log_path).read_text()[-3000:]}") from None
            time.sleep(0.3)


#: run in a fresh interpreter by `memory_by_size`: `measure(size)` runs `work(size)` and records the
#: process's peak RSS (ru_maxrss) and the peak of what Python and numpy allocated (tracemalloc; torch's own
#: buffers are not traced) while it ran
_MEMORY_PROBE = """
import json, resource, sys, tracemalloc
def _rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
{setup}
work({warm})  # imports, caches, first-call allocations: before the baseline
base = _rss()
found = []
for size in {sizes!r}:
    tracemalloc.start()
    work(size)
    found.append({{"size": size, "rss": _rss(), "rss_growth": _rss() - base,
                  "traced_peak": tracemalloc.get_traced_memory()[1]}})
    tracemalloc.stop()
print("MEMORY " + json.dumps(found))
"""


def memory_by_size(setup: str, sizes: list[int], warm: int, *, cwd: Path | None = None,
                   timeout: float = 600) -> list[dict]:
    """Peak memory of `work(size)` for each size, in ONE fresh interpreter (`setup` defines `work`; sizes
    in increasing order): [{"size", "rss" (the peak so far), "rss_growth" (peak RSS above the warmed-up
    baseline: ru_maxrss only grows, so a later size shows only what it needed beyond the earlier ones),
    "traced_peak"}]."""
    script = _MEMORY_PROBE.format(setup=setup, sizes=list(sizes), warm=warm)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or Path(__file__).parent)
    line = next((x for x in done.stdout.splitlines() if x.startswith("MEMORY ")), None)
    assert done.returncode == 0 and line, done.stderr[-3000:]
    return json.loads(line[len("MEMORY "):])
