#!/usr/bin/env python3
"""Checks custom resources against the CRDs in deploy/crds.yaml, offline.

For every document of the given files whose apiVersion/kind is one of the CRDs: the
openAPIV3Schema must accept it (jsonschema), and no field may be one the schema does not
declare (the API server would silently prune it, so the manifest would not apply unchanged).
Also checks that every StorageClass in deploy/ names the CSIDriver of deploy/csidriver.yaml.
Exits non-zero with one line per problem.
"""
import copy
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent


def docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def closed(schema):
    """The schema with unknown fields refused where the CRD would prune them."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" and "properties" in node:
            if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
                node["additionalProperties"] = False
        for key in ("properties",):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            walk(node.get(key))

    walk(s)
    # metadata, apiVersion and kind belong to Kubernetes, not to the CRD's schema.
    s.setdefault("properties", {})
    for k in ("metadata", "apiVersion", "kind"):
        s["properties"].setdefault(k, {})
    return s


def crd_schemas():
    out = {}
    for crd in docs(ROOT / "deploy/crds.yaml"):
        spec = crd["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            out[key] = closed(v["schema"]["openAPIV3Schema"])
    return out


def check(files, schemas):
    problems, checked = [], 0
    for f in files:
        for d in docs(f):
            key = (d.get("apiVersion"), d.get("kind"))
            if key not in schemas:
                continue
            checked += 1
            v = jsonschema.Draft7Validator(schemas[key])
            for e in v.iter_errors(d):
                where = "/".join(str(p) for p in e.absolute_path) or "(root)"
                problems.append(f"{f}: {key[1]} {d['metadata']['name']!r}: {where}: {e.message}")
    return problems, checked


def main():
    schemas = crd_schemas()
    files = sys.argv[1:] or [str(p) for p in sorted((ROOT / "deploy").rglob("*.yaml"))]
    problems, checked = check(files, schemas)

    # The validation must be able to fail: a source type bicsi does not know and an unknown
    # field are refused.
    bad = {"apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
           "metadata": {"name": "bad"}, "spec": {"sourceType": "ftp", "sorceParameters": {}}}
    errors = list(jsonschema.Draft7Validator(schemas[("longhorn.io/v1beta2", "BackingImage")]).iter_errors(bad))
    if len(errors) < 2:
        problems.append(f"the BackingImage schema accepted a bad manifest: {[e.message for e in errors]}")

    driver = [d for d in docs(ROOT / "deploy/csidriver.yaml") if d["kind"] == "CSIDriver"][0]["metadata"]["name"]
    for p in sorted((ROOT / "deploy").rglob("*.yaml")):
        for d in docs(p):
            if d.get("kind") == "StorageClass" and d.get("provisioner") != driver:
                problems.append(f"{p}: StorageClass {d['metadata']['name']!r}: provisioner "
                                f"{d.get('provisioner')!r} is not the CSIDriver {driver!r}")

    for line in problems:
        print(line, file=sys.stderr)
    print(f"custom resources checked against deploy/crds.yaml: {checked}; problems: {len(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
