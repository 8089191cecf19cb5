"""What a user installs and deploys, checked without Docker, a cluster or a second machine: dvc in
the default install, DVC's dependency files, the offline plots template, prefect.yaml's deployments,
the Dockerfile and its install script (docs/orchestration.md, "Past one machine")."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

FLOW_NAME = "densepipe-retrain"
DOCKERFILE = REPO_ROOT / "Dockerfile"
INSTALL_SCRIPT = REPO_ROOT / "docker" / "install.sh"


def _quiet_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "CI": "true", **extra}


# -- dvc in the default install -----------------------------------------------------------------

def test_dvc_comes_with_the_default_install() -> None:
    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in md.requires("densepipe") or []]
    assert [r for r in requirements if r.name == "dvc" and r.marker is None], \
        "dvc is not an unconditional requirement of the installed densepipe (reinstall: pip install -e .)"
    assert "dvc" in (md.metadata("densepipe").get_all("Provides-Extra") or [])  # densepipe[dvc] still works

    dvc = Path(sys.executable).parent / "dvc"
    assert dvc.is_file(), f"no dvc command beside {sys.executable}"
    proc = subprocess.run([str(dvc), "--version"], capture_output=True, text=True, timeout=60,
                          env=_quiet_env())
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"3\.\d+\.\d+\S*", proc.stdout.strip()), proc.stdout


# -- dvc.yaml: no empty dependency file (DVC warns "'<path>' is empty." on every repro) -------------

def _dvcignored(path: Path) -> bool:
    """.dvcignore's patterns here: __pycache__/ and *.pyc."""
    return "__pycache__" in path.parts or path.suffix == ".pyc"


def test_no_file_dvc_yaml_depends_on_is_empty() -> None:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = {str(o) if not isinstance(o, dict) else next(iter(o))
            for stage in stages.values() for o in stage.get("outs", [])}
    files: set[Path] = set()
    for stage in stages.values():
        for dep in stage.get("deps", []):
            if any(dep == out or dep.startswith(out + "/") for out in outs):
                continue  # written by an earlier stage
            path = REPO_ROOT / dep
            assert path.exists(), f"dvc.yaml names a dependency that does not exist: {dep}"
            found = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            files.update(p for p in found if not _dvcignored(p.relative_to(REPO_ROOT)))
    assert REPO_ROOT / "pipeline" / "__init__.py" in files
    empty = sorted(str(p.relative_to(REPO_ROOT)) for p in files if p.stat().st_size == 0)
    assert not empty, f"empty files among dvc.yaml's deps (DVC warns about each): {empty}"


# -- dvc plots without a CDN --------------------------------------------------------------------------

def test_plots_template_loads_vega_from_local_files(tmp_path: Path) -> None:
    from dvc_render.vega import VegaRenderer

    cdn = re.findall(r'src="(https://[^"]+/npm/([a-z-]+)@[^"]+)"', VegaRenderer.SCRIPTS)
    assert {name for _, name in cdn} == {"vega", "vega-lite", "vega-embed"}
    docs = (REPO_ROOT / "docs" / "orchestration.md").read_text()
    for url, _ in cdn:  # the one-time download names what this dvc-render would load
        assert url in docs, f"docs/orchestration.md does not say to fetch {url}"

    repo = tmp_path / "repo"
    (repo / "dvc").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "dvc" / "plots-template.html", repo / "dvc")
    (repo / "log.csv").write_text("step,loss\n1,2.0\n2,1.5\n")
    (repo / "dvc.yaml").write_text("plots:\n  - log.csv:\n      x: step\n      y: loss\n")
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"],
                [dvc, "plots", "show", "--html-template", "dvc/plots-template.html"]):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120, env=_quiet_env())
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    page_path = repo / "dvc_plots" / "index.html"
    page = page_path.read_text()
    assert "vegaEmbed(" in page and '"loss"' in page  # the chart is there
    sources = re.findall(r'<script[^>]*\bsrc\s*=\s*"([^"]+)"', page)
    assert not [s for s in sources if "://" in s], sources
    loaded = {(page_path.parent / s).resolve().relative_to(repo) for s in sources}
    assert loaded == {Path("dvc/vendor") / f"{name}.js" for _, name in cdn}


# -- prefect.yaml -------------------------------------------------------------------------------------

def _deployments() -> list:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with

    raw = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    config = PrefectYamlModel.model_validate(raw)
    return list(zip(raw["deployments"], config.deployments, strict=True))


def test_every_prefect_yaml_deployment_runs_the_retrain_flow() -> None:
    from prefect.cli.deploy._models import DeploymentConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    deployments = _deployments()
    names = [d.name for _, d in deployments]
    assert len(set(names)) == len(names)
    assert {"nightly", "nightly-docker", "nightly-k8s"} <= set(names)
    for raw, deployment in deployments:
        # Prefect's model ignores unknown keys: a misspelt one would silently do nothing
        assert set(raw) <= set(DeploymentConfig.model_fields), (deployment.name, set(raw))
        assert deployment.work_pool is not None and deployment.work_pool.name, deployment.name
        # a module path: a file path (`flows/pipeline.py:...`) shadows the pipeline package in the worker
        entrypoint = deployment.entrypoint
        assert ":" not in entrypoint and ".py" not in entrypoint, entrypoint
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        assert flow.name == FLOW_NAME
        assert set(deployment.parameters) <= set(parameter_schema(flow.fn).properties)
        flow.validate_parameters(deployment.parameters)
        assert deployment.parameters["params"] == "params.yaml"
        (schedule,) = deployment.schedules
        assert isinstance(schedule.cron, str)
        CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        assert deployment.concurrency_limit == 1


