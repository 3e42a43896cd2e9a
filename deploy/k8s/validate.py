"""Validate the Kubernetes manifests of deploy/k8s offline, against schemas only.

    python deploy/k8s/validate.py [--kubernetes-version X.Y] FILE...

Every document of every file is checked:

* a Kubernetes API object (Service, ...) with kubernetes-validate, strict (an
  unknown field fails), against the API schema of the pinned Kubernetes version
  it bundles (KUBERNETES_API_VERSION in src/dsv4_nvfp4/versions.env);
* a LeaderWorkerSet with leaderworkerset-v1.schema.json beside this file: our
  JSON Schema of the LWS fields the manifest uses, written from the LWS API
  types (LWS_VERSION), whose pod templates point into the same strict
  Kubernetes schema, so every container, probe, volume and resource is checked
  as the API server would check a Pod.

No cluster and no network: kubernetes-validate ships the schemas in its wheel
(installed by `make setup`). Exit 0 when every document passes, 1 when one
fails (one line each), 2 when the tool is missing or a file cannot be read.

A standalone script, not a module of the package: like hadolint and the Compose
binary, it is a tool `tests/deploy_lint.py` runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LWS_SCHEMA = HERE / "leaderworkerset-v1.schema.json"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
VERSIONS_ENV = HERE.parents[1] / "src" / "dsv4_nvfp4" / "versions.env"


def pinned_kubernetes_version() -> str:
    text = VERSIONS_ENV.read_text()
    match = re.search(r"(?m)^KUBERNETES_API_VERSION=(\S+)$", text)
    if not match:
        raise SystemExit(f"error: {VERSIONS_ENV}: KUBERNETES_API_VERSION is not pinned")
    return match.group(1)


def _definitions(kubernetes_version: str) -> dict:
    """The strict `_definitions.json` kubernetes-validate bundles for the version."""
    from kubernetes_validate import utils

    version = [v for v in utils.all_versions()
               if utils.major_minor(v) <= utils.major_minor(kubernetes_version)][-1]
    return utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", kubernetes_version)


def validate_leaderworkerset(doc: dict, kubernetes_version: str) -> list[str]:
    """Errors of one LeaderWorkerSet against our LWS schema + the strict pod schema."""
    import jsonschema
    from referencing import Registry, Resource

    definitions = Resource.from_contents(_definitions(kubernetes_version))
    registry = definitions @ Registry()
    validator = jsonschema.Draft202012Validator(json.loads(LWS_SCHEMA.read_text()),
                                                registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def validate_document(doc: dict, kubernetes_version: str) -> list[str]:
    """Errors of one document (empty list: valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["(top): not a Kubernetes object (apiVersion and kind required)"]
    if doc["apiVersion"] == LWS_API_VERSION:
        return validate_leaderworkerset(doc, kubernetes_version)
    from kubernetes_validate import utils

    try:
        utils.validate(doc, kubernetes_version, strict=True)
    except utils.ValidationError as exc:  # carries the jsonschema error's fields
        where = ".".join(map(str, exc.absolute_path)) or "(top)"
        return [f"{where}: {exc.message}"]
    except utils.SchemaNotFoundError as exc:
        return [f"(top): {exc}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="validate.py", description=__doc__.splitlines()[0])
    p.add_argument("--kubernetes-version", default=None,
                   help="default: KUBERNETES_API_VERSION in versions.env")
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc.name} not installed (make setup)", file=sys.stderr)
        return 2
    version = args.kubernetes_version or pinned_kubernetes_version()
    failed = 0
    for path in args.files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        for doc in docs:
            name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" \
                if isinstance(doc, dict) else "?"
            errors = validate_document(doc, version)
            failed += bool(errors)
            print(f"[{'FAIL' if errors else 'ok  '}] {path.name}: {name} (Kubernetes {version})")
            for error in errors:
                print(f"       {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
