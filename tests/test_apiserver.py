"""The API server emulator, exercised only through the real kubernetes client."""
from __future__ import annotations

import base64
import datetime
import json
import subprocess
import threading
import time
import uuid

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from apiserver import ApiServer
from apiserver.pki import make_csr, new_key, verify


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    srv = ApiServer(tmp_path_factory.mktemp("apiserver"), bookmark_interval=0.3)
    srv.start()
    yield srv
    srv.stop()
    assert srv.bugs == []


def _client(api, user="admin", **kw):
    return config.new_client_from_config(config_file=str(api.kubeconfig(user, **kw)))


@pytest.fixture(scope="module")
def core(api):
    return client.CoreV1Api(_client(api))


@pytest.fixture
def ns(core):
    name = "t-" + uuid.uuid4().hex[:8]
    core.create_namespace({"metadata": {"name": name}})
    return name


def _raw(c, method, path, body=None, content_type="application/json"):
    """A request through the client's own connection pool (certs, CA) that
    skips the client's body validation."""
    return c.rest_client.pool_manager.request(
        method, c.configuration.host + path, body=json.dumps(body) if body is not None else None,
        headers={"Content-Type": content_type, "Accept": "application/json"})


def _status(e: ApiException) -> dict:
    return json.loads(e.body)


def _pod(name, node=None, **spec):
    s = {"containers": [{"name": "c", "image": "registry.example/app:1.0"}], **spec}
    if node:
        s["nodeName"] = node
    return {"metadata": {"name": name, "labels": {"app": name}}, "spec": s}


def _node(name, **labels):
    return {"metadata": {"name": name, "labels": labels}, "status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "Starting"}]}}


# -- discovery and basics ---------------------------------------------------------
def test_discovery(api):
    c = _client(api)
    assert client.VersionApi(c).get_code().major == "1"
    names = {r.name for r in client.CoreV1Api(c).get_api_resources().resources}
    assert {"pods", "pods/status", "nodes", "nodes/status", "serviceaccounts/token"} <= names
    groups = {g.name for g in client.ApisApi(c).get_api_versions().groups}
    assert {"coordination.k8s.io", "certificates.k8s.io", "node.k8s.io"} <= groups
    leases = client.CoordinationV1Api(c).get_api_resources()
    assert [r.name for r in leases.resources] == ["leases"]


def test_bootstrap_namespaces_have_default_sa_and_root_ca(core):
    for ns in ("default", "kube-system", "kube-node-lease", "kube-public"):
        assert core.read_namespace(ns).status.phase == "Active"
        core.read_namespaced_service_account("default", ns)
        cm = core.read_namespaced_config_map("kube-root-ca.crt", ns)
        assert "BEGIN CERTIFICATE" in cm.data["ca.crt"]


def test_no_credentials_is_401(api):
    c = _client(api, None)
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(c).list_namespace()
    assert e.value.status == 401
    assert _status(e.value)["reason"] == "Unauthorized"
    assert api.request_log[-1].status == 401


def test_unknown_token_is_401(api):
    api.add_token("good-token", "alice", ["devs"])
    c = _client(api, "mallory", token="x")
    api.authn._tokens.pop("x")
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(c).list_namespace()
    assert e.value.status == 401


# -- object semantics -------------------------------------------------------------
def test_configmap_crud_conflict_and_404(core, ns):
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    md = cm.metadata
    assert md.uid and md.resource_version and md.creation_timestamp
    assert md.namespace == ns
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
    st = _status(e.value)
    assert (e.value.status, st["reason"], st["details"]) == (409, "AlreadyExists",
                                                            {"name": "cm", "kind": "configmaps"})
    assert st["message"] == 'configmaps "cm" already exists'
    cm.data["a"] = "2"
    cm2 = core.replace_namespaced_config_map("cm", ns, cm)
    assert int(cm2.metadata.resource_version) > int(md.resource_version)
    cm.data["a"] = "3"               # still carries the old resourceVersion
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map("cm", ns, cm)
    st = _status(e.value)
    assert (e.value.status, st["reason"]) == (409, "Conflict")
    assert st["message"] == ('Operation cannot be fulfilled on configmaps "cm": the object has been '
                             'modified; please apply your changes to the latest version and try again')
    cm.metadata.resource_version = None      # unconditional update
    assert core.replace_namespaced_config_map("cm", ns, cm).data == {"a": "3"}
    core.delete_namespaced_config_map("cm", ns)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("cm", ns)
    st = _status(e.value)
    assert (e.value.status, st["reason"], st["message"]) == (404, "NotFound", 'configmaps "cm" not found')
    assert st["kind"] == "Status" and st["status"] == "Failure" and st["code"] == 404


def test_noop_update_keeps_resource_version(core, ns):
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "same"}, "data": {"a": "1"}})
    again = core.replace_namespaced_config_map("same", ns, cm)
    assert again.metadata.resource_version == cm.metadata.resource_version


