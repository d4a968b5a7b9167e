"""The deployment files are parsed and checked against the code: environment.yml's packages against
pyproject's, the KubeRay manifest's import_path, application args, entrypoint, pip extras and Ray version."""
from __future__ import annotations

import importlib
import inspect
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from waveglow_lib.cli import build_parser, config_from_args
from waveglow_lib.config import WorkflowConfig, from_mapping

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower()


def check_extras(spec: str) -> None:
    """`waveglow-workflow[a,b]` or `.[a,b]`: every extra is one pyproject offers."""
    extras = re.search(r"\[([^\]]*)\]", spec)
    for extra in (extras.group(1).split(",") if extras else []):
        assert extra.strip() in PYPROJECT["optional-dependencies"], f"{spec}: no extra {extra!r} in pyproject"


def test_environment_yml_installs_what_pyproject_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pinned = {requirement_name(spec): spec.replace(" ", "") for spec in PYPROJECT["dependencies"]}
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python.split("=")[1] >= PYPROJECT["requires-python"].lstrip(">=")
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    for spec in pip:
        if spec.startswith("-e"):
            assert spec.split(None, 1)[1].strip('"').startswith("."), spec
            check_extras(spec)
        else:  # a package listed again: as pyproject pins it
            assert pinned.get(requirement_name(spec)) == spec.replace(" ", ""), f"environment.yml {spec!r} vs pyproject"


def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kuberay-waveglow.yaml").read_text())
            if doc}


def test_kuberay_service_imports_what_the_code_offers():
    service = manifest()["RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder) and list(inspect.signature(builder).parameters) == ["args"]
    args = dict(app["args"])
    assert set(args) <= {"params", "replicas", "max_batch", "batch_wait_s", "limits"}, set(args)
    WorkflowConfig.from_dict(args.get("params", {}), source="the manifest's params")  # valid parameters
    from waveglow_lib.service import ServeLimits
    from_mapping(ServeLimits, args.get("limits", {}), "the manifest's limits")
    for spec in app["runtime_env"]["pip"]:
        assert requirement_name(spec) == PYPROJECT["name"]
        check_extras(spec)


def test_kuberay_job_entrypoint_parses_and_ray_versions_agree():
    docs = manifest()
    job = docs["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "waveglow_lib"]
    cfg = config_from_args(build_parser().parse_args(argv[3:]))
    assert cfg.engine == "ray" and cfg.ray_address == "auto"
    for spec in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]:
        assert requirement_name(spec) == PYPROJECT["name"]
        check_extras(spec)
    ray_floor = re.search(r">=([\d.]+)", PYPROJECT["optional-dependencies"]["ray"][0]).group(1)
    text = (ROOT / "deploy" / "kuberay-waveglow.yaml").read_text()
    for version in re.findall(r'rayVersion: "([\d.]+)"', text) + re.findall(r"rayproject/ray:([\d.]+)-", text):
        assert tuple(map(int, version.split("."))) >= tuple(map(int, ray_floor.split("."))), version
    python = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"][0].split("=")[1]
    assert all(tag == "py" + python.replace(".", "") for tag in re.findall(r"rayproject/ray:[\d.]+-(py\d+)", text))
