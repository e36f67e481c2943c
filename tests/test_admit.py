"""Admission: what pufflet refuses, with which reason."""

import pytest

from pufflet.agent.admit import admission_error, hostpath_rule, rejection_status
from pufflet.config import HostPath

RUNTIME_CLASSES = {"pufflet": {"handler": "pufflet"}, "runc": {"handler": "runc"}}
HOSTPATHS = (HostPath("/srv/data", False), HostPath("/var/run/app", True))


def lookup(kind, ns, name):
    assert (kind, ns) == ("runtimeclasses", "")
    return RUNTIME_CLASSES.get(name)


def mkpod(containers=None, **spec):
    return {"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"runtimeClassName": "pufflet",
                     "containers": containers if containers is not None else [{"name": "c"}],
                     **spec}}


def admit(pod, **kw):
    args = dict(lookup=lookup, node_is_dedicated=False, max_pods=10, running_pods=0,
                hostpaths=HOSTPATHS)
    args.update(kw)
    return admission_error(pod, **args)


def sc(**ctx):
    return [{"name": "c", "securityContext": ctx}]


@pytest.mark.parametrize("pod", [
    mkpod(),
    mkpod(hostNetwork=True),
    mkpod(shareProcessNamespace=True, hostUsers=False),
    mkpod(sc(runAsUser=1000, runAsGroup=0, runAsNonRoot=True, allowPrivilegeEscalation=True,
             readOnlyRootFilesystem=True, privileged=False,
             capabilities={"drop": ["ALL"], "add": []},
             seccompProfile={"type": "RuntimeDefault"}, procMount="Default")),
    mkpod(securityContext={"runAsUser": 1000, "fsGroup": 2000, "supplementalGroups": [3]}),
    # the same user asked at pod and container level
    mkpod([{"name": "a", "securityContext": {"runAsUser": 7}}, {"name": "b"}],
          securityContext={"runAsUser": 7}),
    # a container may override the pod's user, as long as all agree
    mkpod([{"name": "a", "securityContext": {"runAsUser": 8}}], securityContext={"runAsUser": 0}),
    mkpod(volumes=[{"name": "e", "emptyDir": {}}, {"name": "m", "emptyDir": {"medium": "Memory",
                                                                            "sizeLimit": "1Mi"}},
                   {"name": "c", "configMap": {"name": "x"}}, {"name": "s", "secret": {"secretName": "x"}},
                   {"name": "d", "downwardAPI": {"items": []}},
                   {"name": "p", "projected": {"sources": [
                       {"serviceAccountToken": {"path": "t"}}, {"configMap": {"name": "kube-root-ca.crt"}},
                       {"downwardAPI": {}}, {"secret": {"name": "s"}}]}}]),
    mkpod([{"name": "c", "volumeMounts": [{"name": "e", "mountPath": "/e", "readOnly": True,
                                           "mountPropagation": "None"}]}],
          volumes=[{"name": "e", "emptyDir": {}}]),
    mkpod([{"name": "c", "resources": {"requests": {"cpu": "1", "memory": "1Gi",
                                                    "ephemeral-storage": "1Gi"},
                                       "limits": {"cpu": "2"}}}]),
    mkpod(ephemeralContainers=[{"name": "debug", "securityContext": {"privileged": True}}]),
    mkpod(os={"name": "openbsd"}),
])
def test_admitted(pod):
    assert admit(pod) is None


