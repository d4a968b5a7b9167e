"""Engines: the infer stage on a real local Ray (Ray Data actor pool) gives the local engine's bytes, for
every backend that runs here; a rerun skips finished items; an actor killed mid-run loses and duplicates
nothing; a two-node cluster (ray.cluster_utils.Cluster) is driven through `ray_address`. The om backend's
NPU request is a contract test (no NPU here): it checks what the engine asks Ray Data for.

Real-Ray tests are `e2e` (each starts actors, tens of seconds on a small machine) and skip when ray is
not installed (`pip install 'waveglow-workflow[ray]'`, part of `.[all]`). The vocode command on Ray (a
folder of TTS mels) gives the local engine's wavs byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from support import TINY_PIPELINE, optional_ray
from waveglow_lib import engines, stages
from waveglow_lib.cli import main
from waveglow_lib.engines import ray as ray_engine
from waveglow_lib.engines.ray import with_startup_retries
from waveglow_lib.errors import ConfigError, SynthesisError
from waveglow_lib.hardware import native_int8
from waveglow_lib.jobs import ManifestMelReader, mel_folder_items
from waveglow_lib.mel_input import save_mel
from waveglow_lib.stages.infer import manifest_items, prepare_infer
from waveglow_lib.stages.preprocess import preprocess

ray, needs_ray = optional_ray("ray.data")
DEMO_IDS = [f"LJ001-{i:04d}" for i in range(1, 11)]


@pytest.fixture(scope="module")
def demo_mels(tmp_path_factory, make_cfg) -> Path:
    """The whole demo corpus preprocessed once (10 utterances)."""
    runs = tmp_path_factory.mktemp("demo_mels")
    preprocess(make_cfg(runs, corpus="demo", limit=0))
    return runs / "t" / "mel"


@pytest.fixture
def demo_run(demo_mels, make_cfg, tiny_onnx):
    """demo_run(runs_dir, **overrides): a run folder holding the demo mels and the tiny model's ONNX."""
    def make(runs_dir: Path, **overrides):
        cfg = make_cfg(runs_dir, corpus="demo", limit=0, batch_size=3, **overrides)
        shutil.copytree(demo_mels, cfg.run_dir / "mel")
        (cfg.run_dir / "onnx").mkdir(parents=True)
        for suffix in (".onnx", ".json"):
            shutil.copy2(tiny_onnx.with_suffix(suffix), cfg.run_dir / "onnx" / f"waveglow{suffix}")
        return cfg
    return make


@pytest.fixture
def local_ray():
    """A real local Ray with 2 CPUs, started once and shared by the tests that ask for it."""
    if not ray.is_initialized():  # bounded retries, as `connect` has: a loaded machine can miss Ray's 30 s
        with_startup_retries(lambda: ray.init(
            num_cpus=2, include_dashboard=False, configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(engines.__file__).resolve().parents[2])}}))
    yield ray


def out_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*_out.bin"))}


# --- contract tests: what the engine asks Ray for (no Ray needed) ---------------------------------------
def test_a_ray_start_that_timed_out_is_tried_again_a_bounded_number_of_times():
    """Contract test (Ray's start-up mocked): Ray raises a bare Exception("... timed out during startup ...")
    when a loaded machine misses its fixed 30 s; `connect` and the tests' Ray try again, at most 3 times."""
    calls = []

    def start(failures: int, message: str = "The current node timed out during startup."):
        def attempt():
            calls.append(1)
            if len(calls) <= failures:
                raise Exception(message)  # noqa: TRY002 (what Ray raises)
            return "started"
        calls.clear()
        return attempt

    assert with_startup_retries(start(2)) == "started" and len(calls) == 3
    with pytest.raises(Exception, match="timed out during startup"):
        with_startup_retries(start(3))
    assert len(calls) == 3
    with pytest.raises(Exception, match="port in use"):
        with_startup_retries(start(1, "port in use"))
    assert len(calls) == 1  # other errors are not retried


def test_actors_request_cpus_and_one_npu_for_om(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, ray_cpus_per_actor=2)
    assert ray_engine.actor_resources(cfg, "fast") == {"num_cpus": 2}
    assert ray_engine.actor_resources(cfg, "om") == {"num_cpus": 2, "resources": {"NPU": 1}}
    assert ray_engine.pool_size(cfg, "om", {"CPU": 16.0, "NPU": 8.0}, n_batches=20) == 8
    assert ray_engine.pool_size(cfg, "fast", {"CPU": 16.0}, n_batches=20) == 8
    assert ray_engine.pool_size(cfg, "fast", {"CPU": 16.0}, n_batches=3) == 3
    with pytest.raises(ConfigError, match="no NPU resource"):
        ray_engine.pool_size(cfg, "om", {"CPU": 16.0}, n_batches=3)


