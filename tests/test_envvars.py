"""Container environments, against the kubelet's makeEnvironmentVariables,
getServiceEnvVarMap, envvars.FromServices and containerd's merge."""

import base64

import pytest

from pufflet.agent import downward
from pufflet.agent.envvars import (DEFAULT_PATH, EnvError, container_env, pod_hostname,
                                   service_env)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


OBJECTS = {
    ("configmaps", "ns", "cm"): {"data": {"B": "2", "A": "1", "app.properties": "x=y"}},
    ("configmaps", "ns", "cm2"): {"data": {"A": "from-cm2"}},
    ("secrets", "ns", "sec"): {"data": {"PASSWORD": b64("s3cret"), "A": b64("from-secret")}},
    ("secrets", "ns", "bin"): {"data": {"K": base64.b64encode(b"\xff\xfe").decode()}},
}


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


def svc(name, ns, ip, *ports):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": list(ports)}}


KUBERNETES = svc("kubernetes", "default", "10.96.0.1", {"name": "https", "port": 443})


def pod(**spec):
    return {"metadata": {"name": "web-1", "namespace": "ns", "uid": "u-1",
                         "labels": {"app": "web", "tier": "a\"b"},
                         "annotations": {"note": "line1\nline2"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "sa", "containers": [], **spec}}


def env_of(container, p=None, *, services=(KUBERNETES,), **kw):
    p = p or pod()
    kw.setdefault("lookup", lookup)
    return container_env(p, container, services=services, **kw)


def as_dict(ce):
    return dict(kv.split("=", 1) for kv in ce.env)


def test_base_order_path_hostname_image_then_pod():
    ce = env_of({"name": "c", "env": [{"name": "FOO", "value": "pod"},
                                      {"name": "HOSTNAME", "value": "mine"}]},
                image_env=["PATH=/img/bin", "FOO=image", "ONLY_IMAGE=1", "HOSTNAME=img"],
                services=())
    assert ce.env == ["PATH=/img/bin", "HOSTNAME=mine", "FOO=pod", "ONLY_IMAGE=1"]
    # the image's variables are not the kubelet's: $(VAR) cannot see them
    assert "ONLY_IMAGE" not in ce.variables and "PATH" not in ce.variables


def test_default_path_and_hostname():
    ce = env_of({"name": "c"}, services=())
    assert ce.env == [f"PATH={DEFAULT_PATH}", "HOSTNAME=web-1"]
    ce = env_of({"name": "c"}, pod(hostname="h"), services=(), image_env=["PATH"])
    assert ce.env == ["HOSTNAME=h"]                    # a bare name unsets
    ce = env_of({"name": "c"}, services=(), hostname="node-host")
    assert as_dict(ce)["HOSTNAME"] == "node-host"


@pytest.mark.parametrize("name,hostname,want", [
    ("web-1", None, "web-1"),
    ("web-1", "other", "other"),
    ("a" * 62 + "-b", None, "a" * 62),                 # cut at 63, trailing '-' dropped
    ("a" * 61 + ".-bc", None, "a" * 61),
    ("a" * 70, None, "a" * 63),
])
def test_pod_hostname(name, hostname, want):
    p = {"metadata": {"name": name}, "spec": {"hostname": hostname} if hostname else {}}
    assert pod_hostname(p) == want


def test_env_from_prefix_order_and_precedence():
    c = {"name": "c",
         "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "P_"},
                     {"configMapRef": {"name": "cm2"}},
                     {"secretRef": {"name": "sec"}}],
         "env": [{"name": "A", "value": "from-env"}]}
    ce = env_of(c, services=())
    d = as_dict(ce)
    assert d["P_A"] == "1" and d["P_B"] == "2" and d["P_app.properties"] == "x=y"
    assert d["PASSWORD"] == "s3cret"
    assert d["A"] == "from-env"                        # env beats envFrom
    # keys sorted within a source; a name keeps its first position
    assert [k.split("=")[0] for k in ce.env] == [
        "PATH", "HOSTNAME", "P_A", "P_B", "P_app.properties", "A", "PASSWORD"]
    assert ce.events == []


def test_env_from_later_source_wins():
    c = {"name": "c", "envFrom": [{"configMapRef": {"name": "cm2"}},
                                  {"secretRef": {"name": "sec"}}]}
    assert as_dict(env_of(c, services=()))["A"] == "from-secret"


