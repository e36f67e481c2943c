"""File volume contents, against the kubelet's configmap/secret MakePayload,
downwardapi.CollectData, projected collectData, atomic_writer's path
checks and the token manager's refresh rule."""

import base64

import pytest

from pufflet.agent.volumedata import (VolumeError, VolumeFile, clean_path, refresh_at, refresh_due,
                                      token_requests, volume_files)

OBJECTS = {
    ("configmaps", "ns", "cm"): {"data": {"a.conf": "A", "b.conf": "B"},
                                 "binaryData": {"blob": base64.b64encode(b"\x00\xff").decode()}},
    ("configmaps", "ns", "kube-root-ca.crt"): {"data": {"ca.crt": "PEM"}},
    ("secrets", "ns", "sec"): {"data": {"user": base64.b64encode(b"admin").decode(),
                                        "key": base64.b64encode(b"\x01\x02").decode()}},
}


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1",
                    "labels": {"b": "2", "a": "1"}, "annotations": {"x": "y"}},
       "spec": {"serviceAccountName": "sa", "containers": [
           {"name": "c", "resources": {"limits": {"memory": "1Gi"}, "requests": {"cpu": "100m"}}}]}}


def files(volume, pod=POD, **kw):
    kw.setdefault("lookup", lookup)
    return {f.path: (f.data, oct(f.mode)) for f in volume_files(pod, volume, **kw)}


@pytest.mark.parametrize("volume,want", [
    # every key, data then binaryData, default 0644
    ({"name": "v", "configMap": {"name": "cm"}},
     {"a.conf": (b"A", "0o644"), "b.conf": (b"B", "0o644"), "blob": (b"\x00\xff", "0o644")}),
    ({"name": "v", "configMap": {"name": "cm", "defaultMode": 0o400}},
     {"a.conf": (b"A", "0o400"), "b.conf": (b"B", "0o400"), "blob": (b"\x00\xff", "0o400")}),
    # items: only those, item mode beats defaultMode, paths cleaned
    ({"name": "v", "configMap": {"name": "cm", "defaultMode": 0o440, "items": [
        {"key": "a.conf", "path": "etc//app/./a"}, {"key": "blob", "path": "bin", "mode": 0o755}]}},
     {"etc/app/a": (b"A", "0o440"), "bin": (b"\x00\xff", "0o755")}),
    # the same key twice under two paths
    ({"name": "v", "configMap": {"name": "cm", "items": [
        {"key": "a.conf", "path": "one"}, {"key": "a.conf", "path": "two"}]}},
     {"one": (b"A", "0o644"), "two": (b"A", "0o644")}),
    # secrets: decoded; secretName; 420 is 0644
    ({"name": "v", "secret": {"secretName": "sec", "defaultMode": 420}},
     {"user": (b"admin", "0o644"), "key": (b"\x01\x02", "0o644")}),
    ({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "user", "path": "u", "mode": 0}]}},
     {"u": (b"admin", "0o0")}),
    # optional and missing: empty; optional with a missing item key: skipped
    ({"name": "v", "configMap": {"name": "gone", "optional": True}}, {}),
    ({"name": "v", "secret": {"secretName": "gone", "optional": True, "items": [
        {"key": "k", "path": "k"}]}}, {}),
    ({"name": "v", "configMap": {"name": "cm", "optional": True, "items": [
        {"key": "nope", "path": "n"}, {"key": "a.conf", "path": "a"}]}}, {"a": (b"A", "0o644")}),
])
def test_key_volumes(volume, want):
    assert files(volume) == want