def test_om_pool_contract_with_ray_data(demo_run, tmp_path, monkeypatch):
    """Contract test (Ray Data stubbed): an om run builds one actor per NPU, each requesting {"NPU": 1}."""
    cfg = demo_run(tmp_path, backend="om", engine="ray", device="npu:0")
    calls = {}

    class Dataset:
        def map_batches(self, fn, **kwargs):
            calls.update(kwargs, fn=fn)
            return self

        def iter_rows(self):
            return iter(())

    class Data:
        @staticmethod
        def from_items(rows, override_num_blocks):
            calls["rows"] = rows
            return Dataset()

    class Ray:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0, "NPU": 2.0}

    monkeypatch.setattr(ray_engine, "connect", lambda address: Ray)
    monkeypatch.setattr(ray_engine, "import_ray_data", lambda: Data)
    job = prepare_infer(cfg, name="om", engine="ray")
    with pytest.raises(SynthesisError, match="no audio for"):  # the stub returns nothing
        engines.run_job(cfg, job)
    assert calls["resources"] == {"NPU": 1} and calls["num_cpus"] == 1
    assert calls["concurrency"] == 2 and calls["batch_size"] == 1 and calls["fn"] is ray_engine.VocodeActor
    assert calls["fn_constructor_kwargs"]["backend"] == "om"
    # rows are the local engine's plan: batches of 3, longest first
    planned = [json.loads(r["items"]) for r in calls["rows"]]
    assert [len(b) for b in planned] == [3, 3, 3, 1]
    frames = [f for batch in planned for _, f, _ in batch]
    assert frames == sorted(frames, reverse=True)


def test_a_folder_of_tts_mels_is_a_job_like_the_manifest(demo_run, tmp_path):
    """The API a stage with other inputs uses (items + read_mel): .npy mels give the manifest's outputs."""
    cfg = demo_run(tmp_path / "manifest", backend="fast", precision="fp32")
    folder = tmp_path / "tts"
    folder.mkdir()
    manifest = json.loads(cfg.layout.manifest.read_text())
    for item in manifest_items(cfg.layout.mel_dir, manifest, TINY_PIPELINE)[:3]:
        save_mel(folder / f"{item.id}.npy", ManifestMelReader(80)(item))
    items, read = mel_folder_items(folder)
    job = prepare_infer(cfg, items=items, read_mel=read, out_dir=tmp_path / "tts_out")
    result = engines.run_job(cfg, job)
    assert sorted(result["written"]) == [i.id for i in items]
    job = prepare_infer(cfg, items=items, read_mel=read, out_dir=tmp_path / "tts_out")
    assert job.todo == [] and len(job.skipped) == 3  # a rerun skips them
    reference = stages.infer(cfg)
    for item in items:
        name = f"{item.id}_out.bin"
        assert (tmp_path / "tts_out" / name).read_bytes() == (cfg.layout.out_dir / name).read_bytes()
    assert len(reference["written"]) == 10


def test_unknown_engine_is_refused_by_name(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="engine.*local, ray"):
        make_cfg(tmp_path, engine="spark")


# --- real Ray -------------------------------------------------------------------------------------------
BACKENDS = [("fast", "fp32"), ("fast", "int8"), ("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")]


@needs_ray
@pytest.mark.e2e
@pytest.mark.parametrize("backend,precision", BACKENDS, ids=[f"{b}-{p}" for b, p in BACKENDS])
def test_ray_engine_gives_the_local_engines_bytes(local_ray, demo_run, tmp_path, backend, precision):
    if precision == "int8" and not native_int8():
        pytest.skip("int8 needs VNNI/AMX-INT8 on this CPU")
    if backend == "openvino":
        pytest.importorskip("openvino")
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    local_cfg = demo_run(tmp_path / "local", backend=backend, precision=precision)
    ray_cfg = demo_run(tmp_path / "ray", backend=backend, precision=precision, engine="ray")
    threads = torch.get_num_threads()
    if backend == "torch":  # PyTorch's CPU convolutions split their sums by thread: equal threads, equal bytes
        torch.set_num_threads(ray_cfg.ray_cpus_per_actor)
    try:
        local = stages.infer(local_cfg)
    finally:
        torch.set_num_threads(threads)
    result = stages.infer(ray_cfg)
    assert sorted(result["written"]) == DEMO_IDS and result["repeated_results"] == 0
    expected, got = out_bytes(local_cfg.layout.out_dir), out_bytes(ray_cfg.layout.out_dir)
    assert len(expected) == 10 and got == expected
    timings = json.loads(ray_cfg.layout.timings.read_text())
    assert timings["settings"]["engine"] == "ray" and local["engine"] == "local"
    local_settings = json.loads(local_cfg.layout.timings.read_text())["settings"]
    assert timings["settings"]["precision_used"] == local_settings["precision_used"]
    assert timings["settings"]["backend_used"].split(",")[0] == local_settings["backend_used"].split(",")[0]
    # per-actor throughput: every item attributed to an actor, the actors' counts add up
    workers = timings["workers"]
    assert sum(w["items"] for w in workers.values()) == 10
    assert {item["worker"] for item in timings["items"].values()} == set(workers)
    assert all(w["audio_seconds_per_second"] > 0 for w in workers.values())


