"""ray_cluster.yaml: valid for Ray's own cluster launcher, and safe and cheap by construction.

Ray's `prepare_config` + `validate_config` are the offline half of `ray up` (they merge
the AWS defaults and check the JSON schema; nothing calls AWS). The defaults are merged
in shallowly, so a field the file leaves out comes from Ray's defaults.yaml, which binds the
dashboard to 0.0.0.0: the checks below run on the merged config for that reason.

Issue 24's checks run what Ray would run where they can: the `docker run` Ray builds for each
node kind (token mode in the container's environment), the setup commands in a scratch home and
then the login shell Ray's command runner opens for `ray exec`; the workers' IAM profile and the
policy docs/cluster.md documents for it are parsed, not matched as text.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
from typing import Any

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "ray_cluster.yaml")
COMMAND_FIELDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                  "head_start_ray_commands", "worker_start_ray_commands")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with open(CONFIG) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it after merging Ray's AWS defaults."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def _commands(cfg: dict[str, Any]) -> list[str]:
    cmds = [c for f in COMMAND_FIELDS for c in cfg.get(f) or []]
    for nt in cfg["available_node_types"].values():
        cmds += nt.get("worker_setup_commands", []) + nt.get("initialization_commands", [])
    return cmds


def _head_ray_start(cfg: dict[str, Any]) -> str:
    starts = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1, starts
    return starts[0]


def test_validates_against_ray_schema(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    for name in ("cluster_name", "max_workers", "idle_timeout_minutes"):
        assert name in prepared
    assert "cache_stopped_nodes" in prepared["provider"]


def test_raw_file_names_every_command_list(raw: dict[str, Any]) -> None:
    # A list left out would silently come from Ray's defaults (ray-3.0.0.dev wheels, dashboard on 0.0.0.0).
    for f in COMMAND_FIELDS:
        assert f in raw, f"ray_cluster.yaml must set {f} itself"


def test_no_service_binds_all_interfaces(prepared: dict[str, Any]) -> None:
    text = json.dumps(prepared)
    assert "0.0.0.0" not in text
    for cmd in _commands(prepared):
        words = shlex.split(cmd.replace("$(", "").replace(")", ""), posix=True)
        for flag in ("--host", "--dashboard-host", "--bind", "--ray-client-server-host"):
            for i, w in enumerate(words):
                value = w.split("=", 1)[1] if w.startswith(flag + "=") else (
                    words[i + 1] if w == flag and i + 1 < len(words) else None)
                assert value not in ("0.0.0.0", "::", "[::]", "*", ""), f"{cmd!r} binds {flag}={value!r}"


def test_dashboard_only_on_loopback(prepared: dict[str, Any]) -> None:
    start = _head_ray_start(prepared)
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", start), start
    assert "--head" in start and "--autoscaling-config" in start


def test_every_node_requires_the_shared_auth_token(prepared: dict[str, Any]) -> None:
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for field in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in prepared[field]:
            if "ray start" in cmd:
                assert re.search(r"export RAY_AUTH_MODE=token;.*ray start", cmd), cmd


def test_mlflow_server_on_private_ip_with_database(prepared: dict[str, Any]) -> None:
    server = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert len(server) == 1
    cmd = server[0]
    assert re.search(r"--backend-store-uri (sqlite:////\S+\.db|postgresql://\S+)", cmd), cmd
    # The head's private IP: the first address `hostname -I` prints.
    assert "--host $(hostname -I | awk '{print $1}')" in cmd
    assert not any("mlflow server" in c for c in _commands(prepared) if c not in prepared["head_start_ray_commands"])


def test_head_has_no_gpu_and_no_cpu_for_trials(prepared: dict[str, Any]) -> None:
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # every trial asks for CPU > 0, so none lands here
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    assert "--gpus" not in " ".join(prepared["docker"].get("head_run_options", []) +
                                    prepared["docker"].get("run_options", []))


def test_autoscaling_gpu_worker_types(prepared: dict[str, Any]) -> None:
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    gpus = sorted(v["resources"].get("GPU", 0) for v in workers.values())
    assert 1 in gpus and max(gpus) >= 4, gpus
    for name, nt in workers.items():
        assert nt["resources"].get("CPU", 0) >= 1, name
        assert nt["min_workers"] == 0, f"{name}: idle GPU nodes should scale to zero"
        assert 1 <= nt["max_workers"] <= prepared["max_workers"], name
    assert prepared["idle_timeout_minutes"] > 0
    assert "--gpus all" in prepared["docker"].get("worker_run_options", [])
    for cmd in prepared["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--address=$RAY_HEAD_IP:6379" in cmd


def test_setup_installs_the_project_from_pyproject(prepared: dict[str, Any]) -> None:
    assert prepared["file_mounts"].get("~/project") == "."
    assert os.path.exists(os.path.join(ROOT, "pyproject.toml"))
    for field in ("head_setup_commands", "worker_setup_commands"):  # merged with setup_commands
        assert any(re.search(r"pip install .*-e ~/project(\s|$)", c) for c in prepared[field]), field
    assert any(".venv" in p for p in prepared["rsync_exclude"]), "a local venv must not be synced to the cluster"


def test_image_is_a_pinned_ray_gpu_release(prepared: dict[str, Any]) -> None:
    image = prepared["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert m, f"pin a rayproject/ray GPU image by release, got {image!r}"
    assert tuple(int(x) for x in m.groups()[:3]) >= (2, 40, 0), "pyproject needs ray[tune]>=2.40"
    assert (int(m.group(4)), int(m.group(5))) >= (3, 10), "pyproject needs Python >= 3.10"
    # Not asserted: equality with the local Ray, which `ray up` wants but a fresh CI install
    # may outrun; docs/cluster.md says to keep the two equal.


# --------------------------------------------------------------------------- issue 24: every shell, least privilege
def _env_flags(words: list[str]) -> dict[str, str]:
    """VAR -> value of the -e/--env options among a docker command's words."""
    out = {}
    for i, w in enumerate(words):
        value = words[i + 1] if w in ("-e", "--env") and i + 1 < len(words) else (
            w.split("=", 1)[1] if w.startswith("--env=") else None)
        if value and "=" in value:
            k, v = value.split("=", 1)
            out[k] = v
    return out