@pytest.mark.parametrize("volume,msg", [
    ({"name": "v", "configMap": {"name": "gone"}}, 'configmaps "gone" not found'),
    ({"name": "v", "secret": {"secretName": "gone"}}, 'secrets "gone" not found'),
    ({"name": "v", "configMap": {"name": "cm", "items": [{"key": "nope", "path": "n"}]}},
     "configmap references non-existent config key: nope"),
    ({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "nope", "path": "n"}]}},
     "references non-existent secret key: nope"),
    ({"name": "v", "configMap": {"name": "cm", "defaultMode": 0o1777}}, "mode"),
    ({"name": "v", "configMap": {"name": "cm", "items": [{"key": "a.conf", "path": "../x"}]}},
     "must not contain '..'"),
    ({"name": "v", "configMap": {"name": "cm", "items": [{"key": "a.conf", "path": "/etc/x"}]}},
     "must be relative"),
    ({"name": "v", "configMap": {"name": "cm", "items": [
        {"key": "a.conf", "path": "d"}, {"key": "b.conf", "path": "d/f"}]}},
     "both a file and a directory"),
    ({"name": "v", "emptyDir": {}}, "not a file volume"),
])
def test_key_volume_errors(volume, msg):
    with pytest.raises(VolumeError, match=msg):
        files(volume)


def test_no_api_server_means_missing():
    with pytest.raises(VolumeError, match="not found"):
        files({"name": "v", "configMap": {"name": "cm"}}, lookup=None)
    assert files({"name": "v", "configMap": {"name": "cm", "optional": True}}, lookup=None) == {}


@pytest.mark.parametrize("path,want", [
    ("a", "a"), ("a/b", "a/b"), ("a//b/", "a/b"), ("./a", "a"), ("a/./b", "a/b"),
    ("..a", None), ("..data", None), ("a/..b", "a/..b"), ("...", None),
    ("a/../b", None), ("..", None), ("", None), ("/a", None), (".", None), ("./", None),
    ("x" * 255, "x" * 255), ("x" * 256, None), ("a/" * 2047 + "b", "a/" * 2047 + "b"),
    ("a/" * 2048 + "b", None),
])
def test_clean_path(path, want):
    if want is None:
        with pytest.raises(VolumeError):
            clean_path(path)
    else:
        assert clean_path(path) == want


def test_later_file_replaces_earlier_in_projected():
    vol = {"name": "v", "projected": {"defaultMode": 0o600, "sources": [
        {"configMap": {"name": "cm", "items": [{"key": "a.conf", "path": "same"}]}},
        {"secret": {"name": "sec", "items": [{"key": "user", "path": "same", "mode": 0o400}]}}]}}
    assert files(vol) == {"same": (b"admin", "0o400")}


def test_downward_api_volume():
    vol = {"name": "v", "downwardAPI": {"defaultMode": 0o444, "items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o400},
        {"path": "ann/x", "fieldRef": {"fieldPath": "metadata.annotations['x']"}},
        {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory",
                                             "divisor": "1Mi"}},
        {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu",
                                             "divisor": "1m"}}]}}
    assert files(vol, allocatable={"cpu": "3"}) == {
        "labels": (b'a="1"\nb="2"', "0o444"), "name": (b"p", "0o400"),
        "ann/x": (b"y", "0o444"), "mem": (b"1024", "0o444"), "cpu": (b"3000", "0o444")}


def test_downward_api_errors_are_aggregated():
    vol = {"name": "v", "downwardAPI": {"items": [
        {"path": "a", "fieldRef": {"fieldPath": "spec.schedulerName"}},
        {"path": "b", "resourceFieldRef": {"containerName": "zz", "resource": "limits.cpu"}}]}}
    with pytest.raises(VolumeError, match=r"^\[unsupported fieldPath: spec.schedulerName, "
                                          r"container zz not found\]$"):
        files(vol)


