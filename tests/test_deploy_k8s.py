"""deploy/k8s: the LeaderWorkerSet manifest, validated offline and held to the compose roles.

Validation is deploy/k8s/validate.py (what `make lint` runs): kubernetes-validate's
strict Kubernetes API schema for the pinned Kubernetes version (a Service; every
pod template inside the LeaderWorkerSet) and our JSON Schema of the LWS fields
the manifest uses, written from the LWS API types of the pinned LWS version.
The tool comes from `make setup`; without it these tests fail with its message.

Then the manifest is held to the compose roles: the leader's and the worker's
`vllm serve` arguments are compose.multinode-{leader,worker}.yaml's, resolved
with LWS's addresses (`$(LWS_LEADER_ADDRESS)`, the API on 0.0.0.0 behind a
Service), the environment is the roles', and the readiness probe is compose's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import deploy_lint as lint
import pytest
import yaml

from dsv4_nvfp4.deploy import compose as dc
from dsv4_nvfp4.deploy import profiles as pr
from dsv4_nvfp4.versions import pin

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MANIFEST = K8S / "leaderworkerset.yaml"
VALIDATE = K8S / "validate.py"
ENV_EXAMPLE = ROOT / ".env.example"
#: What the manifest puts where .env puts a value: LWS's leader address, the API on
#: the pod network (a Service in front), .env.example's defaults for the rest.
K8S_VALUES = {"DATA_PARALLEL_ADDRESS": "$(LWS_LEADER_ADDRESS)", "BIND_ADDRESS": "0.0.0.0",
              "DATA_PARALLEL_START_RANK": "8"}

pytestmark = pytest.mark.cpu


def validate(*files: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(VALIDATE), *map(str, files)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return list(yaml.safe_load_all(MANIFEST.read_text()))


@pytest.fixture(scope="module")
def lws(docs: list[dict]) -> dict:
    (doc,) = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    return doc


def container(lws: dict, template: str) -> dict:
    (c,) = lws["spec"]["leaderWorkerTemplate"][template]["spec"]["containers"]
    return c


def test_the_manifest_passes_schema_validation():
    result = validate(MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr
    version = pin("KUBERNETES_API_VERSION")
    assert result.stdout.splitlines() == [
        f"[ok  ] leaderworkerset.yaml: LeaderWorkerSet/dsv4-nvfp4 (Kubernetes {version})",
        f"[ok  ] leaderworkerset.yaml: Service/dsv4-nvfp4 (Kubernetes {version})"]


BREAKAGES = [
    # (what, old text, new text, where the error must point)
    ("unknown container field", "            command: [\"vllm\", \"serve\"]\n",
     "            command: [\"vllm\", \"serve\"]\n            imagePullPolicyy: Always\n",
     "imagePullPolicyy"),
    ("bad GPU quantity", "                nvidia.com/gpu: 8\n",
     "                nvidia.com/gpu: [8]\n", "nvidia.com/gpu"),
    ("probe period as text", "              periodSeconds: 30\n",
     "              periodSeconds: thirty\n", "periodSeconds"),
    ("LWS startup policy", "startupPolicy: LeaderCreated", "startupPolicy: LeaderFirst",
     "startupPolicy"),
    ("LWS size 0", "    size: 2\n", "    size: 0\n", "size"),
    ("LWS field typo", "    restartPolicy: RecreateGroupOnPodRestart",
     "    restartPolicyy: RecreateGroupOnPodRestart", "restartPolicyy"),
    ("Service port as text", "      port: 8000\n", "      port: http-port\n", "port"),
]


@pytest.mark.parametrize("what,old,new,where", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_validation_has_teeth(tmp_path: Path, what: str, old: str, new: str, where: str):
    text = MANIFEST.read_text()
    assert text.count(old) >= 1, what
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = validate(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[FAIL]" in result.stdout and where in result.stdout, result.stdout


def test_a_missing_tool_fails_with_the_fix(tmp_path: Path):
    (tmp_path / "kubernetes_validate.py").write_text(
        "raise ImportError('not here', name='kubernetes_validate')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = validate(MANIFEST, env=env)
    assert result.returncode == 2
    assert "kubernetes_validate not installed (make setup)" in result.stderr


def test_make_lint_validates_every_manifest():
    results = lint.run_k8s_validate(ROOT)
    assert results.returncode == 0, results.stdout + results.stderr
    manifests = sorted(p.name for p in K8S.glob("*.yaml"))
    assert manifests == ["leaderworkerset.yaml"]
    assert "leaderworkerset.yaml: LeaderWorkerSet/dsv4-nvfp4" in results.stdout


def role_argv(role: str) -> list[str]:
    return pr.serve_command(role, ROOT, env_file=ENV_EXAMPLE, environ=K8S_VALUES).argv()


def test_leader_runs_the_compose_leader(lws: dict):
    leader = container(lws, "leaderTemplate")
    assert leader["command"] == ["vllm", "serve"]  # the image's ENTRYPOINT
    assert leader["args"] == role_argv("multinode-leader")


def test_worker_runs_the_compose_worker_with_its_start_rank_from_lws(lws: dict,
                                                                     tmp_path: Path):
    worker = container(lws, "workerTemplate")
    expected = role_argv("multinode-worker")
    assert worker["args"] == [expected[0], *dc.drop_flags(expected[1:],
                                                          ["--data-parallel-start-rank"])]
    shell, flag, script, arg0 = worker["command"]
    assert (shell, flag, arg0) == ("/bin/sh", "-c", "vllm")
    # Run the script as the pod would: Kubernetes turns $$ into $, a fake `vllm` echoes.
    fake = tmp_path / "vllm"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(
        [shell, flag, script.replace("$$", "$"), arg0, "/model", "--headless"],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "LWS_WORKER_INDEX": "2"}).stdout
    assert out.split() == ["serve", "/model", "--headless", "--data-parallel-start-rank",
                           str(2 * pr.GPUS_PER_NODE)]


def test_group_size_matches_the_data_parallel_size(lws: dict):
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    for template in ("leaderTemplate", "workerTemplate"):
        args = container(lws, template)["args"]
        assert int(dc.flag_value(args[1:], "--data-parallel-size")) == size * pr.GPUS_PER_NODE
        assert dc.flag_value(args[1:], "--data-parallel-size-local") == str(pr.GPUS_PER_NODE)
    # Workers must start with the leader, which is only ready once they have joined.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_environment_is_the_roles(lws: dict):
    for template, role in (("leaderTemplate", "multinode-leader"),
                           ("workerTemplate", "multinode-worker")):
        env = {e["name"]: e for e in container(lws, template)["env"]}
        compose_env = pr.service_environment(role, ROOT, env_file=ENV_EXAMPLE, environ={})
        assert set(env) == set(compose_env)  # NCCL_* unset: left out, as in compose
        for name, value in compose_env.items():
            if name == "VLLM_API_KEY":  # from a Secret, never in the manifest
                assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "dsv4-nvfp4",
                                                                  "key": "vllm-api-key"}
            else:
                assert env[name]["value"] == value


def _seconds(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u]
               for n, u in re.findall(r"([\d.]+)([hms])", text))


def test_probes_are_composes(lws: dict):
    leader = container(lws, "leaderTemplate")
    health = pr.layered_service(ROOT, pr.PROFILES["multinode-leader"])["healthcheck"]
    test = [dc.interpolate(t, {**dc.read_env_file(ENV_EXAMPLE), **K8S_VALUES})
            for t in health["test"]]
    assert test[0] == "CMD"
    for probe in ("startupProbe", "readinessProbe"):
        p = leader[probe]
        assert p["exec"]["command"] == test[1:]
        assert p["periodSeconds"] == _seconds(health["interval"])
        assert p["timeoutSeconds"] == _seconds(health["timeout"])
    assert leader["readinessProbe"]["failureThreshold"] == health["retries"]
    startup = leader["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == _seconds(
        health["start_period"])
    assert "livenessProbe" not in leader  # compose never restarts for unhealthy either
    worker = container(lws, "workerTemplate")
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker)


def test_one_pod_per_node_with_gpus_rdma_and_locked_memory(lws: dict):
    for template in ("leaderTemplate", "workerTemplate"):
        c = container(lws, template)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == pr.GPUS_PER_NODE  # a whole node
        assert any(k.startswith("rdma/") for k in c["resources"]["limits"])
        assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/model"]["readOnly"] is True
        assert "/dev/shm" in mounts


def test_the_service_selects_the_leader(docs: list[dict], lws: dict):
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    labels = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
    selector = dict(svc["spec"]["selector"])
    assert selector.pop("leaderworkerset.sigs.k8s.io/name") == lws["metadata"]["name"]
    assert selector.items() <= labels.items()
    worker_labels = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
    assert not selector.items() <= worker_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "http"


def test_pins_name_the_schemas():
    import kubernetes_validate

    assert kubernetes_validate.__version__ == pin("KUBERNETES_VALIDATE_VERSION")
    schema = (K8S / "leaderworkerset-v1.schema.json").read_text()
    assert "LWS_VERSION" in schema and re.fullmatch(r"\d+\.\d+\.\d+", pin("LWS_VERSION"))
