"""The examples a newcomer copies must work: the sample configuration
parses, and every pod in examples/ (plain pods, static pods, Deployment
templates) is one pufflet admits and can give every volume to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pufflet import config
from pufflet.agent import admit

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The parent refuses hostPath whatever admission says (no bind mounts on
# OpenBSD, priv/volumes.py): an example must not need it.
GIVABLE = frozenset(admit.SUPPORTED_VOLUMES) - {"hostPath"}


def _pods() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = f"{path.relative_to(EXAMPLES)}:{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] == "Pod":
                found.append((name, doc))
            elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
                tmpl = doc["spec"]["template"]
                found.append((name, {"metadata": tmpl.get("metadata") or {},
                                     "spec": tmpl["spec"]}))
    return found


PODS = _pods()


def test_there_are_example_pods():
    kinds = {n.split(":")[0] for n, _ in PODS}
    assert {"webpod.yaml", "deployment.yaml", "static/hello.yaml"} <= kinds


def test_sample_configuration_parses():
    cfg = config.load(str(EXAMPLES / "pufflet.conf"))
    assert cfg.hostpaths == () or all(h.prefix.startswith("/") for h in cfg.hostpaths)


@pytest.mark.parametrize("name,pod", PODS, ids=[n for n, _ in PODS])
def test_example_pod_is_admitted(name, pod):
    def lookup(kind, namespace, obj):
        if kind == "runtimeclasses" and obj == "pufflet":
            return {"handler": "pufflet"}
        return None
    cfg = config.load(str(EXAMPLES / "pufflet.conf"))
    err = admit.admission_error(pod, node_is_dedicated=True, max_pods=cfg.max_pods,
                                running_pods=0, lookup=lookup, hostpaths=cfg.hostpaths,
                                supported_volume_types=GIVABLE,
                                node_labels={"kubernetes.io/os": "openbsd"},
                                node_name="puffy")
    assert err is None, err