def test_env_from_missing():
    c = {"name": "c", "envFrom": [{"configMapRef": {"name": "nope", "optional": True}},
                                  {"secretRef": {"name": "nope", "optional": True}}]}
    assert env_of(c, services=()).variables == {}
    with pytest.raises(EnvError, match='configmaps "nope" not found'):
        env_of({"name": "c", "envFrom": [{"configMapRef": {"name": "nope"}}]})
    with pytest.raises(EnvError, match='secrets "nope" not found'):
        env_of({"name": "c", "envFrom": [{"secretRef": {"name": "nope", "optional": False}}]})


def test_env_from_impossible_names_skipped_with_event():
    OBJECTS[("configmaps", "ns", "odd")] = {"data": {"a=b": "1", "ok": "2", "c\x00": "3"}}
    try:
        ce = env_of({"name": "c", "envFrom": [{"configMapRef": {"name": "odd"}}]}, services=())
    finally:
        del OBJECTS[("configmaps", "ns", "odd")]
    assert ce.variables == {"ok": "2"}
    assert ce.events == [("InvalidEnvironmentVariableNames",
                          "Keys [a=b, c\x00] from the EnvFrom configMap ns/odd were skipped "
                          "since they are considered invalid environment variable names.")]


def test_no_api_server():
    with pytest.raises(EnvError, match="couldn't get configMap ns/cm, no kubeClient defined"):
        env_of({"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}}]}, lookup=None)
    with pytest.raises(EnvError, match="couldn't get secret ns/s, no kubeClient defined"):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": {
            "secretKeyRef": {"name": "s", "key": "k", "optional": True}}}]}, lookup=None)


def test_expansion_sees_only_what_is_defined_so_far():
    c = {"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}}],
         "env": [{"name": "X", "value": "$(A)-$(Y)-$(KUBERNETES_SERVICE_HOST)"},
                 {"name": "Y", "value": "y"},
                 {"name": "Z", "value": "$(Y)$$(Y)"},
                 {"name": "E", "value": ""},
                 {"name": "A", "value": "$(A)$(A)"}]}
    d = as_dict(env_of(c))
    assert d["X"] == "1-$(Y)-10.96.0.1"
    assert d["Z"] == "y$(Y)"
    assert d["E"] == ""
    assert d["A"] == "11"                              # its own earlier value


def test_key_refs():
    c = {"name": "c", "env": [
        {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "B"}}},
        {"name": "SEC", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}},
        {"name": "OPT1", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nope",
                                                           "optional": True}}},
        {"name": "OPT2", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k",
                                                        "optional": True}}},
        {"name": "LIT", "value": "$(CM)$(SEC)"}]}
    d = as_dict(env_of(c, services=()))
    assert d["CM"] == "2" and d["SEC"] == "s3cret" and d["LIT"] == "2s3cret"
    assert "OPT1" not in d and "OPT2" not in d


@pytest.mark.parametrize("ref,msg", [
    ({"configMapKeyRef": {"name": "cm", "key": "nope"}}, "couldn't find key nope in ConfigMap ns/cm"),
    ({"secretKeyRef": {"name": "sec", "key": "nope"}}, "couldn't find key nope in Secret ns/sec"),
    ({"configMapKeyRef": {"name": "gone", "key": "k"}}, 'configmaps "gone" not found'),
    ({"secretKeyRef": {"name": "gone", "key": "k"}}, 'secrets "gone" not found'),
    ({"secretKeyRef": {"name": "bin", "key": "K"}}, "not valid UTF-8"),
    ({"fieldRef": {"fieldPath": "spec.restartPolicy"}}, "unsupported fieldPath"),
    ({"fieldRef": {"fieldPath": "metadata.name", "apiVersion": "v2"}}, "unsupported pod version"),
    ({"fieldRef": {"fieldPath": "spec.nodeName['x']"}}, "does not support subscript"),
    ({"fieldRef": {"fieldPath": "metadata.labels['bad key']"}}, "invalid key subscript"),
    ({"resourceFieldRef": {"resource": "limits.gpu"}}, "unsupported container resource"),
    ({"fileKeyRef": {"path": "x"}}, "unsupported valueFrom"),
])
def test_value_from_errors(ref, msg):
    with pytest.raises(EnvError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": ref}]}, host_ip="10.0.0.5")


@pytest.mark.parametrize("path,want", [
    ("metadata.name", "web-1"),
    ("metadata.namespace", "ns"),
    ("metadata.uid", "u-1"),
    ("metadata.labels['app']", "web"),
    ("metadata.labels['missing']", ""),
    ("metadata.annotations['note']", "line1\nline2"),
    ("metadata.annotations['NOTE']", ""),            # checked lower-cased, looked up as is
    ("metadata.labels", 'app="web"\ntier="a\\"b"'),
    ("metadata.annotations", 'note="line1\\nline2"'),
    ("spec.nodeName", "n1"),
    ("spec.host", "n1"),
    ("spec.serviceAccountName", "sa"),
    ("spec.terminationGracePeriodSeconds", "30"),
    ("status.hostIP", "10.0.0.5"),
    ("status.hostIPs", "10.0.0.5,fd00::5"),
    ("status.podIP", "10.1.0.7"),
    ("status.podIPs", "10.1.0.7,fd01::7"),
])
def test_field_refs(path, want):
    c = {"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": path}}}]}
    d = env_of(c, host_ip=["10.0.0.5", "fd00::5"], pod_ips=["10.1.0.7", "fd01::7"],
               services=()).variables
    assert d["X"] == want