def test_generate_name_and_invalid_name(core, ns):
    s = core.create_namespaced_secret(ns, {"metadata": {"generateName": "tok-"},
                                           "stringData": {"k": "v"}})
    assert s.metadata.name.startswith("tok-") and len(s.metadata.name) == 9
    assert s.type == "Opaque" and base64.b64decode(s.data["k"]) == b"v"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "Bad_Name"}})
    assert e.value.status == 422 and _status(e.value)["reason"] == "Invalid"


def test_secret_string_data_is_merged_on_every_write(core, ns):
    core.create_namespaced_secret(ns, {"metadata": {"name": "sd"},
                                       "data": {"a": base64.b64encode(b"1").decode()},
                                       "stringData": {"b": "2"}})
    s = core.patch_namespaced_secret("sd", ns, {"stringData": {"a": "3"}})
    assert {k: base64.b64decode(v) for k, v in s.data.items()} == {"a": b"3", "b": b"2"}
    assert s.string_data is None
    s.string_data = {"c": "4"}
    s = core.replace_namespaced_secret("sd", ns, s)
    assert sorted(s.data) == ["a", "b", "c"] and s.string_data is None


def test_missing_namespace_is_404(core):
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("nope", {"metadata": {"name": "x"}})
    assert e.value.status == 404 and _status(e.value)["message"] == 'namespaces "nope" not found'


def test_other_resources_crud(api, ns):
    c = _client(api)
    core = client.CoreV1Api(c)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "sa1"}})
    assert core.read_namespaced_service_account("sa1", ns).metadata.name == "sa1"
    ev = core.create_namespaced_event(ns, {"metadata": {"name": "e1"},
                                           "involvedObject": {"kind": "Pod", "name": "p"},
                                           "reason": "Started", "type": "Normal",
                                           "firstTimestamp": "2024-01-02T03:04:05.123456+00:00"})
    assert ev.first_timestamp.microsecond == 0        # metav1.Time is whole seconds
    assert [e.metadata.name for e in core.list_namespaced_event(
        ns, field_selector="reason=Started").items] == ["e1"]
    ev2 = client.EventsV1Api(c).create_namespaced_event(ns, {
        "metadata": {"name": "e2"}, "eventTime": "2024-01-02T03:04:05.123456Z",
        "reportingController": "pufflet", "reportingInstance": "n1", "action": "Start",
        "reason": "Started", "type": "Normal", "regarding": {"kind": "Pod", "name": "p"}})
    assert ev2.event_time.microsecond == 123456
    rc = client.NodeV1Api(c).create_runtime_class({"metadata": {"name": "openbsd"}, "handler": "pufflet"})
    assert rc.handler == "pufflet"
    client.NodeV1Api(c).delete_runtime_class("openbsd")
    coord = client.CoordinationV1Api(c)
    lease = coord.create_namespaced_lease(ns, {"metadata": {"name": "l"}, "spec": {
        "holderIdentity": "n1", "leaseDurationSeconds": 40,
        "renewTime": "2024-01-02T03:04:05.5Z"}})
    assert lease.spec.renew_time.microsecond == 500000
    # The v37 client validates bodies itself, so send the bad one raw.
    r = _raw(c, "POST", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
             {"metadata": {"name": "l2"}, "spec": {"leaseDurationSeconds": "forty"}})
    assert r.status == 400 and json.loads(r.data)["reason"] == "BadRequest"
    lease.spec.lease_duration_seconds = 41
    assert coord.replace_namespaced_lease("l", ns, lease).spec.lease_duration_seconds == 41


def test_node_status_isolation(core):
    core.create_node(_node("iso-node"))
    n = core.read_node("iso-node")
    assert n.status.conditions[0].reason == "Starting"      # nodes keep status on create
    n.status.conditions[0].reason = "Changed"
    n.metadata.labels = {"x": "y"}
    n = core.replace_node("iso-node", n)
    assert n.status.conditions[0].reason == "Starting" and n.metadata.labels == {"x": "y"}
    n.status.conditions[0].reason = "Ready"
    n.spec.unschedulable = True
    n = core.replace_node_status("iso-node", n)
    assert n.status.conditions[0].reason == "Ready" and not n.spec.unschedulable
    core.delete_node("iso-node")


def test_pod_defaults_status_isolation_and_immutability(core, ns):
    p = core.create_namespaced_pod(ns, _pod("p1", node="n1"))
    assert p.status.phase == "Pending" and p.status.qos_class == "BestEffort"
    assert p.metadata.generation == 1
    assert p.spec.restart_policy == "Always" and p.spec.termination_grace_period_seconds == 30
    assert p.spec.containers[0].image_pull_policy == "IfNotPresent"
    assert p.spec.service_account_name == "default"
    assert any(v.name.startswith("kube-api-access-") for v in p.spec.volumes)
    assert {t.key for t in p.spec.tolerations} == {"node.kubernetes.io/not-ready",
                                                   "node.kubernetes.io/unreachable"}
    p.status.phase = "Running"
    p = core.replace_namespaced_pod("p1", ns, p)
    assert p.status.phase == "Pending"
    p.status.phase = "Running"
    p.spec.active_deadline_seconds = 99
    p = core.replace_namespaced_pod_status("p1", ns, p)
    assert p.status.phase == "Running" and p.spec.active_deadline_seconds is None
    p.spec.node_name = "n2"
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_pod("p1", ns, p)
    assert e.value.status == 422 and "pod updates may not change" in _status(e.value)["message"]
    p = core.read_namespaced_pod("p1", ns)
    p.spec.containers[0].image = "registry.example/app:2.0"
    p = core.replace_namespaced_pod("p1", ns, p)
    assert p.metadata.generation == 2


