"""The Ray engine (`engine: ray`): a job's batches (infer, vocode) on a Ray Data actor pool, locally or on a cluster.

The driver (this process) owns the run folder: it plans the batches exactly as the local engine does
(`InferJob.batches`: length-grouped, longest first), hands them to Ray Data as rows, and writes each
result atomically into `out/` and `timings.json` as it streams back (`InferJob.write`), so a rerun skips
finished items exactly like the local engine. Each actor builds one warm backend once
(`jobs.open_backend`, threads = the CPUs it reserved) and runs `jobs.vocode_batch` per
row: the same per-batch work, the same noise per utterance (seed + id), hence the same bytes (for the
torch backend at the same thread count: its CPU convolutions split their sums by thread).

Actors read the mels by path, so on a multi-host cluster the run folder's `mel/` must be on storage every
node sees (the KubeRay example mounts one volume); the outputs travel back through Ray's object store.
An actor that dies is restarted by Ray Data and its batch retried; a result that arrives twice is written
once. The `om` backend's actors each request one `NPU` (Ray's resource name for Ascend; Ray sets
`ASCEND_RT_VISIBLE_DEVICES`, so the actor's device `npu:0` is the NPU it was given).
"""
from __future__ import annotations

import ipaddress
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..batching import Utterance
from ..config import WorkflowConfig
from ..errors import ConfigError, SynthesisError, WaveGlowError, import_optional
from ..jobs import BatchResult, InferJob, VocodeSettings, open_backend, vocode_batch, worker_name

INSTALL = "pip install 'waveglow-workflow[ray]'  (ray[data,serve])"
#: Ray's own settings for a Ray this module starts: on a small, busy machine the raylet's default wait for its
#: metrics agent runs out and the node dies at start-up (docs/benchmarks.md, "Figures behind constants"; a
#: user's environment wins over these)
LOCAL_RAY_ENV = {"RAY_agent_register_timeout_ms": "120000", "RAY_USAGE_STATS_ENABLED": "0"}
#: Ray binds its gRPC servers, agents and metrics endpoints to the node's address, which is the loopback where
#: Ray expects no cluster (its macOS / Windows default, this switch); a Ray started here is this machine's
#: alone, so it gets the loopback too (unless the user's environment sets the switch)
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Ray's resource name for an Ascend NPU (ray.util.accelerators; ray-ascend adds HCCL on top of it)
NPU_RESOURCE = "NPU"


def import_ray(purpose: str = "engine=ray"):
    return import_optional("ray", INSTALL, purpose)


def import_ray_data():
    return import_optional("ray.data", INSTALL, "engine=ray")


@contextmanager
def workflow_errors():
    """A WaveGlowError raised in an actor (a bad mel, NaN audio) comes out as itself, not wrapped by Ray."""
    try:
        yield
    except WaveGlowError:
        raise
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, WaveGlowError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is None:
            raise
        raise cause from exc


@contextmanager
def loopback_node():
    """While Ray starts a local node: its address is 127.0.0.1, so nothing of it listens on other interfaces.
    Ray reads the switch at import (ray_constants) in this process, and from the environment in the processes
    it starts now; both are put back afterwards (the node keeps its address)."""
    if LOOPBACK_SWITCH in os.environ:
        yield
        return
    from ray._private import ray_constants  # private, but the one place Ray reads it

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.pop(LOOPBACK_SWITCH, None)
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved


#: the address Ray Serve binds each replica's inter-deployment gRPC server to, hard-coded (serve/_private/replica.py,
#: `add_port_to_grpc_server(self._server, "[::]:0")`; no setting: ray-project/ray#64544)
SERVE_REPLICA_GRPC_ANY = "[::]:"


def replica_grpc_on_loopback() -> bool:
    """In a Ray Serve replica on a loopback node (the Ray `connect` starts): make the replica's inter-deployment
    gRPC server listen on 127.0.0.1 rather than on every interface. Ray Serve binds it to `[::]:0` with no
    setting, so this wraps the helper its replica module binds with (private, looked up when the replica
    starts that server, which is after the deployment's constructor, where this is called). Its clients
    dial the node's address and port, 127.0.0.1 here, so nothing else changes. On a node with a routable
    address (a cluster) it does nothing. Returns whether the bind is now on loopback."""
    ray = import_ray("serve")
    try:
        if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
            return False
    except ValueError:  # a host name, not an address: not the loopback node `connect` starts
        return False
    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:  # a Ray Serve that binds otherwise: the serve test's listening check says so
        return False
    if getattr(bind, "on_loopback", False):
        return True

    def bind_on_loopback(server, address: str):
        if address.startswith(SERVE_REPLICA_GRPC_ANY):
            address = "127.0.0.1:" + address[len(SERVE_REPLICA_GRPC_ANY):]
        return bind(server, address)

    bind_on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback
    return True