@needs_ray
@pytest.mark.e2e
def test_rerun_skips_finished_items_like_local(local_ray, demo_run, tmp_path):
    cfg = demo_run(tmp_path, backend="fast", precision="fp32", engine="ray")
    stages.infer(cfg)
    before = out_bytes(cfg.layout.out_dir)
    again = stages.infer(cfg)  # nothing left: no Ray job at all
    assert again["written"] == [] and sorted(again["skipped"]) == DEMO_IDS
    (cfg.layout.out_dir / "LJ001-0003_out.bin").unlink()
    redo = stages.infer(cfg)
    assert redo["written"] == ["LJ001-0003"] and len(redo["skipped"]) == 9
    assert out_bytes(cfg.layout.out_dir) == before


@needs_ray
@pytest.mark.e2e
def test_vocode_command_on_ray_gives_the_local_wavs(local_ray, demo_run, tmp_path, capsys):
    """`vocode --mels DIR --set engine=ray`: a folder of TTS-style mels (.npy, and a guide .bin with its .txt)
    on the actor pool gives the local engine's wavs byte for byte; per-actor timings; a rerun skips all."""
    source = demo_run(tmp_path / "source", backend="fast", precision="fp32")
    folder = tmp_path / "tts"
    folder.mkdir()
    items = manifest_items(source.layout.mel_dir, json.loads(source.layout.manifest.read_text()), TINY_PIPELINE)
    for item in items[:4]:
        save_mel(folder / f"{item.id}.npy", ManifestMelReader(80)(item))
    shutil.copy2(items[4].bin_path, folder)
    shutil.copy2(items[4].bin_path.with_suffix(".txt"), folder)
    ids = sorted(u.id for u in items[:5])
    local = stages.vocode(demo_run(tmp_path / "local", backend="fast", precision="fp32"), folder)
    assert sorted(local["written"]) == ids
    ray_cfg = demo_run(tmp_path / "ray", backend="fast", precision="fp32")
    argv = ["vocode", "--mels", str(folder), "--runs-dir", ray_cfg.runs_dir, "--name", ray_cfg.name,
            "--checkpoint", ray_cfg.checkpoint, "--backend", "fast", "--precision", "fp32",
            "--set", "engine=ray"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "ray" and sorted(result["written"]) == ids and result["repeated_results"] == 0
    wavs = {p.name: p.read_bytes() for p in sorted(ray_cfg.layout.vocode_dir.glob("*_syn.wav"))}
    expected = {p.name: p.read_bytes() for p in sorted(Path(local["out_dir"]).glob("*_syn.wav"))}
    assert len(wavs) == 5 and wavs == expected
    record = json.loads(ray_cfg.layout.vocode_record.read_text())
    assert record["settings"]["engine"] == "ray"
    assert sum(w["items"] for w in record["workers"].values()) == 5
    assert {entry["worker"] for entry in record["items"].values()} == set(record["workers"])
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["written"] == [] and sorted(again["skipped"]) == ids


@dataclass(frozen=True)
class CrashOnce(ManifestMelReader):
    """Reads mels like the manifest reader, but the first time it reads `victim` it kills its own process
    (a hard crash of the actor mid-batch, as an OOM kill would)."""

    victim: str = ""
    marker: str = ""

    def __call__(self, item):
        if item.id == self.victim and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(item)


@needs_ray
@pytest.mark.e2e
def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(local_ray, demo_run, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import a test module
    cfg = demo_run(tmp_path, backend="fast", precision="fp32", engine="ray")
    marker = tmp_path / "killed"
    items = manifest_items(cfg.layout.mel_dir, json.loads(cfg.layout.manifest.read_text()), TINY_PIPELINE)
    job = prepare_infer(cfg, items=items, read_mel=CrashOnce(80, "LJ001-0005", str(marker)), engine="ray")
    result = engines.run_job(cfg, job)
    assert marker.is_file()  # an actor really died
    assert sorted(result["written"]) == DEMO_IDS and len(result["written"]) == 10
    reference = demo_run(tmp_path / "local", backend="fast", precision="fp32")
    stages.infer(reference)
    assert out_bytes(cfg.layout.out_dir) == out_bytes(reference.layout.out_dir)
    timings = json.loads(cfg.layout.timings.read_text())
    assert sorted(timings["items"]) == DEMO_IDS


@needs_ray
@pytest.mark.e2e
def test_two_nodes_through_ray_address(demo_run, tmp_path):
    """A head and a second node of 1 CPU each (Ray's multi-node-on-one-host utility), reached through
    `ray_address` as a real cluster would be: the work spreads over both nodes, bytes equal local."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test makes its own cluster; the next local_ray starts a fresh one
    cluster = with_startup_retries(lambda: Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                                             "include_dashboard": False}))
    try:
        with_startup_retries(lambda: cluster.add_node(num_cpus=1))
        cluster.wait_for_nodes()
        cfg = demo_run(tmp_path / "two", backend="fast", precision="fp32", engine="ray",
                       ray_address=cluster.address)
        result = stages.infer(cfg)
        assert result["ray_cluster"]["CPU"] == 2.0 and result["ray_actors"] == 2
        assert len(ray.nodes()) == 2
        local = demo_run(tmp_path / "local", backend="fast", precision="fp32")
        stages.infer(local)
        assert out_bytes(cfg.layout.out_dir) == out_bytes(local.layout.out_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