def test_projected_service_account_volume():
    # What the API server injects as kube-api-access-xxxxx.
    vol = {"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}
    assert files(vol, tokens={"token": "eyJ.tok"}) == {
        "token": (b"eyJ.tok", "0o644"), "ca.crt": (b"PEM", "0o644"), "namespace": (b"ns", "0o644")}
    with pytest.raises(VolumeError, match="no token for token"):
        files(vol)
    (path, sa, body), = token_requests(POD, vol)
    assert (path, sa) == ("token", "sa")
    assert body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"expirationSeconds": 3607,
                             "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                                "name": "p", "uid": "u-1"}}}


def test_token_request_audience_and_defaults():
    vol = {"name": "v", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "vault", "path": "vault-token"}}]}}
    pod = {"metadata": {"name": "p", "uid": "u"}, "spec": {}}
    (path, sa, body), = token_requests(pod, vol)
    assert sa == "default" and body["spec"]["audiences"] == ["vault"]
    assert body["spec"]["expirationSeconds"] == 3600


@pytest.mark.parametrize("spec,mode", [
    ({}, "0o644"),
    ({"securityContext": {"fsGroup": 2000}}, "0o600"),
    ({"securityContext": {"runAsUser": 1000}}, "0o600"),                # all share it
    ({"securityContext": {"runAsUser": 1000},
      "initContainers": [{"name": "i", "securityContext": {"runAsUser": 1001}}]}, "0o644"),
    ({"initContainers": [{"name": "i", "securityContext": {"runAsUser": 1001}}]}, "0o644"),
])
def test_token_mode_with_fs_owner(spec, mode):
    pod = {"metadata": {"name": "p", "namespace": "ns"},
           "spec": {"containers": [{"name": "c"}], **spec}}
    vol = {"name": "v", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
    assert files(vol, pod, tokens={"t": "x"})["t"][1] == mode


def test_projected_errors_collected_and_unsupported_source():
    vol = {"name": "v", "projected": {"sources": [
        {"configMap": {"name": "gone"}}, {"secret": {"name": "gone2"}},
        {"clusterTrustBundle": {"name": "b", "path": "b"}}]}}
    with pytest.raises(VolumeError) as e:
        files(vol)
    assert str(e.value).startswith('[configmaps "gone" not found, secrets "gone2" not found, '
                                   "unsupported projected source")


def test_wire_and_limits():
    f = VolumeFile("a", b"x", 0o644)
    assert f.wire() == {"path": "a", "data": b"x", "mode": 420}
    OBJECTS[("configmaps", "ns", "big")] = {"data": {"k": "x" * ((1 << 20) + 1)}}
    try:
        with pytest.raises(VolumeError, match="larger than"):
            files({"name": "v", "configMap": {"name": "big"}})
    finally:
        del OBJECTS[("configmaps", "ns", "big")]


@pytest.mark.parametrize("ttl,elapsed,jitter,due", [
    (3600, 0, 0, False),
    (3600, 2880, 0, False),          # exactly 80 %: not yet
    (3600, 2881, 0, True),
    (3600, 2875, 10, True),          # jitter makes it earlier
    (3607, 2885, 0, False),          # 20 % of 3607 is 721 (integer)
    (3607, 2887, 0, True),
    (86400 * 2, 86400, 0, False),    # 24 h: not after
    (86400 * 2, 86401, 0, True),     # a long token is refreshed after a day
    (600, 481, 0, True),
    (600, 4000, 0, True),            # expired
])
def test_refresh_due(ttl, elapsed, jitter, due):
    issued = 1_000_000.0
    assert refresh_due(issued + ttl, issued, issued + elapsed, jitter=jitter) is due


@pytest.mark.parametrize("ttl,at", [(600, 480), (3607, 2886), (5, 4), (4, 4),
                                    (86400 * 2, 86400)])
def test_refresh_at_is_where_refresh_due_turns(ttl, at):
    """The agent sleeps until refresh_at: the token must be due just after
    it, not before (20 % counted in whole seconds: a 4 s token is due only
    at its expiry)."""
    issued = 1_000_000.0
    assert refresh_at(issued + ttl, issued) == issued + at
    assert not refresh_due(issued + ttl, issued, issued + at)
    assert refresh_due(issued + ttl, issued, issued + at + 0.01)
