"""The registry client against a real docker-registry (anonymous, htpasswd,
token auth, TLS) and against a stub that lies."""

import json
import os

import pytest

import registry as R
from pufflet.images import auth, registry as reg
from pufflet.images.oci import Platform

OPENBSD = Platform("openbsd", "amd64")


def fetch_all(client, ref, res, tmp_path):
    repo = client.repository(ref)
    for d in res.blobs:
        fd = os.open(tmp_path / d.digest[7:], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            repo.fetch_blob(d, fd)
        finally:
            os.close(fd)


def creds(r, user=None, password=None):
    return auth.Keyring.from_dockerconfig(
        {"auths": {r.host: {"username": user or r.user, "password": password or r.password}}})


# --- auth against the real registry ----------------------------------------------

@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    r = R.Registry(tmp_path_factory.mktemp("basic"), auth="basic")
    r.img = R.Image([R.layer({"bin/sh": b"basic"})])
    r.push_image("priv/img", "1", r.img)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    r = R.Registry(tmp_path_factory.mktemp("token"), auth="token")
    r.img = R.Image([R.layer({"bin/sh": b"token"})], docker=True)
    r.push_image("priv/img", "1", r.img)
    r.realm_host = r.token_server.realm.split("/")[2]
    yield r
    r.stop()


def test_basic_auth(basic_registry, tmp_path):
    r = basic_registry
    c = reg.Client(insecure=[r.host], keyring=creds(r))
    res = c.resolve(f"{r.host}/priv/img:1", OPENBSD)
    assert res.digest == r.img.digest
    fetch_all(c, f"{r.host}/priv/img:1", res, tmp_path)


def test_basic_auth_from_pull_secret_base64(basic_registry):
    r = basic_registry
    import base64
    secret = {"auths": {f"http://{r.host}/v2/": {
        "auth": base64.b64encode(f"{r.user}:{r.password}".encode()).decode()}}}
    c = reg.Client(insecure=[r.host])
    res = c.resolve(f"{r.host}/priv/img:1", OPENBSD, auth.Keyring.from_secrets([secret]))
    assert res.digest == r.img.digest


def test_basic_auth_refused(basic_registry):
    r = basic_registry
    c = reg.Client(insecure=[r.host])
    with pytest.raises(reg.AuthError, match="wants a user name and password"):
        c.resolve(f"{r.host}/priv/img:1", OPENBSD)
    c = reg.Client(insecure=[r.host], keyring=creds(r, password="wrong"))
    with pytest.raises(reg.AuthError, match="access denied"):
        c.resolve(f"{r.host}/priv/img:1", OPENBSD)


def test_bearer_token_auth(token_registry, tmp_path):
    r = token_registry
    c = reg.Client(insecure=[r.host, r.realm_host], keyring=creds(r))
    ref = f"{r.host}/priv/img:1"
    res = c.resolve(ref, OPENBSD)
    assert res.digest == r.img.digest
    fetch_all(c, ref, res, tmp_path)
    # One token for the scope, cached across repositories objects.
    asked = [q for q in r.token_server.requests if q[0] == "repository:priv/img:pull"]
    assert asked == [("repository:priv/img:pull", r.user)]


def test_bearer_anonymous_gets_no_access(token_registry):
    r = token_registry
    c = reg.Client(insecure=[r.host, r.realm_host])
    with pytest.raises(reg.AuthError, match="access denied"):
        c.resolve(f"{r.host}/priv/img:1", OPENBSD)


def test_bearer_bad_password(token_registry):
    r = token_registry
    c = reg.Client(insecure=[r.host, r.realm_host], keyring=creds(r, password="nope"))
    with pytest.raises(reg.AuthError, match="token server refused the configured credentials"):
        c.resolve(f"{r.host}/priv/img:1", OPENBSD)


def test_no_credentials_to_plain_http_realm(token_registry):
    r = token_registry
    c = reg.Client(insecure=[r.host], keyring=creds(r))       # realm not listed
    with pytest.raises(reg.AuthError, match="refusing to send credentials over plain HTTP"):
        c.resolve(f"{r.host}/priv/img:1", OPENBSD)


# --- TLS -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    r = R.Registry(tmp_path_factory.mktemp("tls"), tls=True)
    r.img = R.Image([R.layer({"bin/sh": b"tls"})])
    r.push_image("t/img", "1", r.img)
    yield r
    r.stop()


def test_https_with_trusted_ca(tls_registry):
    import ssl
    r = tls_registry
    ctx = ssl.create_default_context(cafile=str(r.root / "registry.crt"))
    c = reg.Client(ssl_context=ctx)
    assert c.resolve(f"{r.host}/t/img:1", OPENBSD).digest == r.img.digest


def test_https_untrusted_certificate_refused(tls_registry):
    r = tls_registry
    with pytest.raises(reg.RegistryError, match="TLS failed.*CERTIFICATE_VERIFY_FAILED"):
        reg.Client().resolve(f"{r.host}/t/img:1", OPENBSD)


def test_plain_http_registry_not_listed_is_refused(tmp_path):
    stub = R.Stub()
    try:
        with pytest.raises(reg.RegistryError) as e:
            reg.Client().resolve(f"{stub.host}/a/b:1", OPENBSD)
        assert "plain-HTTP registry" in str(e.value)
        assert f"insecure registry \"{stub.host}\"" in str(e.value)
        assert stub.requests == []
    finally:
        stub.stop()


# --- lies and bombs (a stub: a real registry cannot lie) --------------------------

@pytest.fixture
def stub():
    s = R.Stub()
    yield s
    s.stop()


def lying_image(stub, layer_data, declared=None, served=None):
    img = R.Image([layer_data])
    stub.manifest("a/b", "1", img.manifest, img.media_type)
    stub.blob("a/b", R.digest(img.config), img.config)
    stub.blob("a/b", R.digest(layer_data), served if served is not None else layer_data)
    return img


def test_manifest_digest_header_lie(stub):
    img = R.Image([R.layer({"x": b"x"})])
    stub.manifest("a/b", "1", img.manifest, img.media_type,
                  {"Docker-Content-Digest": "sha256:" + "1" * 64})
    with pytest.raises(reg.VerifyError, match="expected sha256:1111"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b:1", OPENBSD)


def test_manifest_by_digest_lie(stub):
    img, other = R.Image([R.layer({"x": b"x"})]), R.Image([R.layer({"y": b"y"})])
    stub.manifest("a/b", img.digest, other.manifest, other.media_type)
    with pytest.raises(reg.VerifyError, match=f"expected {img.digest}"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b@{img.digest}", OPENBSD)


def test_index_entry_lie(stub):
    bsd, evil = R.Image([R.layer({"x": b"x"})]), R.Image([R.layer({"e": b"evil"})])
    data, mt = R.index([bsd])
    stub.manifest("a/b", "1", data, mt)
    stub.manifest("a/b", bsd.digest, evil.manifest, evil.media_type)
    with pytest.raises(reg.VerifyError, match=f"expected {bsd.digest}"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b:1", OPENBSD)


def test_blob_digest_lie(stub, tmp_path):
    data = R.layer({"f": b"honest"})
    evil = data[:-3] + b"\0\0\0"
    lying_image(stub, data, served=evil)
    c = reg.Client(insecure=[stub.host])
    res = c.resolve(f"{stub.host}/a/b:1", OPENBSD)
    with pytest.raises(reg.VerifyError, match=f"expected {R.digest(data)}"):
        fetch_all(c, f"{stub.host}/a/b:1", res, tmp_path)


def test_blob_longer_than_declared(stub, tmp_path):
    data = R.layer({"f": b"honest"})
    lying_image(stub, data, served=data + b"more")
    c = reg.Client(insecure=[stub.host])
    res = c.resolve(f"{stub.host}/a/b:1", OPENBSD)
    with pytest.raises(reg.VerifyError, match="registry sends .* bytes, the manifest says"):
        fetch_all(c, f"{stub.host}/a/b:1", res, tmp_path)


def test_truncated_blob(stub, tmp_path):
    data = R.layer({"f": os.urandom(5000)})
    lying_image(stub, data, served=data[:1000])
    c = reg.Client(insecure=[stub.host])
    res = c.resolve(f"{stub.host}/a/b:1", OPENBSD)
    with pytest.raises(reg.Incomplete, match=f"truncated: got 1000 of {len(data)} bytes"):
        fetch_all(c, f"{stub.host}/a/b:1", res, tmp_path)


def test_manifest_bomb_refused_before_any_blob(stub):
    img = R.Image([R.layer({"x": b"x"})])
    doc = json.loads(img.manifest)
    doc["layers"][0]["size"] = 1 << 40                  # 1 TiB
    data = json.dumps(doc).encode()
    stub.manifest("a/b", "1", data, img.media_type)
    with pytest.raises(reg.RegistryError, match="more than the"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b:1", OPENBSD)
    doc["layers"][0]["size"] = 3 << 30                  # under the hard cap
    stub.manifest("a/b", "2", json.dumps(doc).encode(), img.media_type)
    with pytest.raises(reg.VerifyError, match="more than the 1073741824 a blob may have"):
        reg.Client(insecure=[stub.host], max_blob=1 << 30).resolve(f"{stub.host}/a/b:2", OPENBSD)
    assert not any("/blobs/" in p for _, p, _ in stub.requests)


def test_oversized_manifest_refused(stub):
    stub.manifest("a/b", "1", b"{" + b" " * (reg.MAX_MANIFEST + 1) + b"}", R.OCI_MANIFEST)
    with pytest.raises(reg.VerifyError, match="more than the 4194304"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b:1", OPENBSD)


def test_schema1_refused(stub):
    stub.manifest("a/b", "1", b'{"schemaVersion": 1, "fsLayers": []}',
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(reg.RegistryError, match="schema 1"):
        reg.Client(insecure=[stub.host]).resolve(f"{stub.host}/a/b:1", OPENBSD)


def test_resume_when_server_ignores_range(stub, tmp_path):
    data = R.layer({"f": os.urandom(5000)})
    lying_image(stub, data)
    c = reg.Client(insecure=[stub.host])
    res = c.resolve(f"{stub.host}/a/b:1", OPENBSD)
    repo = c.repository(f"{stub.host}/a/b:1")
    path = tmp_path / "partial"
    for honour in (True, False):
        if not honour:
            stub.no_range.add(f"/v2/a/b/blobs/{R.digest(data)}")
        path.write_bytes(data[:400] if honour else b"junk" * 100)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            repo.fetch_blob(res.layers[0], fd, 400)
        finally:
            os.close(fd)
        # 206: appended from 400 on; 200: the file started over.
        assert path.read_bytes() == data
    assert [h.get("Range") for m, p, h in stub.requests if "/blobs/" in p] == ["bytes=400-"] * 2


def test_redirect_drops_authorization_off_host(stub):
    other = R.Stub()
    try:
        img = R.Image([R.layer({"x": b"x"})])
        stub.routes["/v2/a/b/manifests/1"] = (
            307, {"Location": f"http://{other.host}/elsewhere"}, b"")
        other.routes["/elsewhere"] = (200, {"Content-Type": img.media_type}, img.manifest)
        k = auth.Keyring.from_dockerconfig({"auths": {stub.host: {"username": "u", "password": "p"}}})
        c = reg.Client(insecure=[stub.host, other.host], keyring=k)
        repo = c.repository(f"{stub.host}/a/b:1")
        repo._auth = "Basic dTpw"           # as after a challenge
        assert repo.resolve(OPENBSD).digest == img.digest
        assert "Authorization" in stub.requests[0][2]
        assert "Authorization" not in other.requests[0][2]
    finally:
        other.stop()


# --- credentials matching, as the kubelet does ---------------------------------------

def test_keyring_matching():
    k = auth.Keyring.from_dockerconfig({"auths": {
        "https://index.docker.io/v1/": {"username": "hub", "password": "p"},
        "*.example.com": {"username": "glob", "password": "p"},
        "reg.example.com/team": {"username": "team", "password": "p"},
        "localhost:5000": {"auth": "bG9jYWw6cHc="},
    }})
    assert [c.username for c in k.lookup("docker.io", "library/alpine")] == ["hub"]
    assert [c.username for c in k.lookup("reg.example.com", "team/app")] == ["team", "glob"]
    assert [c.username for c in k.lookup("reg.example.com", "other/app")] == ["glob"]
    assert k.lookup("a.b.example.com", "x") == []
    assert k.lookup("localhost:5000", "x") == [auth.Basic("local", "pw")]
    assert k.lookup("localhost:5001", "x") == []


def test_keyring_secrets_come_first():
    node = auth.Keyring.from_dockerconfig({"auths": {"r": {"username": "node", "password": "p"}}})
    pod = auth.Keyring.from_secrets([b'{"auths": {"r": {"username": "pod", "password": "p"}}}'])
    assert [c.username for c in (pod + node).lookup("r", "x")] == ["pod", "node"]


@pytest.mark.parametrize("doc,fragment", [
    (b"nope", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"auths": []}', "'auths' is not an object"),
    (b'{"auths": {"r": {"auth": "%%%"}}}', "not base64"),
    (b'{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}', "not user:password"),
])
def test_keyring_errors(doc, fragment):
    with pytest.raises(auth.CredentialsError, match=fragment):
        auth.Keyring.from_dockerconfig(doc)


def test_keyring_file(tmp_path):
    p = tmp_path / "registries.json"
    p.write_text('{"auths": {"r:5000": {"username": "u", "password": "p"}}}')
    assert auth.Keyring.from_file(str(p)).lookup("r:5000", "a") == [auth.Basic("u", "p")]
    p.write_text("{")
    with pytest.raises(auth.CredentialsError, match=str(p)):
        auth.Keyring.from_file(str(p))


def test_challenge_parsing():
    [c] = auth.parse_challenges(
        'Bearer realm="https://auth.example.com/token",service="reg",'
        'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example.com/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}
    [b] = auth.parse_challenges('Basic realm="x \\"y\\""')
    assert b.scheme == "basic" and b.params["realm"] == 'x "y"'


def test_token_reply():
    assert auth.parse_token_reply(b'{"access_token": "t", "expires_in": 120}') == ("t", 120.0)
    assert auth.parse_token_reply(b'{"token": "t"}') == ("t", 60.0)
    with pytest.raises(ValueError):
        auth.parse_token_reply(b'{"token": "a\\r\\nX-Evil: 1"}')


def test_token_cache_expiry():
    now = [0.0]
    cache = auth.TokenCache(clock=lambda: now[0])
    cache.put(("k",), "tok", 60)
    assert cache.get(("k",)) == "tok"
    now[0] = 56
    assert cache.get(("k",)) is None