#: Ray's node start-up gives up after a fixed time, which a busy machine can run out (docs/benchmarks.md,
#: "Figures behind constants")
STARTUP_TRIES = 3


def with_startup_retries(start, tries: int = STARTUP_TRIES, stop=None):
    """`start()` (a `ray.init`, a test cluster's node), tried again while Ray says its node "timed out during
    startup", at most `tries` times in all; any other error, and the last timeout, is raised as it is.
    `connect` (infer, vocode, serve on engine ray) and the tests' own Ray start through it.

    A start that failed is stopped before the next try and before its error is raised (issue 38: under load
    each timed-out `ray.init` left a half-started head, 8 processes and ~780 MB for the service's life):
    `stop()` (`ray.shutdown`, which cannot reach a node whose start raised) is called, then every process
    this one started during the attempt (Ray's GCS, raylet, agents, their workers) is ended."""
    for attempt in range(tries):
        before = child_pids()
        try:
            return start()
        except Exception as exc:  # ray raises a bare Exception("... timed out during startup ...")
            started = started_since(before)
            if stop is not None:
                try:
                    stop()
                except Exception:  # noqa: BLE001 (a half-started Ray may fail to shut down: its processes end below)
                    pass
            end_processes(started, wait_s=2.0)
            if "timed out during startup" not in str(exc) or attempt == tries - 1:
                raise


def _psutil():
    import_ray()  # Ray ships psutil (ray/thirdparty_files) and puts it on the path
    return import_optional("psutil", INSTALL, "engine=ray")


def child_pids() -> set[int]:
    """The processes this one has started (and they theirs) so far: what a clean-up must leave alone."""
    return {p.pid for p in _psutil().Process().children(recursive=True)}


def started_since(before: set[int]) -> list:
    """This process's descendants (psutil.Process) that are not in `before` (taken before they could exit and
    leave their own children to init)."""
    return [p for p in _psutil().Process().children(recursive=True) if p.pid not in before]


def end_processes(processes: list, wait_s: float) -> list[str]:
    """Wait up to `wait_s` for `processes` to exit, then end the rest (SIGTERM, then SIGKILL 3 s later);
    returns "pid name" of each one that had to be ended."""
    psutil = _psutil()
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    ended = []
    for sig in ("terminate", "kill"):
        for proc in alive:
            try:
                ended.append(f"{proc.pid} {proc.name()}")
                getattr(proc, sig)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=3)
    return sorted(set(ended))