@pytest.mark.parametrize("pod,reason,msg", [
    (mkpod(runtimeClassName="gvisor"), "UnsupportedRuntimeClass", 'RuntimeClass "gvisor" not found'),
    (mkpod(runtimeClassName="runc"), "UnsupportedRuntimeClass", 'has handler "runc"'),
    (mkpod(runtimeClassName=None), "UnsupportedRuntimeClass", "names no RuntimeClass"),
    (mkpod(hostIPC=True), "UnsupportedHostNamespace", "hostIPC"),
    (mkpod(hostPID=True), "UnsupportedHostNamespace", "hostPID"),
    (mkpod(sc(windowsOptions={"hostProcess": True})), "UnsupportedHostNamespace", "hostProcess"),
    (mkpod(securityContext={"sysctls": [{"name": "net.core.somaxconn", "value": "1024"}]}),
     "SysctlForbidden", "net.core.somaxconn"),
    (mkpod(sc(privileged=True)), "UnsupportedSecurityContext", "container c: privileged"),
    (mkpod(sc(capabilities={"add": ["NET_BIND_SERVICE"]})), "UnsupportedSecurityContext",
     "NET_BIND_SERVICE"),
    (mkpod(sc(runAsUser=0)), "UnsupportedSecurityContext", "never runs containers as root"),
    (mkpod(securityContext={"runAsUser": 0}), "UnsupportedSecurityContext", "runAsUser 0"),
    (mkpod([{"name": "i"}], initContainers=[{"name": "init", "securityContext": {"runAsUser": 0}}]),
     "UnsupportedSecurityContext", "container init: runAsUser 0"),
    (mkpod([{"name": "a", "securityContext": {"runAsUser": 1}},
            {"name": "b", "securityContext": {"runAsUser": 2}}]),
     "UnsupportedSecurityContext", r"different users: 1 \(a\); 2 \(b\)"),
    (mkpod(volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "x"}}]),
     "UnsupportedVolume", "volume v: persistentVolumeClaim volumes are not supported"),
    (mkpod(volumes=[{"name": "v", "ephemeral": {}}]), "UnsupportedVolume", "ephemeral"),
    (mkpod(volumes=[{"name": "v", "image": {"reference": "x"}}]), "UnsupportedVolume", "image"),
    (mkpod(volumes=[{"name": "v", "emptyDir": {"medium": "HugePages"}}]), "UnsupportedVolume",
     "medium HugePages"),
    (mkpod(volumes=[{"name": "v", "projected": {"sources": [{"clusterTrustBundle": {}}]}}]),
     "UnsupportedVolume", "clusterTrustBundle"),
    (mkpod(volumes=[{"name": "v", "hostPath": {"path": "/etc"}}]), "UnsupportedVolume",
     "hostPath /etc is not under"),
    (mkpod(volumes=[{"name": "v", "hostPath": {"path": "/srv/database"}}]), "UnsupportedVolume",
     "not under"),
    (mkpod(volumes=[{"name": "v", "hostPath": {"path": "/srv/data/../../etc"}}]), "UnsupportedVolume",
     "not under"),
    (mkpod(volumes=[{"name": "v", "hostPath": {"path": "/srv/data/x", "type": "Socket"}}]),
     "UnsupportedVolume", "type Socket"),
    (mkpod([{"name": "c", "volumeMounts": [{"name": "e", "mountPath": "/e", "subPath": "x"}]}],
           volumes=[{"name": "e", "emptyDir": {}}]), "UnsupportedVolume", "subPath"),
    (mkpod([{"name": "c", "volumeMounts": [{"name": "e", "mountPath": "/e", "subPathExpr": "$(X)"}]}],
           volumes=[{"name": "e", "emptyDir": {}}]), "UnsupportedVolume", "subPathExpr"),
    (mkpod([{"name": "c", "volumeMounts": [{"name": "e", "mountPath": "/e",
                                            "mountPropagation": "HostToContainer"}]}],
           volumes=[{"name": "e", "emptyDir": {}}]), "UnsupportedVolume", "HostToContainer"),
    (mkpod([{"name": "c", "volumeDevices": [{"name": "b", "devicePath": "/dev/xvda"}]}]),
     "UnsupportedVolume", "volumeDevices"),
    (mkpod([{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]), "OutOfnvidia.com/gpu",
     "Node didn't have enough resource: nvidia.com/gpu, requested: 2, used: 0, capacity: 0"),
    (mkpod([{"name": "c", "resources": {"requests": {"hugepages-2Mi": "4Mi"}}}]), "OutOfhugepages-2Mi",
     "requested: 4194304"),
    (mkpod([{"name": "a", "resources": {"requests": {"example.com/x": "1"}}},
            {"name": "b", "resources": {"requests": {"example.com/x": "2"}}}]),
     "OutOfexample.com/x", "requested: 3,"),
    (mkpod(os={"name": "linux"}), "PodOSNotSupported", "OS field doesn't match"),
])
def test_refused(pod, reason, msg):
    got = admit(pod)
    assert got is not None and got[0] == reason
    import re
    assert re.search(msg, got[1]), got[1]


def test_dedicated_node_takes_pods_without_runtime_class():
    pod = mkpod(runtimeClassName=None)
    assert admit(pod, node_is_dedicated=True) is None
    # but a named RuntimeClass must still be ours
    assert admit(mkpod(runtimeClassName="runc"), node_is_dedicated=True)[0] == "UnsupportedRuntimeClass"
    assert admit(mkpod(), lookup=None)[1] == 'RuntimeClass "pufflet" not found'
    assert admit(mkpod(runtimeClassName="runc"), runtime_handlers=("pufflet", "runc")) is None


def test_out_of_pods():
    assert admit(mkpod(), max_pods=3, running_pods=2) is None
    assert admit(mkpod(), max_pods=3, running_pods=3) == (
        "OutOfpods", "Node didn't have enough resource: pods, requested: 1, used: 3, capacity: 3")