def test_pod_needs_existing_service_account(core, ns):
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod(ns, _pod("p", serviceAccountName="ghost"))
    assert e.value.status == 403
    assert _status(e.value)["message"].endswith('serviceaccount "ghost" not found')


# -- patches ----------------------------------------------------------------------
def _conds(p):
    return {c.type: c.status for c in p.status.conditions}


def test_patch_types_on_pod_status(core, ns):
    core.create_namespaced_pod(ns, _pod("pp", node="n1"))
    base = {"status": {"conditions": [{"type": "Ready", "status": "False"},
                                      {"type": "PodScheduled", "status": "True"}]}}
    core.patch_namespaced_pod_status("pp", ns, base)        # dict -> strategic merge
    p = core.patch_namespaced_pod_status("pp", ns, {"status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0, "image": "x",
                               "imageID": "", "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}})
    assert _conds(p) == {"Ready": "True", "PodScheduled": "True"}       # merged by type
    assert api_content_type(core) == "application/strategic-merge-patch+json"
    # Lists without a merge key (containerStatuses) are replaced whole.
    p = core.patch_namespaced_pod_status("pp", ns, {"status": {"containerStatuses": [
        {"name": "d", "ready": False, "restartCount": 1, "image": "y", "imageID": "",
         "state": {"waiting": {"reason": "x"}}}]}})
    assert [c.name for c in p.status.container_statuses] == ["d"]
    # JSON merge patch replaces lists.
    p = core.patch_namespaced_pod_status("pp", ns, {"status": {"conditions": [
        {"type": "Ready", "status": "False"}]}}, _content_type="application/merge-patch+json")
    assert _conds(p) == {"Ready": "False"}
    # JSON patch (a list body), including a test op.
    p = core.patch_namespaced_pod_status("pp", ns, [
        {"op": "test", "path": "/status/conditions/0/type", "value": "Ready"},
        {"op": "replace", "path": "/status/conditions/0/status", "value": "True"},
        {"op": "add", "path": "/status/conditions/-", "value": {"type": "X", "status": "True"}}])
    assert _conds(p) == {"Ready": "True", "X": "True"}
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod_status("pp", ns, [
            {"op": "test", "path": "/status/phase", "value": "Running"}])
    assert e.value.status == 422
    # A status patch cannot touch spec; a main-resource patch cannot touch status.
    p = core.patch_namespaced_pod_status("pp", ns, {"spec": {"activeDeadlineSeconds": 5}})
    assert p.spec.active_deadline_seconds is None
    p = core.patch_namespaced_pod("pp", ns, {"status": {"phase": "Failed"},
                                             "metadata": {"labels": {"new": "1"}}})
    assert p.status.phase == "Pending" and p.metadata.labels["new"] == "1"
    # Strategic merge: $patch delete in a merge-keyed list.
    p = core.patch_namespaced_pod_status("pp", ns, {"status": {"conditions": [
        {"type": "X", "$patch": "delete"}]}})
    assert _conds(p) == {"Ready": "True"}


def api_content_type(core):
    """The Content-Type of the client's last PATCH, as recorded by urllib3's pool."""
    return LAST_PATCH_CT.get("ct")


LAST_PATCH_CT: dict = {}


@pytest.fixture(autouse=True)
def _record_patch_content_type(monkeypatch):
    import kubernetes.client.rest as rest
    orig = rest.RESTClientObject.request

    def spy(self, method, url, headers=None, *a, **kw):
        out = orig(self, method, url, headers, *a, **kw)
        if method == "PATCH":
            LAST_PATCH_CT["ct"] = (headers or {}).get("Content-Type")
        return out
    monkeypatch.setattr(rest.RESTClientObject, "request", spy)


def test_patch_resource_version_precondition(core, ns):
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1"}})
    core.patch_namespaced_config_map("c", ns, {"data": {"a": "2"}})
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_config_map("c", ns, {"metadata": {
            "resourceVersion": cm.metadata.resource_version}, "data": {"a": "3"}})
    assert e.value.status == 409


# -- list and watch ---------------------------------------------------------------
def test_selectors_on_list(core, ns):
    core.create_namespaced_pod(ns, _pod("a", node="n1"))
    core.create_namespaced_pod(ns, _pod("b", node="n2"))
    core.create_namespaced_pod(ns, _pod("c"))
    names = lambda **kw: sorted(p.metadata.name for p in core.list_namespaced_pod(ns, **kw).items)
    assert names(field_selector="spec.nodeName=n1") == ["a"]
    assert names(field_selector="spec.nodeName!=n1") == ["b", "c"]
    assert names(field_selector="spec.nodeName=") == ["c"]
    assert names(field_selector="metadata.name==b,status.phase=Pending") == ["b"]
    assert names(label_selector="app in (a,b)") == ["a", "b"]
    assert names(label_selector="app notin (a),app") == ["b", "c"]
    assert names(label_selector="!app") == []
    assert names(label_selector="app!=c") == ["a", "b"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(
        field_selector=f"spec.nodeName=n2,metadata.namespace={ns}").items] == ["b"]
    with pytest.raises(ApiException) as e:
        core.list_namespaced_pod(ns, field_selector="spec.bogus=1")
    assert e.value.status == 400
    first = core.list_namespaced_pod(ns, limit=2)
    assert len(first.items) == 2 and first.metadata._continue
    rest = core.list_namespaced_pod(ns, limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["c"] and not rest.metadata._continue


def _collect(gen, n, timeout=5.0):
    out, end = [], time.time() + timeout
    for ev in gen:
        out.append(ev)
        if len(out) >= n or time.time() > end:
            break
    return out


def test_watch_from_resource_version_in_order(core, ns):
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w"}, "data": {"v": "1"}})
    core.patch_namespaced_config_map("w", ns, {"data": {"v": "2"}})
    core.delete_namespaced_config_map("w", ns)
    w = watch.Watch()
    evs = _collect(w.stream(core.list_namespaced_config_map, ns, resource_version=rv,
                            timeout_seconds=3), 3)
    w.stop()
    assert [(e["type"], e["object"].metadata.name) for e in evs] == [
        ("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]
    rvs = [int(e["object"].metadata.resource_version) for e in evs]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)


def test_watch_live_with_field_selector(core, ns):
    rv = core.list_namespaced_pod(ns).metadata.resource_version
    got = []

    def run():
        w = watch.Watch()
        for ev in w.stream(core.list_pod_for_all_namespaces, field_selector="spec.nodeName=wn1",
                           resource_version=rv, timeout_seconds=4):
            got.append((ev["type"], ev["object"].metadata.name))
            if len(got) == 3:
                w.stop()
    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    core.create_namespaced_pod(ns, _pod("other", node="wn2"))
    core.create_namespaced_pod(ns, _pod("mine", node="wn1"))
    core.patch_namespaced_pod_status("mine", ns, {"status": {"phase": "Running"}})
    core.delete_namespaced_pod("mine", ns, grace_period_seconds=0)
    t.join(6)
    assert got == [("ADDED", "mine"), ("MODIFIED", "mine"), ("DELETED", "mine")]


def test_watch_without_resource_version_lists_first(core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "pre"}})
    w = watch.Watch()
    evs = _collect(w.stream(core.list_namespaced_config_map, ns, timeout_seconds=2), 2)
    w.stop()
    assert {(e["type"], e["object"].metadata.name) for e in evs} == {
        ("ADDED", "pre"), ("ADDED", "kube-root-ca.crt")}


def test_watch_too_old_resource_version_is_410(tmp_path):
    with ApiServer(tmp_path, watch_window=5) as api:
        core = client.CoreV1Api(_client(api))
        rv = core.list_namespaced_config_map("default").metadata.resource_version
        for i in range(10):
            core.create_namespaced_config_map("default", {"metadata": {"name": f"c{i}"}})
        # With timeout_seconds the client does not retry: the ERROR event becomes an exception.
        with pytest.raises(ApiException) as e:
            list(watch.Watch().stream(core.list_namespaced_config_map, "default",
                                      resource_version=rv, timeout_seconds=2))
        assert e.value.status == 410 and "Expired" in e.value.reason
        # The raw stream: HTTP 200 then one ERROR event carrying a 410 Status.
        resp = core.list_namespaced_config_map("default", watch=True, resource_version=rv,
                                               timeout_seconds=2, _preload_content=False)
        assert resp.status == 200
        ev = json.loads(resp.data.decode().splitlines()[0])
        assert ev["type"] == "ERROR" and ev["object"]["code"] == 410
        assert ev["object"]["reason"] == "Expired"
        assert ev["object"]["message"].startswith(f"too old resource version: {rv} (")
        api.compact()
        rv2 = core.list_namespaced_config_map("default").metadata.resource_version
        with pytest.raises(ApiException):
            list(watch.Watch().stream(core.list_namespaced_config_map, "default",
                                      resource_version=str(int(rv2) - 1), timeout_seconds=1))


def test_bookmarks(core, ns):
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    resp = core.list_namespaced_config_map(ns, watch=True, resource_version=rv,
                                           allow_watch_bookmarks=True, timeout_seconds=1,
                                           _preload_content=False)
    evs = [json.loads(x) for x in resp.data.decode().splitlines() if x]
    assert evs and all(e["type"] == "BOOKMARK" for e in evs)
    assert evs[0]["object"]["kind"] == "ConfigMap"
    assert int(evs[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)


def test_watch_timeout_is_honoured(core, ns):
    t = time.time()
    list(watch.Watch().stream(core.list_namespaced_config_map, ns,
                              resource_version=core.list_namespaced_config_map(ns).metadata.resource_version,
                              timeout_seconds=1))
    assert 0.9 < time.time() - t < 3


# -- deletion ---------------------------------------------------------------------
def test_graceful_pod_delete(core, ns):
    core.create_namespaced_pod(ns, _pod("g", node="n1", terminationGracePeriodSeconds=20))
    p = core.delete_namespaced_pod("g", ns)
    assert p.metadata.deletion_timestamp is not None
    assert p.metadata.deletion_grace_period_seconds == 20
    p = core.read_namespaced_pod("g", ns)                 # still there, terminating
    assert p.metadata.deletion_grace_period_seconds == 20
    p = core.delete_namespaced_pod("g", ns, grace_period_seconds=5)   # shortened
    assert p.metadata.deletion_grace_period_seconds == 5
    core.delete_namespaced_pod("g", ns, grace_period_seconds=0,
                               body={"preconditions": {"uid": p.metadata.uid}})
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("g", ns)
    assert e.value.status == 404


def test_unbound_pod_deletes_at_once_and_finalizers_hold(core, ns):
    core.create_namespaced_pod(ns, _pod("u"))
    core.delete_namespaced_pod("u", ns)
    assert core.list_namespaced_pod(ns).items == []
    core.create_namespaced_config_map(ns, {"metadata": {"name": "f", "finalizers": ["x/y"]}})
    core.delete_namespaced_config_map("f", ns)
    cm = core.read_namespaced_config_map("f", ns)
    assert cm.metadata.deletion_timestamp and cm.metadata.deletion_grace_period_seconds == 0
    core.patch_namespaced_config_map("f", ns, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("f", ns)


def test_wrong_uid_precondition_is_409(core, ns):
    core.create_namespaced_pod(ns, _pod("pc", node="n1"))
    with pytest.raises(ApiException) as e:
        core.delete_namespaced_pod("pc", ns, body={"preconditions": {"uid": "nope"}})
    assert e.value.status == 409


# -- node identity ------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_env(api, core):
    """Node "n1" (as its kubelet) plus objects to probe the authorizer with."""
    kube = _client(api, "system:node:n1")
    ncore = client.CoreV1Api(kube)
    ncore.create_node(_node("n1"))
    core.create_node(_node("n2"))
    core.create_namespace({"metadata": {"name": "nodeauth"}})
    core.create_namespaced_secret("nodeauth", {"metadata": {"name": "used"}, "data": {}})
    core.create_namespaced_secret("nodeauth", {"metadata": {"name": "unused"}, "data": {}})
    core.create_namespaced_config_map("nodeauth", {"metadata": {"name": "envcm"}})
    core.create_namespaced_pod("nodeauth", _pod("mine", node="n1", volumes=[
        {"name": "s", "secret": {"secretName": "used"}}], containers=[
        {"name": "c", "image": "x:1", "envFrom": [{"configMapRef": {"name": "envcm"}}]}]))
    core.create_namespaced_pod("nodeauth", _pod("theirs", node="n2"))
    return kube


def _code(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return 200
    except ApiException as e:
        return e.status


def test_node_authorizer_matrix(api, node_env):
    c = client.CoreV1Api(node_env)
    coord = client.CoordinationV1Api(node_env)
    ns = "nodeauth"
    assert _code(c.read_node, "n1") == 200
    assert _code(c.read_node, "n2") == 403
    assert _code(c.list_node) == 403
    assert _code(c.list_node, field_selector="metadata.name=n1") == 200
    assert _code(c.patch_node_status, "n1", {"status": {"conditions": [
        {"type": "Ready", "status": "True"}]}}) == 200
    assert _code(c.patch_node_status, "n2", {"status": {}}) == 403
    assert _code(c.patch_node, "n1", {"metadata": {"labels": {"node-restriction.kubernetes.io/x": "1"}}}) == 403
    assert _code(c.patch_node, "n1", {"metadata": {"labels": {"pufflet.example/x": "1"}}}) == 200
    assert _code(c.patch_node, "n1", {"spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}) == 403
    assert _code(c.list_pod_for_all_namespaces) == 403
    assert _code(c.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1") == 200
    assert _code(c.list_pod_for_all_namespaces, field_selector="spec.nodeName=n2") == 403
    assert _code(c.read_namespaced_pod, "mine", ns) == 200
    assert _code(c.read_namespaced_pod, "theirs", ns) == 403
    assert _code(c.patch_namespaced_pod_status, "mine", ns, {"status": {"phase": "Running"}}) == 200
    assert _code(c.patch_namespaced_pod_status, "theirs", ns, {"status": {"phase": "Running"}}) == 403
    assert _code(c.patch_namespaced_pod, "mine", ns, {"metadata": {"labels": {"a": "b"}}}) == 403
    assert _code(c.read_namespaced_secret, "used", ns) == 200
    assert _code(c.read_namespaced_config_map, "envcm", ns) == 200
    assert _code(c.list_namespaced_secret, ns, field_selector="metadata.name=used") == 200
    assert _code(c.read_namespaced_secret, "unused", ns) == 403
    assert _code(c.list_namespaced_secret, ns) == 403
    # Leases: only its own, only in kube-node-lease.
    lease = {"metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40}}
    assert _code(coord.create_namespaced_lease, "kube-node-lease", lease) == 200
    assert _code(coord.read_namespaced_lease, "n1", "kube-node-lease") == 200
    assert _code(coord.create_namespaced_lease, "kube-node-lease",
                 {"metadata": {"name": "n2"}, "spec": {}}) == 403
    assert _code(coord.create_namespaced_lease, "default", lease) == 403
    # Pods: only mirror pods bound to itself may be created; deletes of own pods.
    n1 = client.CoreV1Api(_client(api)).read_node("n1")
    mirror = _pod("static-n1", node="n1")
    mirror["metadata"]["annotations"] = {"kubernetes.io/config.mirror": "hash"}
    mirror["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": "n1",
                                              "uid": n1.metadata.uid, "controller": True}]
    assert _code(c.create_namespaced_pod, ns, mirror) == 200
    assert _code(c.create_namespaced_pod, ns, _pod("plain", node="n1")) == 403
    assert _code(c.delete_namespaced_pod, "theirs", ns) == 403
    assert _code(c.delete_namespaced_pod, "static-n1", ns, grace_period_seconds=0) == 200
    # Events, CSRs, reviews: allowed.
    assert _code(c.create_namespaced_event, ns, {"metadata": {"name": "n1.e"},
                                                 "involvedObject": {"kind": "Node", "name": "n1"}}) == 200


def test_forbidden_message_format(node_env):
    c = client.CoreV1Api(node_env)
    with pytest.raises(ApiException) as e:
        c.read_namespaced_secret("unused", "nodeauth")
    st = _status(e.value)
    assert st["reason"] == "Forbidden" and st["details"] == {"name": "unused", "kind": "secrets"}
    assert st["message"] == ('secrets "unused" is forbidden: User "system:node:n1" cannot get '
                             'resource "secrets" in API group "" in the namespace "nodeauth": '
                             "no relationship found between node 'n1' and this object")
    with pytest.raises(ApiException) as e:
        c.patch_node_status("n2", {"status": {}})
    assert _status(e.value)["message"] == 'nodes "n2" is forbidden: node "n1" is not allowed to modify node "n2"'


def test_request_log_records_calls(api, node_env):
    c = client.CoreV1Api(node_env)
    before = len(api.request_log)
    c.read_node("n1")
    entry = api.request_log[before]
    assert (entry.verb, entry.path, entry.user, entry.status) == (
        "get", "/api/v1/nodes/n1", "system:node:n1", 200)


# -- tokens and reviews -----------------------------------------------------------
def test_token_request_then_review_and_use(api, core, ns):
    core.create_namespaced_service_account(ns, {"metadata": {"name": "robot"}})
    tr = core.create_namespaced_service_account_token("robot", ns, {"spec": {"expirationSeconds": 600}})
    assert tr.status.token and tr.status.expiration_timestamp
    auth = client.AuthenticationV1Api(_client(api))
    rev = auth.create_token_review({"spec": {"token": tr.status.token}})
    assert rev.status.authenticated
    assert rev.status.user.username == f"system:serviceaccount:{ns}:robot"
    assert f"system:serviceaccounts:{ns}" in rev.status.user.groups
    bad = auth.create_token_review({"spec": {"token": "garbage"}})
    assert not bad.status.authenticated
    # The token authenticates API calls; the SA has no permissions yet.
    sa_api = client.CoreV1Api(_client(api, f"system:serviceaccount:{ns}:robot", token=tr.status.token))
    assert _code(sa_api.list_namespaced_pod, ns) == 403
    api.allow(f"system:serviceaccount:{ns}:robot", "list", "pods", namespace=ns)
    assert _code(sa_api.list_namespaced_pod, ns) == 200
    core.delete_namespaced_service_account("robot", ns)
    assert not auth.create_token_review({"spec": {"token": tr.status.token}}).status.authenticated


def test_token_duration_shortens_tokens_not_the_validation(api, core, ns):
    """token_duration (the test knob standing for
    --service-account-max-token-expiration): the token and the answer's
    spec.expirationSeconds are shortened, with a Warning; what clients may
    ask for is still validated as the real server does."""
    core.create_namespaced_service_account(ns, {"metadata": {"name": "brief"}})
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service_account_token(
            "brief", ns, {"spec": {"expirationSeconds": 599}})
    assert e.value.status == 422
    api.token_duration = 2
    try:
        resp = core.create_namespaced_service_account_token(
            "brief", ns, {"spec": {"expirationSeconds": 600}}, _preload_content=False)
    finally:
        api.token_duration = None
    tr = json.loads(resp.data)
    assert tr["spec"]["expirationSeconds"] == 2
    assert "shortened to 2 seconds" in resp.headers["Warning"]
    exp = datetime.datetime.fromisoformat(tr["status"]["expirationTimestamp"].replace("Z", "+00:00"))
    left = (exp - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 0 < left <= 2
    auth = client.AuthenticationV1Api(_client(api))
    assert auth.create_token_review({"spec": {"token": tr["status"]["token"]}}).status.authenticated
    time.sleep(left + 0.1)
    assert not auth.create_token_review(
        {"spec": {"token": tr["status"]["token"]}}).status.authenticated


def test_subject_access_review(api, node_env):
    authz = client.AuthorizationV1Api(_client(api))

    def sar(user, groups, **attrs):
        return authz.create_subject_access_review({"spec": {
            "user": user, "groups": groups, "resourceAttributes": attrs}}).status.allowed
    assert sar("system:node:n1", ["system:nodes"], verb="get", resource="nodes", name="n1")
    assert not sar("system:node:n1", ["system:nodes"], verb="get", resource="nodes", name="n2")
    assert sar("someone", ["system:masters"], verb="delete", resource="nodes")
    assert not sar("bob", [], verb="get", resource="nodes", subresource="proxy", name="n1")
    api.allow("bob", "get", "nodes/proxy")
    assert sar("bob", [], verb="get", resource="nodes", subresource="proxy", name="n1")
    assert not sar("bob", [], verb="get", resource="nodes", subresource="log", name="n1")
    api.deny("bob", "get", "nodes/proxy", name="n9")
    assert not sar("bob", [], verb="get", resource="nodes", subresource="proxy", name="n9")
    # The node can ask too (system:node rules include SAR/TokenReview create).
    nauthz = client.AuthorizationV1Api(node_env)
    assert nauthz.create_subject_access_review({"spec": {"user": "bob", "resourceAttributes": {
        "verb": "get", "resource": "nodes", "subresource": "proxy", "name": "n1"}}}).status.allowed


# -- CSR ----------------------------------------------------------------------------
def _csr_body(tmp_path, cn, orgs, signer="kubernetes.io/kube-apiserver-client-kubelet",
              usages=("digital signature", "client auth"), name=None):
    pem = make_csr(new_key(tmp_path / f"{uuid.uuid4().hex}.key"), cn, orgs)
    return {"metadata": {"name": name or "csr-" + uuid.uuid4().hex[:6]}, "spec": {
        "request": base64.b64encode(pem).decode(), "signerName": signer,
        "usages": list(usages), "expirationSeconds": 3600}}


def test_csr_approve_signs_with_cluster_ca(api, node_env, tmp_path):
    certs = client.CertificatesV1Api(node_env)
    made = certs.create_certificate_signing_request(
        _csr_body(tmp_path, "system:node:n1", ["system:nodes"]))
    assert made.spec.username == "system:node:n1" and "system:nodes" in made.spec.groups
    name = made.metadata.name
    api.approve_csr(name)
    got = certs.read_certificate_signing_request(name)
    assert {c.type for c in got.status.conditions} == {"Approved"}
    pem = base64.b64decode(got.status.certificate)
    assert verify(api.ca.cert, pem)
    out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-enddate"], input=pem,
                         capture_output=True, check=True).stdout.decode()
    assert "CN = system:node:n1" in out
    # Approval through the subresource, by an admin.
    admin = client.CertificatesV1Api(_client(api))
    csr2 = certs.create_certificate_signing_request(
        _csr_body(tmp_path, "system:node:n1", ["system:nodes"]))
    csr2 = admin.read_certificate_signing_request(csr2.metadata.name)
    csr2.status.conditions = [client.V1CertificateSigningRequestCondition(
        type="Approved", status="True", reason="AutoApproved", message="ok")]
    admin.replace_certificate_signing_request_approval(csr2.metadata.name, csr2)
    got = admin.read_certificate_signing_request(csr2.metadata.name)
    assert verify(api.ca.cert, base64.b64decode(got.status.certificate))
    # The node itself may not approve.
    assert _code(certs.replace_certificate_signing_request_approval, csr2.metadata.name, got) == 403


def test_csr_short_duration_and_bad_subject(tmp_path):
    with ApiServer(tmp_path, csr_duration=120) as api:
        certs = client.CertificatesV1Api(_client(api))
        made = certs.create_certificate_signing_request(_csr_body(tmp_path, "system:node:x", ["system:nodes"]))
        got = api.approve_csr(made.metadata.name)
        pem = base64.b64decode(got["status"]["certificate"])
        end = subprocess.run(["openssl", "x509", "-noout", "-checkend", "200"], input=pem,
                             capture_output=True)
        assert end.returncode == 1                  # expires within 200 s
        bad = certs.create_certificate_signing_request(_csr_body(tmp_path, "mallory", []))
        got = api.approve_csr(bad.metadata.name)
        assert "Failed" in {c["type"] for c in got["status"]["conditions"]}
        assert "certificate" not in got["status"]


def test_kubelet_serving_csrs_follow_the_signers_rules(tmp_path):
    """kubernetes.io/kubelet-serving: never auto-approved, and signed only
    with DNS/IP SANs, no email, usages exactly {digital signature, server
    auth} (+ key encipherment), as ValidateKubeletServingCSR."""
    with ApiServer(tmp_path, auto_approve_csr=True) as api:
        certs = client.CertificatesV1Api(_client(api))

        def submit(usages=("digital signature", "server auth"), **sans):
            pem = make_csr(new_key(tmp_path / f"{uuid.uuid4().hex}.key"), "system:node:n1",
                           ["system:nodes"], **sans)
            return certs.create_certificate_signing_request({
                "metadata": {"generateName": "csr-"},
                "spec": {"request": base64.b64encode(pem).decode(),
                         "signerName": "kubernetes.io/kubelet-serving",
                         "usages": list(usages)}}).metadata.name

        good = submit(dns=["n1"], ips=["192.0.2.1"])
        got = certs.read_certificate_signing_request(good)
        assert not (got.status and got.status.conditions), "kubelet-serving was auto-approved"
        pem = base64.b64decode(api.approve_csr(good)["status"]["certificate"])
        text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem,
                              capture_output=True, check=True).stdout.decode()
        assert "DNS:n1, IP Address:192.0.2.1" in text and "TLS Web Server Authentication" in text
        # The client signer still is auto-approved.
        client_csr = certs.create_certificate_signing_request(
            _csr_body(tmp_path, "system:node:n1", ["system:nodes"]))
        assert certs.read_certificate_signing_request(client_csr.metadata.name).status.certificate
        for name, why in ((submit(), "DNS or IP subjectAltName is required"),
                          (submit(usages=("server auth",), dns=["n1"]), "usages did not match"),
                          (submit(usages=("digital signature", "server auth", "client auth"),
                                  dns=["n1"]), "usages did not match")):
            got = api.approve_csr(name)
            failed = [c for c in got["status"]["conditions"] if c["type"] == "Failed"]
            assert failed and why in failed[0]["message"] and "certificate" not in got["status"]


# -- outages and injected failures --------------------------------------------------
def test_fail_next_and_pause_resume(tmp_path):
    with ApiServer(tmp_path) as api:
        core = client.CoreV1Api(_client(api))
        api.fail_next(2, 503, method="GET", path="/namespaces$")
        for _ in range(2):
            with pytest.raises(ApiException) as e:
                core.list_namespace()
            assert e.value.status == 503
            assert _status(e.value)["reason"] == "ServiceUnavailable"
        core.list_namespace()
        api.fail_next(1, 500, method="POST")
        with pytest.raises(ApiException) as e:
            core.create_namespaced_config_map("default", {"metadata": {"name": "x"}})
        assert e.value.status == 500
        # 429 with Retry-After: urllib3, under the client, retries a GET by itself.
        api.fail_next(1, 429, retry_after=0)
        assert core.read_namespace("default").metadata.name == "default"
        assert [r.status for r in api.request_log[-2:]] == [429, 200]
        api.fail_next(1, 429)
        with pytest.raises(ApiException) as e:      # but not a POST
            core.create_namespaced_config_map("default", {"metadata": {"name": "y"}})
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
        port = api.port
        api.pause()
        with pytest.raises(Exception):
            core.read_namespace("default", _request_timeout=2)
        api.resume()
        assert api.port == port
        assert core.read_namespace("default").metadata.name == "default"


def test_pause_cuts_open_watches(tmp_path):
    with ApiServer(tmp_path) as api:
        core = client.CoreV1Api(_client(api))
        ended = threading.Event()

        def run():
            try:
                for _ in watch.Watch().stream(core.list_namespaced_pod, "default",
                                              resource_version=str(api.store.current_rv()),
                                              timeout_seconds=30):
                    pass
            except Exception:
                pass
            ended.set()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        time.sleep(0.3)
        api.pause()
        assert ended.wait(5)
        api.resume()


def test_connections_send_without_delay(api, core):
    """kube-apiserver is a Go server, and Go sets TCP_NODELAY on every TCP
    connection: an answer written in pieces (headers, body) goes out at
    once instead of waiting for the client's delayed ACK (~40 ms a call)."""
    import socket
    core.list_namespace(_preload_content=False)     # leaves a kept-alive connection
    with api._httpd.conns_lock:
        # (a TLS socket takes over its plain socket's fd: that one is -1)
        conns = [c for c in api._httpd.conns if c.fileno() >= 0]
    assert conns
    assert all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in conns)