def connect(address: str | None, *, dashboard: bool = False):
    """Ray, connected: to `address` ("auto", "ray://host:10001", a GCS host:port), or a local Ray started
    now when None: listening on 127.0.0.1 only, with Ray's dashboard (on 127.0.0.1) only if `dashboard`.
    An already connected driver (a notebook, a test's `ray.init`) is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        # workers find this very copy of waveglow_lib (a clone that is not pip-installed); on a cluster
        # whose image has it installed, the path simply does not exist there
        package_parent = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        env = {"env_vars": {"PYTHONPATH": path}}
        if address is None:
            for key, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(key, value)
            with loopback_node():
                with_startup_retries(lambda: ray.init(runtime_env=env, include_dashboard=dashboard,
                                                      dashboard_host="127.0.0.1", configure_logging=False),
                                     stop=ray.shutdown)
        else:
            with_startup_retries(lambda: ray.init(address=address, runtime_env=env, configure_logging=False),
                                 stop=ray.shutdown)
    return ray


def actor_resources(cfg: WorkflowConfig, backend: str) -> dict:
    """What each actor of the pool asks Ray for: CPUs, and one NPU for the om backend."""
    request: dict = {"num_cpus": cfg.ray_cpus_per_actor}
    if backend == "om":
        request["resources"] = {NPU_RESOURCE: 1}
    return request


def pool_size(cfg: WorkflowConfig, backend: str, cluster: dict, n_batches: int) -> int:
    """`ray_actors`, else as many actors as the cluster's CPUs (NPUs for om) hold; never more than batches."""
    if cfg.ray_actors:
        size = cfg.ray_actors
    elif backend == "om":
        size = int(cluster.get(NPU_RESOURCE, 0))
        if size < 1:
            raise ConfigError(f"backend om on engine ray: the Ray cluster has no {NPU_RESOURCE} resource "
                              f"(resources: {sorted(cluster)}); start its nodes on Ascend hosts "
                              "(`ray start --resources='{\"NPU\": 8}'` if Ray does not detect them)")
    else:
        size = int(cluster.get("CPU", 1) // cfg.ray_cpus_per_actor)
    return max(1, min(size, n_batches))


class VocodeActor:
    """One warm backend per actor, built once; each call vocodes one planned batch per input row."""

    def __init__(self, cfg: WorkflowConfig, backend: str, settings: VocodeSettings, model=None, threads: int = 1):
        torch.set_num_threads(threads)
        self.backend = open_backend(cfg, model=model, model_config=settings.model_config, name=backend,
                                    threads=threads)
        self.settings = settings
        self.worker = worker_name()

    def __call__(self, rows: dict) -> dict:
        out: dict[str, list] = {"index": [], "id": [], "audio": [], "meta": []}
        for index, items in zip(rows["index"], rows["items"]):
            batch = [Utterance(i, int(f), Path(p)) for i, f, p in json.loads(items)]
            result = vocode_batch(self.backend, self.settings, batch, self.worker)
            meta = json.dumps({"stats": result.stats, "seconds": result.seconds, "device_ms": result.device_ms,
                               "worker": result.worker, "backend_info": result.backend_info})
            for u, audio in zip(batch, result.audios):
                out["index"].append(int(index))
                out["id"].append(u.id)
                out["audio"].append(np.ascontiguousarray(audio, dtype="<f4").tobytes())
                out["meta"].append(meta)
        return {"index": np.array(out["index"], dtype=np.int64), "id": np.array(out["id"], dtype=object),
                "audio": np.array(out["audio"], dtype=object), "meta": np.array(out["meta"], dtype=object)}


def batch_rows(job: InferJob) -> list[dict]:
    """One row per planned batch: its index and its items (id, frames, mel path) as JSON."""
    return [{"index": index, "items": json.dumps([[u.id, u.frames, str(u.bin_path)] for u in batch])}
            for index, batch in enumerate(job.batches())]


def run(cfg: WorkflowConfig, job: InferJob, *, model=None) -> dict:
    """Run `job`'s batches on a Ray Data actor pool; outputs and timings as the local engine writes them."""
    job.engine = "ray"
    job.start()
    if not job.todo:
        return job.summary()
    ray = connect(cfg.ray_address)
    data = import_ray_data()
    rows = batch_rows(job)
    cluster = ray.cluster_resources()
    actors = pool_size(cfg, job.backend, cluster, len(rows))
    plan = {row["index"]: batch for row, batch in zip(rows, job.batches())}
    dataset = data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        VocodeActor, batch_size=1, concurrency=actors,
        fn_constructor_kwargs={"cfg": cfg, "backend": job.backend, "settings": job.settings, "model": model,
                               "threads": cfg.ray_cpus_per_actor},
        **actor_resources(cfg, job.backend))
    pending: dict[int, dict[str, tuple[bytes, str]]] = {}
    done: set[int] = set()
    repeated = 0
    with tqdm(total=len(job.todo), desc=f"infer on ray ({job.backend}, {actors} actors)", unit="utt") as bar, \
            workflow_errors():
        for row in dataset.iter_rows():
            index = int(row["index"])
            if index in done:  # a retried batch delivered twice: its files are already written
                repeated += 1
                continue
            pending.setdefault(index, {})[row["id"]] = (row["audio"], row["meta"])
            batch = plan[index]
            if len(pending[index]) < len(batch):
                continue
            parts = pending.pop(index)
            meta = json.loads(parts[batch[0].id][1])
            audios = [np.frombuffer(parts[u.id][0], dtype="<f4") for u in batch]
            job.write(index, BatchResult(batch, audios, meta["stats"], meta["seconds"], meta["device_ms"],
                                         meta["worker"], meta["backend_info"]))
            done.add(index)
            bar.update(len(batch))
    if len(done) != len(rows):
        missing = sorted(u.id for index, batch in plan.items() if index not in done for u in batch)
        raise SynthesisError(f"{job.out_dir}: Ray returned no audio for {', '.join(missing)}; re-run to finish")
    summary = job.summary()
    summary.update({"ray_actors": actors, "ray_cluster": {k: cluster[k] for k in sorted(cluster)
                                                          if k in ("CPU", NPU_RESOURCE, "GPU")},
                    "repeated_results": repeated})
    return summary