def test_host_ip_missing_and_pod_ip_empty():
    c = {"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}
    assert env_of(c, services=()).variables["X"] == ""
    c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] = "status.hostIP"
    with pytest.raises(EnvError):
        env_of(c, services=())


@pytest.mark.parametrize("s,want", [
    ("plain", '"plain"'),
    ('q"b\\', '"q\\"b\\\\"'),
    ("\t\x01\x7f", '"\\t\\x01\\x7f"'),
    ("héllo ☃", '"héllo ☃"'),
    ("\u200b", '"\\u200b"'),                           # format char: escaped
    ("\U0001F600", '"\U0001F600"'),
])
def test_go_quote(s, want):
    assert downward.go_quote(s) == want


RES_POD = pod(containers=[
    {"name": "c", "resources": {"limits": {"memory": "64Mi"},
                                "requests": {"cpu": "250m", "memory": "32Mi"}}},
    {"name": "other", "resources": {"limits": {"cpu": "2", "memory": "0"}}}])
ALLOC = {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "100Gi", "pods": "110"}


@pytest.mark.parametrize("sel,want", [
    ({"resource": "limits.cpu"}, "4"),                       # unset: node allocatable
    ({"resource": "limits.cpu", "divisor": "1m"}, "4000"),
    ({"resource": "requests.cpu"}, "1"),                     # 250m rounds up to 1
    ({"resource": "requests.cpu", "divisor": "1m"}, "250"),
    ({"resource": "requests.cpu", "divisor": "100m"}, "3"),
    ({"resource": "limits.memory"}, str(64 << 20)),
    ({"resource": "limits.memory", "divisor": "1Mi"}, "64"),
    ({"resource": "limits.memory", "divisor": "1G"}, "1"),   # ceiling
    ({"resource": "requests.memory", "divisor": "1Ki"}, str(32 << 10)),
    ({"resource": "requests.ephemeral-storage"}, "0"),       # requests are not defaulted
    ({"resource": "limits.ephemeral-storage", "divisor": "1Gi"}, "100"),
    ({"resource": "limits.cpu", "divisor": "0"}, "4"),       # zero divisor counts as 1
    ({"resource": "limits.cpu", "containerName": "other"}, "2"),
    ({"resource": "limits.memory", "containerName": "other", "divisor": "1Gi"}, "8"),  # 0: default
    ({"resource": "requests.hugepages-2Mi"}, "0"),
])
def test_resource_refs(sel, want):
    c = RES_POD["spec"]["containers"][0]
    c = {**c, "env": [{"name": "X", "valueFrom": {"resourceFieldRef": sel}}]}
    assert env_of(c, RES_POD, services=(), allocatable=ALLOC).variables["X"] == want