def test_job_variables_are_ones_their_work_pool_type_takes() -> None:
    """Each pool is created as prefect.yaml's comments say (`prefect work-pool create NAME --type
    TYPE`), and its deployments' job_variables fit that worker type's base job template (Prefect's
    bundled copy of the worker registry, which its server falls back to offline). A key the
    template lacks would be dropped without a word."""
    import jsonschema
    import prefect

    text = (REPO_ROOT / "prefect.yaml").read_text()
    pool_types = dict(re.findall(r"prefect work-pool create (\S+) --type (\S+)", text))
    registry = json.loads((Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
                           / "aggregate-worker-metadata.json").read_text())
    workers = {name: worker for collection in registry.values() for name, worker in collection.items()}
    for _, deployment in _deployments():
        pool = deployment.work_pool.name
        assert pool in pool_types, f"prefect.yaml does not say how to create the work pool {pool}"
        schema = workers[pool_types[pool]]["default_base_job_configuration"]["variables"]
        variables = deployment.work_pool.job_variables
        assert set(variables) <= set(schema["properties"]), (deployment.name, sorted(variables))
        jsonschema.validate(variables, schema)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_container_deployments_run_in_the_image_the_dockerfile_builds() -> None:
    workdirs = [arg for op, arg in _instructions() if op == "WORKDIR"]
    copied = {name for op, arg in _instructions() if op == "COPY" for name in shlex.split(arg)[:-1]}
    assert "params.yaml" in copied
    for _, deployment in _deployments():
        variables = deployment.work_pool.job_variables
        if "image" not in variables:
            continue
        assert variables["image"].split("/")[-1].startswith("densepipe:"), variables["image"]
        (step,) = deployment.pull  # runs start where the image holds params.yaml
        assert step == {"prefect.deployments.steps.set_working_directory": {"directory": workdirs[-1]}}


# -- Dockerfile and docker/install.sh ------------------------------------------------------------------

def test_dockerfile_copies_files_that_exist_and_installs_through_the_script() -> None:
    instructions = _instructions()
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [shlex.split(arg) for op, arg in instructions if op == "COPY"]
    assert copies
    for *sources, _ in copies:
        assert not [s for s in sources if s.startswith("--")], "COPY --from/--chown: not expected here"
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"
    runs = [i for i, (op, _) in enumerate(instructions) if op == "RUN"]
    (install,) = [i for i in runs if "docker/install.sh" in instructions[i][1]]
    copied_before = {s for op, arg in instructions[:install] if op == "COPY" for s in shlex.split(arg)[:-1]}
    assert {"docker/install.sh", "pyproject.toml", "constraints.txt", "pipeline", "plugins",
            "flows"} <= copied_before


def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_install_script_takes_torch_from_torch_index_first(tmp_path: Path) -> None:
    """With TORCH_INDEX (the Dockerfile's CPU wheels), torch and torchvision come from it alone,
    without dependencies, before the project; without it, one pip install does everything."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)

    def calls(**env: str) -> list[list[str]]:
        log.unlink(missing_ok=True)
        subprocess.run(["bash", str(INSTALL_SCRIPT), "--dry-run"], check=True, timeout=30,
                       env={**os.environ, "PYTHON": str(fake), **env})
        return [json.loads(line) for line in log.read_text().splitlines()]

    constraints = ["-c", str(REPO_ROOT / "constraints.txt")]
    torch_first, project = calls(TORCH_INDEX="https://example.invalid/whl/cpu")
    assert torch_first[:3] == ["-m", "pip", "install"] and torch_first[-2:] == ["torch", "torchvision"]
    assert "--no-deps" in torch_first and "--dry-run" in torch_first
    assert torch_first[torch_first.index("--index-url") + 1] == "https://example.invalid/whl/cpu"
    for call in (torch_first, project):
        assert call[call.index("-c"):call.index("-c") + 2] == constraints
    assert project[:3] == ["-m", "pip", "install"] and project[-1] == str(REPO_ROOT)
    assert "--dry-run" in project
    assert calls(TORCH_INDEX="") == [project]


@pytest.mark.slow
def test_install_script_over_the_files_the_dockerfile_copies_resolves_the_pinned_set(tmp_path: Path) -> None:
    """The image's build step, as far as it runs without Docker: the files the Dockerfile copies
    before it, and the script's pip dry run into this (pinned) environment with no package index.
    An empty-environment resolve (--ignore-installed) takes about a minute and the network: not here."""
    context = tmp_path / "image"
    instructions = _instructions()
    workdir = "/"
    for op, arg in instructions:
        if op == "WORKDIR":
            workdir = posixpath.join(workdir, arg)
        elif op == "COPY":
            *sources, dest = shlex.split(arg)
            target = context / posixpath.join(workdir, dest).lstrip("/")
            for source in sources:
                src = REPO_ROOT / source
                to = target / src.name if dest.endswith("/") else target
                if src.is_dir():
                    shutil.copytree(src, to, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, to)
        elif op == "RUN" and "docker/install.sh" in arg:
            break
    root = context / workdir.lstrip("/")
    report = tmp_path / "report.json"
    env = _quiet_env(PYTHON=sys.executable, TORCH_INDEX="", PIP_NO_INDEX="1")
    proc = subprocess.run(["bash", str(root / "docker" / "install.sh"), "--dry-run", "--no-build-isolation",
                           "--quiet", "--report", str(report)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    planned = json.loads(report.read_text())["install"]
    install = [(i["metadata"]["name"], i["metadata"]["version"]) for i in planned]
    assert install == [("densepipe", md.version("densepipe"))], install