def test_extended_resource_the_node_has():
    pod = mkpod([{"name": "c", "resources": {"limits": {"example.com/x": "2"}}}])
    assert admit(pod, allocatable={"example.com/x": "2"}) is None
    assert admit(pod, allocatable={"example.com/x": "1"})[0] == "OutOfexample.com/x"


def test_supported_volume_types_narrowed():
    pod = mkpod(volumes=[{"name": "s", "secret": {"secretName": "x"}}])
    got = admit(pod, supported_volume_types={"emptyDir", "configMap"})
    assert got[0] == "UnsupportedVolume" and "secret volumes are not supported" in got[1]
    assert admit(pod) is None


def test_grpc_probes_are_refused():
    grpc = {"grpc": {"port": 9090}}
    reason, message = admit(mkpod([{"name": "c", "livenessProbe": grpc}]))
    assert reason == "UnsupportedProbe"
    assert message.startswith("container c: livenessProbe uses grpc")
    assert admit(mkpod([{"name": "c", "readinessProbe": {"tcpSocket": {"port": 1}},
                         "livenessProbe": {"httpGet": {"port": 1}},
                         "startupProbe": {"exec": {"command": ["true"]}}}])) is None


def hostpath_pod(path, read_only):
    return mkpod([{"name": "c", "volumeMounts": [{"name": "h", "mountPath": "/h",
                                                  "readOnly": read_only}]}],
                 volumes=[{"name": "h", "hostPath": {"path": path}}])


@pytest.mark.parametrize("path,read_only,fragment", [
    # the rules of pufflet.conf first, so that the author fixes the right thing
    ("/etc", True, "hostPath /etc is not under a prefix this node allows"),
    ("/srv/data/x", False, "mounted read-write at /h, but pufflet.conf allows /srv/data "
                           "read-only"),
    # allowed (read-only, or under a read-write prefix): still no bind mounts
    ("/srv/data/x", True, "hostPath /srv/data/x cannot be given to a pod on this node: it "
                          "needs a bind mount"),
    ("/var/run/app/s", False, "hostPath /var/run/app/s cannot be given"),
])
def test_every_hostpath_is_refused_saying_why(path, read_only, fragment):
    reason, message = admit(hostpath_pod(path, read_only))
    assert reason == "UnsupportedVolume" and fragment in message, message


LABELS = {"kubernetes.io/os": "openbsd", "zone": "a", "cores": "8"}


@pytest.mark.parametrize("spec,ok", [
    ({"nodeSelector": {"kubernetes.io/os": "openbsd"}}, True),
    ({"nodeSelector": {"kubernetes.io/os": "linux"}}, False),
    ({"nodeSelector": {"missing": ""}}, False),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In",
                                                     "values": ["b"]}]},
                              {"matchExpressions": [{"key": "zone", "operator": "NotIn",
                                                     "values": ["b"]},
                                                    {"key": "cores", "operator": "Gt",
                                                     "values": ["4"]}]}]}}}}, True),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "cores", "operator": "Lt",
                                                     "values": ["4"]}]}]}}}}, False),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"},
                                                    {"key": "zone", "operator": "Exists"}]}]}}}},
     True),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                "values": ["n1"]}]}]}}}}, True),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                "values": ["n2"]}]}]}}}}, False),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{}]}}}}, False),
    ({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}}, True),
])
def test_node_affinity(spec, ok):
    got = admit(mkpod(**spec), node_labels=LABELS, node_name="n1")
    if ok:
        assert got is None
    else:
        assert got == ("NodeAffinity", "Predicate NodeAffinity failed: node(s) didn't match "
                                       "Pod's node affinity/selector")
    # not checked without the node's labels
    assert admit(mkpod(**spec)) is None


@pytest.mark.parametrize("path,want", [
    ("/srv/data", "/srv/data"), ("/srv/data/", "/srv/data"), ("/srv/data/a/b", "/srv/data"),
    ("/srv/database", None), ("/srv", None), ("srv/data", None), ("/srv/data/../x", None),
    ("/srv/data/./x", None), ("/var/run/app/s.sock", "/var/run/app"),
])
def test_hostpath_rule(path, want):
    got = hostpath_rule(path, HOSTPATHS)
    assert (got.prefix if got else None) == want


def test_hostpath_rule_longest_prefix_and_root():
    rules = (HostPath("/", False), HostPath("/data", True), HostPath("/data/ro", False))
    assert hostpath_rule("/data/ro/x", rules).writable is False
    assert hostpath_rule("/data/rw", rules).writable is True
    assert hostpath_rule("/etc", rules).prefix == "/"


def test_rejection_status():
    pod = mkpod([{"name": "c", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}])
    assert rejection_status(pod, "OutOfpods", "full") == {
        "phase": "Failed", "reason": "OutOfpods", "message": "Pod was rejected: full",
        "qosClass": "Guaranteed"}