def test_resource_ref_without_allocatable_reads_zero():
    c = {"name": "c", "env": [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}
    assert env_of(c, services=()).variables["X"] == "0"


def test_resource_ref_unknown_container():
    c = {"name": "c", "env": [{"name": "X", "valueFrom": {"resourceFieldRef": {
        "resource": "limits.cpu", "containerName": "ghost"}}}]}
    with pytest.raises(EnvError, match="container ghost not found"):
        env_of(c, services=())


def test_service_links_exact():
    services = [KUBERNETES,
                svc("my-db", "ns", "10.96.5.5", {"port": 5432},
                    {"name": "metrics-http", "port": 9187, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "protocol": "UDP"}),
                svc("v6", "ns", "fd00::10", {"port": 80, "protocol": "TCP"}),
                svc("headless", "ns", "None", {"port": 80}),
                svc("external", "ns", "", {"port": 80}),
                svc("elsewhere", "other", "10.96.9.9", {"port": 80})]
    m = service_env("ns", services)
    assert {k: v for k, v in m.items() if k.startswith("MY_DB")} == {
        "MY_DB_SERVICE_HOST": "10.96.5.5",
        "MY_DB_SERVICE_PORT": "5432",
        "MY_DB_SERVICE_PORT_METRICS_HTTP": "9187",
        "MY_DB_SERVICE_PORT_DNS": "53",
        "MY_DB_PORT": "tcp://10.96.5.5:5432",
        "MY_DB_PORT_5432_TCP": "tcp://10.96.5.5:5432",
        "MY_DB_PORT_5432_TCP_PROTO": "tcp",
        "MY_DB_PORT_5432_TCP_PORT": "5432",
        "MY_DB_PORT_5432_TCP_ADDR": "10.96.5.5",
        "MY_DB_PORT_9187_TCP": "tcp://10.96.5.5:9187",
        "MY_DB_PORT_9187_TCP_PROTO": "tcp",
        "MY_DB_PORT_9187_TCP_PORT": "9187",
        "MY_DB_PORT_9187_TCP_ADDR": "10.96.5.5",
        "MY_DB_PORT_53_UDP": "udp://10.96.5.5:53",
        "MY_DB_PORT_53_UDP_PROTO": "udp",
        "MY_DB_PORT_53_UDP_PORT": "53",
        "MY_DB_PORT_53_UDP_ADDR": "10.96.5.5"}
    assert m["V6_PORT"] == "tcp://[fd00::10]:80"
    assert m["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert m["KUBERNETES_SERVICE_PORT"] == "443"
    assert m["KUBERNETES_SERVICE_PORT_HTTPS"] == "443"
    assert m["KUBERNETES_PORT_443_TCP"] == "tcp://10.96.0.1:443"
    assert not any(k.startswith(("HEADLESS", "EXTERNAL", "ELSEWHERE")) for k in m)


def test_service_links_disabled_keeps_kubernetes():
    services = [KUBERNETES, svc("db", "ns", "10.96.5.5", {"port": 1})]
    m = service_env("ns", services, enable_service_links=False)
    assert "DB_SERVICE_HOST" not in m and m["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    ce = env_of({"name": "c"}, pod(enableServiceLinks=False), services=services)
    assert "DB_SERVICE_HOST" not in ce.variables
    assert ce.variables["KUBERNETES_SERVICE_PORT"] == "443"


@pytest.mark.parametrize("order", [1, -1])
def test_local_service_named_kubernetes_wins(order):
    local = svc("kubernetes", "ns", "10.0.0.9", {"port": 8443})
    m = service_env("ns", [KUBERNETES, local][::order])
    assert m["KUBERNETES_SERVICE_HOST"] == "10.0.0.9"
    # in namespace default it is just the one service
    assert service_env("default", [KUBERNETES])["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"


def test_service_vars_lowest_precedence_and_last():
    c = {"name": "c", "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "override"}]}
    ce = env_of(c)
    d = as_dict(ce)
    assert d["KUBERNETES_SERVICE_HOST"] == "override"
    names = [kv.split("=")[0] for kv in ce.env]
    assert names.index("KUBERNETES_SERVICE_HOST") < names.index("KUBERNETES_PORT")
    assert names[-1].startswith("KUBERNETES_")
    assert names.count("KUBERNETES_SERVICE_HOST") == 1


def test_services_not_read_yet():
    with pytest.raises(EnvError, match="services have not yet been read"):
        env_of({"name": "c"}, services=None)
    static = pod()
    static["metadata"]["annotations"]["kubernetes.io/config.source"] = "file"
    assert "KUBERNETES_SERVICE_HOST" not in env_of({"name": "c"}, static, services=None).variables


def test_values_that_cannot_cross():
    OBJECTS[("configmaps", "ns", "nul")] = {"data": {"K": "a\x00b"}}
    try:
        with pytest.raises(EnvError, match="cannot be passed"):
            env_of({"name": "c", "envFrom": [{"configMapRef": {"name": "nul"}}]}, services=())
    finally:
        del OBJECTS[("configmaps", "ns", "nul")]


def test_secret_not_base64():
    OBJECTS[("secrets", "ns", "bad")] = {"data": {"K": "!!!"}}
    try:
        with pytest.raises(EnvError, match="not base64"):
            env_of({"name": "c", "envFrom": [{"secretRef": {"name": "bad"}}]}, services=())
    finally:
        del OBJECTS[("secrets", "ns", "bad")]


def test_lookup_called_once_per_object():
    calls = []

    def counting(kind, ns, name):
        calls.append((kind, name))
        return lookup(kind, ns, name)
    c = {"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}}],
         "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "A"}}},
                 {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "B"}}}]}
    env_of(c, services=(), lookup=counting)
    assert calls == [("configmaps", "cm")]
