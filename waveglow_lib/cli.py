"""Command line: `python -m waveglow_lib <command> [--params FILE] [--set key=value ...] [--<parameter> V]`.

Commands: preprocess, export, convert, infer, postprocess, run-all (the guide's chain, one stage each),
vocode (mels from a TTS model → wavs), evaluate (metrics.json), run (the notebook chain), bench (the
throughput table), serve (HTTP vocoding on Ray Serve, with an optional load test).
Every command configures itself the same way, from `WorkflowConfig` (config.py): a params YAML file, then
`--set` pairs, then the explicit flags (aliases of config fields), later ones winning. Each command prints
its summary as JSON. Errors the workflow raises on purpose (`WaveGlowError`) print one line naming the
file; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import engines, stages
from .bench import ROWS, DEFAULT_ROWS, DEFAULT_LENGTHS, parse_lengths, render_markdown, run_bench
from .bench.serve_load import LEVELS, load_test, offline_outputs, render_load_markdown
from .bench.stream import render_stream_markdown, stream_bench
from .config import STFTConfig, WorkflowConfig, check_os_path, parse_set_option
from .errors import ConfigError, NotebookRunError, WaveGlowError
from .evaluate import collect_metrics
from .io import atomic_write_json, atomic_write_text
from .layout import CONVERT_TARGETS, SERVE_LOAD, RunLayout, measurement_files
from .notebook.runner import MY_TRAIN_PARAMS, NOTEBOOKS, TRAIN_DEMO_PARAMS, run_notebooks
from .stages.train import load_train_config, run_train
from .train import TrainConfig
from . import service


@dataclass(frozen=True)
class Alias:
    """A flag that sets a config field (`--batch-sizes 1,4` → bench_batch_sizes=[1, 4])."""

    flag: str
    field: str
    help: str = ""
    convert: Callable[[str], Any] | None = None


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    #: config fields offered as `--<field>` flags (all others through --set)
    fields: tuple[str, ...] = ()
    aliases: tuple[Alias, ...] = ()
    default_params: str | None = None
    options: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[Any, argparse.Namespace], Any] = field(default=lambda cfg, args: None)
    #: how the command's parameters are read from --params/--set (training has its own TrainConfig)
    configure: Callable[[argparse.Namespace], Any] | None = None
    #: what --force does; None: no --force (the command has no finished work to skip: it measures or serves)
    force: str | None = "redo finished work instead of skipping it"


#: every command names the run (name, runs_dir) and the model (checkpoint)
COMMON_FIELDS = ("name", "runs_dir", "checkpoint")
STAGE_FIELDS = {
    "preprocess": ("corpus", "limit", "resample", "downmix"),
    "export": ("opset", "sigma"),
    "convert": ("gear_policy", "n_buckets", "soc_version", "batch_size", "chunk_frames"),
    "infer": ("backend", "device", "precision", "batch_size", "sigma", "seed", "engine", "chunk_frames"),
    "postprocess": ("denoiser_strength",),
    "vocode": ("backend", "device", "precision", "batch_size", "sigma", "seed", "engine", "chunk_frames",
               "mel_layout", "mel_convert", "denoiser_strength", "vocode_out_bin"),
}
ALL_STAGE_FIELDS = tuple(dict.fromkeys(f for stage, fields in STAGE_FIELDS.items() if stage != "vocode"
                                       for f in fields))


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# --- the commands' own options and actions ------------------------------------------------------------
def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guide-variant", action="store_true",
                        help="also export the guide's graph (mel only, noise drawn inside) as WaveGlow_onnx.onnx")


def _convert_options(parser: argparse.ArgumentParser, default=CONVERT_TARGETS) -> None:
    parser.add_argument("--targets", nargs="*", default=list(default) if default else None, choices=CONVERT_TARGETS,
                        help="what to build (default: all three)")


def _convert_only_options(parser: argparse.ArgumentParser) -> None:
    _convert_options(parser)
    parser.add_argument("--script-only", action="store_true", help="write om/convert_atc.sh even when atc is on PATH")


def _out_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=Path, default=None, help="folder of <id>_out.bin (default: runs/<name>/out)")


def _postprocess_options(parser: argparse.ArgumentParser) -> None:
    _out_dir_option(parser)
    parser.add_argument("--wav-dir", type=Path, default=None, help="output folder (default: runs/<name>/wav)")


def _vocode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mels", type=Path, required=True, metavar="DIR|FILE",
                        help="a folder of <id>.npy / <id>.pt / <id>.bin (+ .txt) mels, or one such file")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the wavs go (default: runs/<name>/vocode)")
    parser.add_argument("--stdout", action="store_true",
                        help="write one mel's audio to stdout as it is made, no files: the bytes of the data chunk of "
                             "its <id>_syn.wav (raw PCM, s16le mono; rate and format on stderr), e.g. "
                             "| aplay -r 22050 -f S16_LE -c 1")


def _run_vocode(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    if args.stdout:
        return _vocode_to_stdout(cfg, args)
    return stages.vocode(cfg, args.mels, out_dir=args.out_dir, force=args.force)


def _vocode_to_stdout(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    """`vocode --stdout`: the audio goes to a private copy of stdout's file descriptor, and descriptor 1 itself
    becomes stderr for the rest of the run, so nothing else (a library's print, a C library's message, the
    summary) can land among the samples. A reader that goes away (broken pipe) ends the run quietly."""
    if args.out_dir is not None:
        raise ConfigError("vocode --stdout writes no files: drop --out-dir")
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object (an in-process caller)
        fd = None
    if fd is None:
        return stages.vocode_pipe(cfg, args.mels, sys.stdout.buffer)
    pcm = os.fdopen(os.dup(fd), "wb")
    os.dup2(sys.stderr.fileno(), fd)
    try:
        return stages.vocode_pipe(cfg, args.mels, pcm)
    except BrokenPipeError:
        return None  # the player quit: what it took was all it wanted
    finally:
        try:
            pcm.close()
        except OSError:  # the pipe broke with bytes still buffered
            pass


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--notebooks", nargs="+", metavar="NAME", default=None,
                        help=f"run only these notebooks, in the order given (default: all of {', '.join(NOTEBOOKS)}; "
                             f"07_train.ipynb reads its own training parameters, {MY_TRAIN_PARAMS} else "
                             f"{TRAIN_DEMO_PARAMS})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell before giving up (default: none)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def _bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="official (87.7 M parameters, random weights; default) | demo | a checkpoint path")
    parser.add_argument("--lengths", default=None,
                        help=f"guide | guide/N | frame counts like 832,164 (default {DEFAULT_LENGTHS}: the guide's "
                             "lengths / 16; guide = the full 66.8 s, minutes per row per pass)")
    parser.add_argument("--backends", default=None,
                        help=f"rows, comma separated, or all (default: {','.join(DEFAULT_ROWS)}); known: {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=None, help="cores for every row (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also record the profilers' top operations")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="keep N cores busy with a competitor process for the whole measurement (shared machine)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where bench.json/bench.md go (default runs/<name>)")
    parser.add_argument("--stream", action="store_true",
                        help="instead of the table: streaming latency (time to first audio, per-chunk p50/p95, "
                             "real-time factor) per backend and the vocode stage's peak memory by length "
                             "(10 s … 1 h) → bench_stream.json/.md (default model: demo; --lengths default: the "
                             "guide's)")
    parser.add_argument("--no-serve", action="store_true",
                        help="with --stream: leave out the service's streamed answers (HTTP ?stream=true and the "
                             "WebSocket, measured on a local Ray Serve beside the library path)")


def _run_stage(stage: str) -> Callable[[WorkflowConfig, argparse.Namespace], Any]:
    def run(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
        force = args.force
        if stage == "preprocess":
            return stages.preprocess(cfg, force=force)
        if stage == "export":
            return stages.export(cfg, guide_variant=args.guide_variant, force=force)
        if stage == "convert":
            return stages.convert(cfg, targets=args.targets, force=force, run_atc=False if args.script_only else None)
        if stage == "infer":
            return stages.infer(cfg, out_dir=args.out_dir, force=force)
        if stage == "postprocess":
            return stages.postprocess(cfg, out_dir=args.out_dir, wav_dir=args.wav_dir, force=force)
        targets = None if args.targets is None else tuple(args.targets)
        return stages.run_all(cfg, force=force, convert_targets=targets)
    return run


def _run_notebooks(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    try:
        result = run_notebooks(cfg, notebooks=args.notebooks, report=not args.no_report, timeout=args.timeout,
                               force=args.force)
    except NotebookRunError as exc:
        report = RunLayout(exc.output.parent.parent).report  # exc.output: <run>/notebooks/<name>
        if report.exists():
            print(f"report of what ran: {report}", file=sys.stderr)
        raise
    for name, seconds in result.seconds.items():
        print(f"{name:28s} {seconds:8.1f} s")
    print(f"done in {sum(result.seconds.values()):.1f} s: {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return None


def _served_for_bench(cfg: WorkflowConfig):
    """`bench --stream`'s service: `serve` on this process's Ray (a local one on 127.0.0.1, started and stopped
    here unless one is running), one replica, the given model, backend, precision, threads and chunks."""
    @contextlib.contextmanager
    def serve(*, checkpoint: str, backend: str, precision: str, threads: int, stream_chunks: tuple[int, int]):
        run = cfg.with_overrides(checkpoint=checkpoint, backend=backend, precision=precision,
                                 ray_cpus_per_actor=threads)
        owns_ray = run.ray_address is None and not engines.ray.import_ray("serve").is_initialized()
        existing = service.child_pids()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            yield service.serve_vocoder(run, port=port, max_batch=1, stream=service.StreamChunks(*stream_chunks))
        finally:
            service.shutdown(stop_ray=owns_ray, existing=existing)
    return serve


def _run_bench(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    if args.stream:
        result = stream_bench(cfg, model=args.model or "demo", threads=args.threads, out_dir=args.out_dir,
                              backends=args.backends.split(",") if args.backends else None,
                              serve=None if args.no_serve else _served_for_bench(cfg),
                              **({"lengths": parse_lengths(args.lengths)} if args.lengths else {}))
        print(render_stream_markdown(result))
        return {"files": result["files"]}
    quick = cfg.bench_quick
    # explicit --batch-sizes / --repeats win over --quick's small defaults (run_bench's rule)
    result = run_bench(cfg, model=args.model or ("demo" if quick else "official"), lengths=args.lengths,
                       batch_sizes=args.bench_batch_sizes, repeats=args.bench_repeats,
                       rows=args.backends.split(",") if args.backends else None, quick=quick,
                       threads=args.threads, out_dir=args.out_dir, profile=args.profile, load=args.load)
    print(render_markdown(result))
    return {"files": result.get("files"), "auto": result["auto"]}


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return load_train_config(args.params, parse_set_option(args.overrides))


def _run_train(config: TrainConfig, args: argparse.Namespace) -> Any:
    result = run_train(config, on_log=lambda entry: print(json.dumps(entry), file=sys.stderr, flush=True),
                       force=args.force)
    if result.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return None  # under torchrun, rank 0 prints the summary
    return {k: v for k, v in result.items() if k != "history"}


def _run_evaluate(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    record = collect_metrics(cfg)
    return {"metrics": str(cfg.layout.metrics), "summary": record["summary"]}


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the deployment, one backend each")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests @serve.batch joins into a batch")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    parser.add_argument("--stream-first-frames", type=int, default=service.StreamChunks.first_frames,
                        help="streamed answers (?stream=true, /vocode/ws): mel frames of the first chunk, each next "
                             "one twice the last")
    parser.add_argument("--stream-chunk-frames", type=int, default=service.StreamChunks.chunk_frames,
                        help="streamed answers: the largest chunk, in mel frames")
    parser.add_argument("--load-test", action="store_true",
                        help="start the service, load it with 1, 4, 16 concurrent clients on 127.0.0.1 with the "
                             "run's mels, compare every response with the infer stage's output, write "
                             "serve_load.json/.md into the run folder, stop")
    parser.add_argument("--max-requests", type=int, default=48, help="load test: requests per level")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="load test: seconds per level at most")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard (on 127.0.0.1) with the local Ray (no ray_address); off by default")


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind as Ctrl-C does (a KeyboardInterrupt), through every `finally` on the way: the run
    folder's lock is released, a half-written output's temp file removed; `serve` stops its service and Ray."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs in the main thread: SIGTERM raises `_Terminated` (left as it is when a caller, a
    test or a notebook, installed its own handler)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_serve(cfg: WorkflowConfig, args: argparse.Namespace) -> Any:
    if args.load_test and args.host not in ("127.0.0.1", "localhost"):
        raise ConfigError("--load-test runs on 127.0.0.1 only (drop --host)")
    # serve_vocoder starts a local Ray unless given an address or already connected (main() called in-process)
    owns_ray = cfg.ray_address is None and not engines.ray.import_ray("serve").is_initialized()
    existing = service.child_pids()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        url = service.serve_vocoder(cfg, replicas=args.replicas, host=args.host, port=args.port,
                                    max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                                    dashboard=args.dashboard,
                                    stream=service.StreamChunks(args.stream_first_frames, args.stream_chunk_frames))
        # ray.init put in its own handlers, which abort the process (and leave Ray's agents running)
        signal.signal(signal.SIGTERM, _raise_terminated)
        if not args.load_test:
            print(f"serving POST {url} (?stream=true: chunk by chunk) and the WebSocket "
                  f"{url.replace('http', 'ws', 1)}/ws (Ctrl-C or SIGTERM stops)", file=sys.stderr)
            while True:
                time.sleep(3600)
        mels, expected = offline_outputs(cfg)
        result = load_test(url, mels, levels=LEVELS, max_requests=args.max_requests, max_seconds=args.max_seconds,
                           expected=expected)
    except _Terminated:
        result = None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        ended = service.shutdown(stop_ray=owns_ray, existing=existing)
        signal.signal(signal.SIGTERM, previous)
        if ended:
            print(f"ended Ray processes that outlived ray.shutdown(): {', '.join(ended)}", file=sys.stderr)
    if result is None:
        return {"stopped": "SIGTERM", "ended_after_ray_shutdown": ended}
    result.update({"replicas": args.replicas, "max_batch": args.max_batch, "backend": cfg.backend,
                   "precision": cfg.precision, "checkpoint": cfg.checkpoint})
    record, table = measurement_files(cfg.run_dir, SERVE_LOAD)
    atomic_write_json(record, result)
    atomic_write_text(table, render_load_markdown(result) + "\n")
    print(render_load_markdown(result))
    return {"files": [str(record), str(table)]}


HELP = {
    "preprocess": "LJSpeech folder → runs/<name>/mel/<id>.bin + <id>.txt + manifest.json",
    "export": "model → runs/<name>/onnx/waveglow.onnx (inputs mel, z; output audio), verified with ONNX Runtime",
    "convert": "ONNX → atc command/.om (Ascend), OpenVINO IR, ONNX Runtime optimised graph",
    "infer": "mel .bin → out/<id>_out.bin float32 audio with the chosen backend, in padded batches",
    "postprocess": f"out/<id>_out.bin → wav/<id>_syn.wav ({STFTConfig().sampling_rate} Hz int16), optional denoiser",
    "run-all": "all five stages in order",
    "vocode": "mels from a TTS model (.npy/.pt/.bin, format-checked) → vocode/<id>_syn.wav, any length, exact chunks",
}
COMMANDS: list[Command] = [
    Command("preprocess", HELP["preprocess"], COMMON_FIELDS + STAGE_FIELDS["preprocess"], run=_run_stage("preprocess")),
    Command("export", HELP["export"], COMMON_FIELDS + STAGE_FIELDS["export"], options=_export_options,
            run=_run_stage("export")),
    Command("convert", HELP["convert"], COMMON_FIELDS + STAGE_FIELDS["convert"], options=_convert_only_options,
            run=_run_stage("convert")),
    Command("infer", HELP["infer"], COMMON_FIELDS + STAGE_FIELDS["infer"], options=_out_dir_option,
            run=_run_stage("infer")),
    Command("postprocess", HELP["postprocess"], COMMON_FIELDS + STAGE_FIELDS["postprocess"],
            options=_postprocess_options, run=_run_stage("postprocess")),
    Command("run-all", HELP["run-all"], COMMON_FIELDS + ALL_STAGE_FIELDS,
            options=lambda p: _convert_options(p, default=None), run=_run_stage("run-all")),
    Command("vocode", HELP["vocode"], COMMON_FIELDS + STAGE_FIELDS["vocode"], options=_vocode_options,
            run=_run_vocode),
    Command("evaluate", "runs/<name>/wav vs the original wavs → runs/<name>/metrics.json (log-mel distance, MCD, "
            "STOI, PESQ)", COMMON_FIELDS, run=_run_evaluate, force=None),
    Command("run", "execute the notebooks 00…05 with papermill into runs/<name>/ and write report.html",
            COMMON_FIELDS, options=_run_options, run=_run_notebooks),
    Command("bench", "throughput table: backends × precision × batch size, with quality beside speed "
            "(--stream: streaming latency and memory by length)",
            ("name", "runs_dir", "seed", "sigma", "chunk_frames"), aliases=(
                Alias("--batch-sizes", "bench_batch_sizes", "e.g. 1,4,8,16", _int_list),
                Alias("--repeats", "bench_repeats", "timed passes per row", int),
                Alias("--quick", "bench_quick", "smoke run: demo model, 3 one-second slices, batch 1 and 2, 1 repeat")),
            options=_bench_options, run=_run_bench, force=None),
    Command("serve", "HTTP POST /vocode (a mel as .npy or JSON → audio/wav) on Ray Serve, batched, N replicas; "
            "--load-test measures it", COMMON_FIELDS + ("backend", "precision", "seed", "sigma", "ray_cpus_per_actor"),
            options=_serve_options, run=_run_serve, force=None),
    Command("train", "train or fine-tune WaveGlow (resumable; torchrun / Ray Train for data parallel); its "
            "parameters are TrainConfig's (params/train_demo.yaml)", configure=_train_config, run=_run_train,
            force="train in an out_dir that is not a training folder (one that holds other files)"),
]


# --- parsing -------------------------------------------------------------------------------------------
def _add_config_options(parser: argparse.ArgumentParser, command: Command) -> None:
    defaults = WorkflowConfig()
    types = typing.get_type_hints(WorkflowConfig)
    choices = WorkflowConfig.choices()
    group = parser.add_argument_group("parameters (override the params file; defaults from WorkflowConfig)")
    for name in command.fields:
        flag = "--" + name.replace("_", "-")
        kind, default = types[name], getattr(defaults, name)
        if kind is bool:
            group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                               help=f"(default: {default})")
        elif name in choices:
            group.add_argument(flag, dest=name, default=None, choices=choices[name], help=f"(default: {default})")
        else:
            group.add_argument(flag, dest=name, default=None, type=kind, metavar=name.upper(),
                               help=f"(default: {default})")
    for alias in command.aliases:
        kind = types[alias.field]
        help_text = f"{alias.help} (the parameter {alias.field}; default: {getattr(defaults, alias.field)})"
        if kind is bool:
            group.add_argument(alias.flag, dest=alias.field, default=None, action="store_true", help=help_text)
        else:
            group.add_argument(alias.flag, dest=alias.field, default=None, type=alias.convert or kind, help=help_text)
    parser.add_argument("--params", default=command.default_params, metavar="FILE",
                        help=f"params YAML file (default: {command.default_params or 'the built-in defaults'})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any parameter (YAML value), repeatable, e.g. --set limit=2")
    if command.force:
        parser.add_argument("--force", action="store_true", help=command.force)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")


def config_from_args(args: argparse.Namespace) -> WorkflowConfig:
    """params file, then --set, then the explicit flags (each a config field), later ones winning."""
    overrides = parse_set_option(args.overrides)
    for name in typing.get_type_hints(WorkflowConfig):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.params:
        return WorkflowConfig.from_yaml(args.params, overrides)
    return WorkflowConfig.from_dict(overrides, source="command line")


def check_path_options(args: argparse.Namespace) -> None:
    """The paths given as flags (--params, --mels, --out-dir, ...), before anything opens them: a name too long
    for the OS is a one-line error (config.check_os_path), not an ENAMETOOLONG traceback."""
    for name, value in vars(args).items():
        if isinstance(value, Path) or (name == "params" and isinstance(value, str)):
            check_os_path(value, f"--{name.replace('_', '-')}")


def _brief(result: Any) -> Any:
    """Drop bulky entries (model configs, per-item lists longer than 20) from the printed summary."""
    if isinstance(result, dict):
        return {k: _brief(v) for k, v in result.items() if k not in ("model_config",)}
    if isinstance(result, list) and len(result) > 20:
        return result[:20] + [f"... {len(result) - 20} more"]
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m waveglow_lib", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        _add_config_options(sub, command)
        if command.options:
            command.options(sub)
        sub.set_defaults(command_spec=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command_spec
    try:
        with _sigterm_unwinds():
            check_path_options(args)
            result = command.run((command.configure or config_from_args)(args), args)
    except _Terminated:
        print("terminated (SIGTERM); finished outputs are kept, re-run to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, re-run to continue", file=sys.stderr)
        return 130
    except WaveGlowError as exc:
        if args.traceback:
            raise
        print(f"error: {exc}", file=sys.stderr)
        if exc.path is not None and str(exc.path) not in str(exc):
            print(f"  (file: {exc.path})", file=sys.stderr)
        return 1 if isinstance(exc, NotebookRunError) else 2
    if result is not None:
        print(json.dumps(_brief(result), indent=2, default=str))
    return 0