def test_token_auth_is_in_the_environment_of_every_container(prepared: dict[str, Any]) -> None:
    """The `docker run` Ray builds for each node kind sets RAY_AUTH_MODE=token for every process in the container:
    `ray exec` / `ray attach` shells, tmux, and `ray job submit` run on the head, not only `ray start`."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = prepared["docker"]
    for kind in ("head", "worker"):
        options = docker.get("run_options", []) + docker.get(f"{kind}_run_options", [])
        cmd = docker_start_cmds("ubuntu", docker["image"], prepared["file_mounts"], docker["container_name"], options,
                                prepared["cluster_name"], "/home/ray", "docker")
        assert _env_flags(shlex.split(cmd)).get("RAY_AUTH_MODE") == "token", (kind, cmd)


def test_setup_puts_token_auth_into_the_shell_ray_exec_opens(prepared: dict[str, Any], tmp_path) -> None:
    """Run the setup commands that are not installs in a scratch HOME (twice: `ray up` reruns them), then open
    the shell Ray's command runner opens for `ray exec` (bash --login -i, sourcing ~/.bashrc): it has the token
    mode; and Ray's world-readable ~/.ray/auth_token (0644 as Ray 2.60 writes it) ends up owner-only."""
    import stat
    import subprocess

    from ray.autoscaler._private.command_runner import _with_interactive

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t" * 64)
    (home / ".ray" / "auth_token").chmod(0o644)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for field in ("head_setup_commands", "worker_setup_commands"):
        local = [c for c in prepared[field] if shlex.split(c)[0] not in ("pip", "sudo", "conda")]
        assert local, field
        for _ in range(2):
            for cmd in local:
                subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
        shell = " ".join(_with_interactive("echo MODE=$RAY_AUTH_MODE"))
        out = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert "MODE=token" in out.stdout.splitlines(), (field, out.stdout, out.stderr[-500:])
        assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600, field
    assert (home / ".bashrc").read_text().count("RAY_AUTH_MODE") == 1  # idempotent across reruns


def _profile_name(p: dict[str, Any]) -> str:
    return p["Name"] if "Name" in p else p["Arn"].rsplit("/", 1)[-1]


def test_workers_get_their_own_least_privilege_profile(prepared: dict[str, Any]) -> None:
    """Not the head's ray-autoscaler-v1 (EC2 and all of S3: trial code would control the account)."""
    head_default = "ray-autoscaler-v1"  # ray.autoscaler._private.aws.config.DEFAULT_RAY_INSTANCE_PROFILE (needs boto3)
    head = prepared["head_node_type"]
    workers = {k: v["node_config"] for k, v in prepared["available_node_types"].items() if k != head}
    names = {k: _profile_name(nc["IamInstanceProfile"]) for k, nc in workers.items() if "IamInstanceProfile" in nc}
    assert names.keys() == workers.keys(), f"worker types without a profile: {sorted(workers.keys() - names.keys())}"
    assert len(set(names.values())) == 1, names
    assert head_default not in names.values() and "autoscaler" not in next(iter(names.values()))
    # The head keeps Ray's default profile (it launches the workers); the workers' one is not on the head.
    assert "IamInstanceProfile" not in prepared["available_node_types"][head]["node_config"]


def _doc_json_after(marker: str) -> Any:
    """The first ```json block after `marker` in docs/cluster.md, parsed."""
    text = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    assert marker in text, f"docs/cluster.md lost {marker!r}"
    m = re.search(r"```json\n(.*?)\n```", text[text.index(marker):], re.S)
    assert m, f"no json block after {marker!r}"
    return json.loads(m.group(1))


def test_documented_worker_policy_reaches_only_the_results_bucket(raw: dict[str, Any]) -> None:
    policy = _doc_json_after("`worker-policy.json`")
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        assert set(resources) <= {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}, resources
    granted = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= granted  # Tune's storage, Parquet, --data-dir
    trust = _doc_json_after("`worker-trust.json`")
    assert [st["Principal"] for st in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    # The name the docs create is the one ray_cluster.yaml gives the workers.
    names = {_profile_name(nt["node_config"]["IamInstanceProfile"]) for k, nt in raw["available_node_types"].items()
             if "IamInstanceProfile" in nt["node_config"]}
    text = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    assert all(f"--instance-profile-name {n}" in text for n in names), names


def test_image_recipe_in_the_comments_builds_on_the_configured_image(raw: dict[str, Any]) -> None:
    """The Dockerfile sketched in ray_cluster.yaml's comments starts FROM the image the file configures."""
    text = open(CONFIG).read()
    froms = re.findall(r"^\s*#\s+FROM (\S+)\s*$", text, re.M)
    assert froms == [raw["docker"]["image"]], froms
