"""The node's client certificate: key, CSR, certificate and kubeconfig.

The agent talks to the API server but cannot exec or write files, so the
parent does the file work of TLS bootstrap with openssl(1), which is in
OpenBSD's base (LibreSSL) as in every Linux distribution (OpenSSL); only
options both accept are used.  The agent is assumed compromised: it never
chooses a path, a subject or a key, and what it hands back (a certificate
from the API server) is checked before anything is written.

Layout under the state directory (see prepare() for the modes):

    pki/client-pending.key      key of the CSR in flight, root 0600
    pki/client-<time>.pem       certificate(s) + key, agent user 0600
    pki/client-current.pem      symlink to the one in use

The private key leaves this process only as those files: it is never put in
a frame or a log line.
"""

from __future__ import annotations

import base64
import calendar
import ipaddress
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass

import yaml

from pufflet.config import Config
from pufflet.privsep.channel import Status
from pufflet.priv.statefile import fsync_dir
from pufflet.privsep.drop import Identity

log = logging.getLogger("pufflet.priv.pki")

PENDING = "client-pending.key"
CURRENT = "client-current.pem"
NODES_GROUP = "system:nodes"
NODE_PREFIX = "system:node:"
OPENSSL = "openssl"
OPENSSL_TIMEOUT = 30.0
# How many certificates a chain from the API server may hold: the signed
# one first, then intermediates.
MAX_CHAIN = 4
# The bootstrap kubeconfig and the CA file it names are the admin's; a
# kubeconfig is small, so anything much bigger is a mistake.
MAX_KUBECONFIG = 1 << 20

_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?")
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")


class PkiError(Exception):
    """openssl failed or its output was not what we asked for."""


@dataclass(frozen=True)
class CertInfo:
    not_before: int         # seconds since the epoch
    not_after: int


def pki_dir(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "pki")


def current_path(cfg: Config) -> str:
    """What the kubeconfig names as client-certificate and client-key."""
    return os.path.join(pki_dir(cfg), CURRENT)


def prepare(cfg: Config, ident: Identity) -> None:
    """Create pki/ before the agent exists: its sandbox only covers paths
    that exist when it is applied.

    The state directory becomes 0710 root:<agent group> and pki/ 0750
    root:<agent group>: the agent may walk to its certificate and list pki/,
    nobody else may even look, and only root may create or rename entries,
    so the agent cannot plant a symlink for the parent to follow.  The files
    themselves are the agent's, 0600."""
    for path, mode in ((cfg.state_dir, 0o710), (pki_dir(cfg), 0o750)):
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != 0:
            raise PkiError(f"{path}: must be a directory owned by root")
        if st.st_gid != ident.gid:
            os.chown(path, 0, ident.gid)
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)


# -- openssl -----------------------------------------------------------------

def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    # umask 077: a key openssl writes itself is never readable by others,
    # not even for the moment before a chmod.
    try:
        p = subprocess.run([OPENSSL, *args], input=stdin, capture_output=True,
                           timeout=OPENSSL_TIMEOUT, umask=0o077,
                           env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PkiError(f"openssl {args[0]}: {e}") from None
    if p.returncode != 0:
        # First line only: enough to say why, and openssl never prints key
        # material in its errors.
        why = p.stderr.decode(errors="replace").strip().splitlines()
        raise PkiError(f"openssl {args[0]} failed: {why[0] if why else p.returncode}")
    return p.stdout


def _subject(cfg: Config) -> tuple[str, set[str]]:
    """-subj for our CSR, and the RDNs a certificate for it must carry."""
    name = cfg.node_name
    # The config checks node names; this check is what makes the -subj
    # string safe to build, so it stays right here.
    if len(name) > 253 or not _NODE_NAME.match(name):
        raise Status("FAILED_PRECONDITION", f"node name {name!r} cannot go in a subject")
    cn = NODE_PREFIX + name
    return f"/O={NODES_GROUP}/CN={cn}", {f"CN={cn}", f"O={NODES_GROUP}"}


def _cert_subject(pem: bytes) -> set[str]:
    out = _openssl("x509", "-noout", "-subject", "-nameopt", "RFC2253", stdin=pem)
    line = out.decode(errors="replace").strip()
    if not line.startswith("subject="):
        raise PkiError("openssl x509 printed no subject")
    # RFC 2253 escapes ',' inside values as '\,'; a value with one cannot
    # match ours, so splitting on ',' and comparing exactly is safe.
    return {p.strip() for p in line[len("subject="):].split(",") if p.strip()}


def _date(line: str, prefix: str) -> int:
    # "notAfter=Jan  2 03:04:05 2026 GMT": the only form LibreSSL prints.
    if not line.startswith(prefix):
        raise PkiError(f"openssl x509 printed {line[:40]!r}, expected {prefix}")
    try:
        t = time.strptime(line[len(prefix):].strip(), "%b %d %H:%M:%S %Y GMT")
    except ValueError:
        raise PkiError(f"cannot read the date in {line[:60]!r}") from None
    return calendar.timegm(t)


def cert_info(pem: bytes) -> CertInfo:
    """Validity of the first certificate in pem."""
    out = _openssl("x509", "-noout", "-startdate", stdin=pem).decode(errors="replace").strip()
    nb = _date(out, "notBefore=")
    out = _openssl("x509", "-noout", "-enddate", stdin=pem).decode(errors="replace").strip()
    return CertInfo(nb, _date(out, "notAfter="))


def _cert_pubkey(pem: bytes) -> bytes:
    return b"".join(_openssl("x509", "-noout", "-pubkey", stdin=pem).split())


def _key_pubkey(path: str) -> bytes:
    return b"".join(_openssl("pkey", "-in", path, "-pubout").split())


# -- files ---------------------------------------------------------------------

def _write_new(path: str, data: bytes, owner: Identity) -> None:
    """Create path (it must not exist), 0600, owned by owner, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, 0o600)        # whatever the umask said
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _replace(path: str, data: bytes, owner: Identity) -> None:
    """Write-to-temp, fsync, rename: a crash leaves the old file or the new
    one, never half of either."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)          # left by a crash of an earlier run
    except FileNotFoundError:
        pass
    _write_new(tmp, data, owner)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def _read_small(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KUBECONFIG + 1)
    except OSError as e:
        raise Status("FAILED_PRECONDITION", f"{what} {path}: {e.strerror}") from None
    if len(data) > MAX_KUBECONFIG:
        raise Status("FAILED_PRECONDITION", f"{what} {path}: too big")
    return data


# -- the bootstrap kubeconfig ---------------------------------------------------

def _bootstrap_cluster(cfg: Config) -> dict:
    """The cluster entry of the bootstrap kubeconfig's current context, with
    the CA made inline so the agent reads one file less."""
    path = cfg.bootstrap_kubeconfig
    if not path:
        raise Status("FAILED_PRECONDITION", "no 'bootstrap kubeconfig' configured")
    try:
        doc = yaml.safe_load(_read_small(path, "bootstrap kubeconfig"))
        contexts = {c["name"]: c["context"] for c in doc.get("contexts") or []}
        clusters = {c["name"]: c["cluster"] for c in doc.get("clusters") or []}
        if doc.get("current-context"):
            context = contexts[doc["current-context"]]
        elif len(contexts) == 1:
            context = next(iter(contexts.values()))
        else:
            raise KeyError("current-context")
        cluster = clusters[context["cluster"]]
        server = cluster["server"]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise Status("FAILED_PRECONDITION",
                     f"bootstrap kubeconfig {path}: no usable cluster ({e})") from None
    if not isinstance(server, str) or not server.startswith("https://"):
        raise Status("FAILED_PRECONDITION",
                     f"bootstrap kubeconfig {path}: server must be an https:// URL")
    out: dict = {"server": server}
    if cluster.get("certificate-authority-data"):
        out["certificate-authority-data"] = str(cluster["certificate-authority-data"])
    elif cluster.get("certificate-authority"):
        ca = os.path.join(os.path.dirname(path), str(cluster["certificate-authority"]))
        out["certificate-authority-data"] = base64.b64encode(_read_small(ca, "CA file")).decode()
    for key in ("tls-server-name", "insecure-skip-tls-verify"):
        if key in cluster:
            out[key] = cluster[key]
    return out


def _kubeconfig(cfg: Config) -> bytes:
    cur = current_path(cfg)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": _bootstrap_cluster(cfg)}],
        "users": [{"name": "default-auth",
                   "user": {"client-certificate": cur, "client-key": cur}}],
        "contexts": [{"name": "default-context",
                      "context": {"cluster": "default-cluster", "user": "default-auth"}}],
        "current-context": "default-context",
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()


def write_kubeconfig(cfg: Config, owner: Identity) -> None:
    """Write cfg.kubeconfig only if it would change.  Not rewriting an
    unchanged file matters: Landlock grants access to an inode, so a file
    replaced by rename is out of the running agent's reach (unveil(2) names
    paths, so OpenBSD does not care).  Renewals only move the symlink."""
    if not cfg.kubeconfig:
        raise Status("FAILED_PRECONDITION", "no 'kubeconfig' configured to write")
    data = _kubeconfig(cfg)
    try:
        st = os.lstat(cfg.kubeconfig)
        with open(cfg.kubeconfig, "rb") as f:
            same = f.read(MAX_KUBECONFIG + 1) == data
        if same and st.st_uid == owner.uid and st.st_mode & 0o7777 == 0o600:
            return
    except FileNotFoundError:
        pass
    _replace(cfg.kubeconfig, data, owner)
    log.info("wrote kubeconfig %s", cfg.kubeconfig)


def refresh_kubeconfig(cfg: Config, owner: Identity) -> None:
    """Write the kubeconfig before each agent starts, even before there is a
    certificate for it to name.  Its content does not depend on the
    certificate, so StoreClientCert later finds it unchanged and leaves the
    inode alone, and a Landlock-confined agent can read it (a file that did
    not exist when the sandbox went on stays out of reach)."""
    if not (cfg.kubeconfig and cfg.bootstrap_kubeconfig):
        return
    try:
        write_kubeconfig(cfg, owner)
    except (Status, OSError) as e:
        log.warning("cannot write kubeconfig %s: %s", cfg.kubeconfig, e)


# -- the three requests -----------------------------------------------------------

def create_csr(cfg: Config) -> str:
    """A new EC P-256 key in pki/client-pending.key and a PEM CSR for it.
    A new key each time: a key is never reused across certificates."""
    subj, _ = _subject(cfg)
    d = pki_dir(cfg)
    pending = os.path.join(d, PENDING)
    tmp = pending + ".tmp"
    try:
        os.unlink(tmp)          # left by a crash of an earlier run
    except FileNotFoundError:
        pass
    try:
        # ecparam -genkey: what both LibreSSL and OpenSSL accept for an EC
        # key (LibreSSL's genpkey has no EC parameter options in older
        # releases).  -noout leaves the parameters out of the file.
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, pending)
        fsync_dir(d)
        csr = _openssl("req", "-new", "-sha256", "-key", pending, "-subj", subj)
    except PkiError as e:
        for p in (tmp, pending):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise Status("INTERNAL", str(e)) from None
    text = csr.decode("ascii", errors="replace")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in text:
        raise Status("INTERNAL", "openssl req printed no CSR")
    log.info("new key and CSR for %s", subj)
    return text


def _leaf_for(cfg: Config, pem: bytes, key: str, kind: str,
              key_name: str) -> tuple[bytes, CertInfo]:
    """The first certificate of a chain from the API server, checked to
    carry our subject and the public key of our pending key; kind and
    key_name name them in errors."""
    blocks = _PEM_CERT.findall(pem.decode("ascii"))
    if not blocks or len(blocks) > MAX_CHAIN or len("".join(blocks)) != len(pem):
        raise Status("INVALID_ARGUMENT", "not a PEM certificate chain")
    first = blocks[0].encode()
    _, want = _subject(cfg)
    try:
        got = _cert_subject(first)
        info = cert_info(first)
        match = _cert_pubkey(first) == _key_pubkey(key)
    except PkiError as e:
        raise Status("INVALID_ARGUMENT", f"not a {kind}: {e}") from None
    if got != want:
        raise Status("INVALID_ARGUMENT",
                     f"certificate subject {','.join(sorted(got))} is not "
                     f"{','.join(sorted(want))}")
    if not match:
        raise Status("INVALID_ARGUMENT", f"certificate is not for the {key_name}")
    return first, info


def _check_valid_now(info: CertInfo) -> None:
    now = time.time()
    if not info.not_before <= now < info.not_after:
        raise Status("INVALID_ARGUMENT",
                     f"certificate is not valid now (valid {info.not_before}..{info.not_after})")


def _check_cert(cfg: Config, pem: bytes, pending: str) -> CertInfo:
    _, info = _leaf_for(cfg, pem, pending, "certificate", "pending key")
    _check_valid_now(info)
    return info


def _new_name(d: str, prefix: str = "client") -> str:
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
    for n in range(100):
        name = f"{prefix}-{stamp}.pem" if n == 0 else f"{prefix}-{stamp}-{n}.pem"
        if not os.path.lexists(os.path.join(d, name)):
            return name
    raise Status("RESOURCE_EXHAUSTED", "too many certificates this second")


def store_cert(cfg: Config, owner: Identity, cert_pem: str) -> CertInfo:
    """Check a certificate for the pending key, install it with the key as
    client-<time>.pem, point client-current.pem at it, write the
    kubeconfig.  On refusal nothing on disk changes."""
    d = pki_dir(cfg)
    pending = os.path.join(d, PENDING)
    if not os.path.isfile(pending) or os.path.islink(pending):
        raise Status("FAILED_PRECONDITION", "no CSR pending: call CreateClientCSR first")
    pem = cert_pem.encode("ascii")
    info = _check_cert(cfg, pem, pending)
    if not pem.endswith(b"\n"):
        pem += b"\n"
    key = _read_small(pending, "pending key")
    name = _new_name(d)
    path = os.path.join(d, name)
    # Build the kubeconfig first: if the bootstrap kubeconfig is unreadable
    # we want to fail before touching anything.
    _kubeconfig(cfg)
    _write_new(path, pem + key, owner)
    previous = _point(d, CURRENT, name)
    os.unlink(pending)
    fsync_dir(d)
    write_kubeconfig(cfg, owner)
    _prune(d, "client", keep={name, previous})
    log.info("installed client certificate %s, valid until %s", name,
             time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.not_after)))
    return info


def _point(d: str, link_name: str, target: str) -> str | None:
    """Make d/link_name a symlink to target; return what it pointed to.
    A relative link, swapped in by rename: readers see the old pair or the
    new one, never a missing file."""
    cur = os.path.join(d, link_name)
    previous = None
    try:
        previous = os.readlink(cur)
    except OSError:
        pass
    link = cur + ".tmp"
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    os.symlink(target, link)
    os.rename(link, cur)
    return previous


def _prune(d: str, prefix: str, keep: set[str | None]) -> None:
    """Keep the current and the previous certificate, drop older ones: they
    hold keys nothing will use again.  Only <prefix>-<time>.pem names:
    never the links, the pending files or the self-signed serving.pem."""
    stamped = re.compile(re.escape(prefix) + r"-\d{4}-\d\d-\d\d-[-\d]+\.pem\Z")
    for name in os.listdir(d):
        if stamped.match(name) and name not in keep:
            try:
                os.unlink(os.path.join(d, name))
            except OSError as e:
                log.warning("cannot remove old certificate %s: %s", name, e.strerror)


def _first_cert(path: str) -> bytes | None:
    """The first certificate of a cert+key file, None without one.  Only
    certificate blocks ever go to openssl's stdin; the key stays put."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KUBECONFIG)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Status("UNAVAILABLE", f"{path}: {e.strerror}") from None
    blocks = _PEM_CERT.findall(data.decode("ascii", errors="replace"))
    return blocks[0].encode() if blocks else None


def current_info(cfg: Config) -> CertInfo | None:
    """Validity of the certificate in use, None if there is none."""
    first = _first_cert(current_path(cfg))
    if first is None:
        return None
    try:
        return cert_info(first)
    except PkiError as e:
        raise Status("INTERNAL", str(e)) from None


# -- the node API's self-signed serving certificate ---------------------------

SERVING = "serving.pem"
SERVING_DAYS = 365
SERVING_RENEW = 30 * 86400      # made again when it has less than this left


def serving_path(cfg: Config) -> str:
    return os.path.join(pki_dir(cfg), SERVING)


def _serving_current(path: str, owner: Identity) -> CertInfo | None:
    """The validity of the serving certificate there, if it is ours, sound
    and not about to expire; None if a new one is needed."""
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or st.st_uid != owner.uid:
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_KUBECONFIG)
        blocks = _PEM_CERT.findall(data.decode("ascii", errors="replace"))
        if not blocks:
            return None
        info = cert_info(blocks[0].encode())
    except (OSError, PkiError):
        return None
    return info if info.not_after - time.time() > SERVING_RENEW else None


def serving_cert(cfg: Config, owner: Identity, addresses: list[str]) -> CertInfo:
    """Make pki/serving.pem (certificate, then key; the agent user's, 0600)
    unless a good one is there: self-signed, as the kubelet's is without
    --tls-cert-file, for the node name and the given IP addresses.  The
    agent names the addresses; each must parse as an IP address, and the
    node name is ours, so the agent cannot have us sign anything else."""
    path = serving_path(cfg)
    info = _serving_current(path, owner)
    if info is not None:
        return info
    _subject(cfg)       # checks the node name is fit for a subject
    sans = [f"DNS:{cfg.node_name}"]
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise Status("INVALID_ARGUMENT", f"{a!r} is not an IP address") from None
        if f"IP:{ip}" not in sans:
            sans.append(f"IP:{ip}")
    d = pki_dir(cfg)
    key = os.path.join(d, "serving.key.tmp")
    conf = os.path.join(d, "serving.cnf.tmp")
    # A config file rather than -addext: LibreSSL's req has no -addext in
    # every release, and both read this.
    text = ("[req]\ndistinguished_name = dn\n[dn]\n[ext]\n"
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
            f"subjectAltName = {', '.join(sans)}\n")
    try:
        for p in (key, conf):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        cert = _openssl("req", "-new", "-x509", "-sha256", "-key", key,
                        "-days", str(SERVING_DAYS), "-subj",
                        f"/CN={cfg.node_name}@{int(time.time())}",
                        "-config", conf, "-extensions", "ext")
        if not _PEM_CERT.fullmatch(cert.decode("ascii", errors="replace")):
            raise PkiError("openssl req printed no certificate")
        with open(key, "rb") as f:
            keypem = f.read()
        _replace(path, cert + keypem, owner)
        info = cert_info(cert)
    except PkiError as e:
        raise Status("INTERNAL", str(e)) from None
    finally:
        for p in (key, conf):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    log.info("new self-signed serving certificate for %s", ", ".join(sans))
    return info


# -- the node API's serving certificate from the cluster ('tls certificate csr') --
#
# As the kubelet with serverTLSBootstrap: a CSR for the signer
# kubernetes.io/kubelet-serving, subject CN=system:node:<name>,
# O=system:nodes, SANs the node's names and addresses.  The key is made
# here and leaves this process only as the installed file the agent serves
# from; the agent never chooses a DNS name: those are the node name and
# this host's name, computed here.
#
#   pki/serving-pending.key     key of the CSR in flight, root 0600
#   pki/serving-pending.csr     that CSR, root 0600: what a certificate must match
#   pki/serving-<time>.pem      certificate(s) + key, agent user 0600
#   pki/serving-current.pem     symlink to the one in use

SERVING_PENDING = "serving-pending.key"
SERVING_PENDING_CSR = "serving-pending.csr"
SERVING_CURRENT = "serving-current.pem"
MAX_SERVING_IPS = 16
_SERVER_AUTH = "TLS Web Server Authentication"     # how both openssls print serverAuth
_ROOT = Identity("root", 0, 0)


@dataclass(frozen=True)
class ServingInfo:
    not_before: int
    not_after: int
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]


def serving_current_path(cfg: Config) -> str:
    return os.path.join(pki_dir(cfg), SERVING_CURRENT)


def serving_names(cfg: Config, addresses: list[str]) -> tuple[list[str], list[str]]:
    """The DNS and IP SANs to ask for: the node name and this host's name
    (the node's Hostname address), and the agent's addresses, each of
    which must parse as an IP address."""
    _subject(cfg)       # checks the node name is fit for a subject
    dns = [cfg.node_name]
    host = os.uname().nodename.lower()
    if host != cfg.node_name and len(host) <= 253 and _NODE_NAME.match(host):
        dns.append(host)
    ips: list[str] = []
    for a in addresses:
        try:
            ip = str(ipaddress.ip_address(a))
        except ValueError:
            raise Status("INVALID_ARGUMENT", f"{a!r} is not an IP address") from None
        if ip not in ips:
            ips.append(ip)
    if len(ips) > MAX_SERVING_IPS:
        raise Status("INVALID_ARGUMENT", f"more than {MAX_SERVING_IPS} addresses")
    return dns, ips


def _extensions(kind: str, pem: bytes) -> list[str]:
    """The lines openssl prints for the extensions of a certificate (kind
    "x509") or a request ("req"), and nothing else: no subject or issuer
    text a signer chose, which could pose as an extension line.
    x509 -certopt and req -reqopt take the same no_* names in LibreSSL's
    openssl(1) (set_cert_ex) and OpenSSL's."""
    if kind == "x509":
        skip = ("-certopt", "no_header,no_version,no_serial,no_signame,no_validity,"
                "no_subject,no_issuer,no_pubkey,no_sigdump,no_aux")
    else:
        skip = ("-reqopt", "no_header,no_version,no_subject,no_pubkey,no_sigdump")
    return _openssl(kind, "-noout", "-text", *skip, stdin=pem) \
        .decode("ascii", errors="replace").splitlines()


def _after(lines: list[str], title: str) -> str | None:
    """The value line printed under an extension's title line."""
    for i, line in enumerate(lines):
        if line.strip().startswith(title + ":") and i + 1 < len(lines):
            return lines[i + 1].strip()
    return None


def _sans(lines: list[str]) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) of a subjectAltName; any other kind of
    name (email, URI, ...) is refused: we never ask for one."""
    dns: set[str] = set()
    ips: set[str] = set()
    value = _after(lines, "X509v3 Subject Alternative Name")
    for item in (value.split(", ") if value else ()):
        kind, _, v = item.partition(":")
        if kind == "DNS" and len(v) <= 253 and _NODE_NAME.match(v):
            dns.add(v)
        elif kind == "IP Address":
            # OpenSSL prints IPv6 uncompressed and in capitals.
            try:
                ips.add(str(ipaddress.ip_address(v)))
            except ValueError:
                raise PkiError(f"unreadable IP address in subjectAltName: {v[:60]!r}") from None
        else:
            raise PkiError(f"unexpected subjectAltName entry {item[:60]!r}")
    return dns, ips


def create_serving_csr(cfg: Config, addresses: list[str]) -> str:
    """A new EC P-256 key in pki/serving-pending.key and a PEM CSR for it,
    kept beside it.  EC keys sign and do not encipher, so the usages asked
    for are digital signature and server auth, as the kubelet's for an EC
    key."""
    subj, _ = _subject(cfg)
    dns, ips = serving_names(cfg, addresses)
    sans = [f"DNS:{n}" for n in dns] + [f"IP:{ip}" for ip in ips]
    d = pki_dir(cfg)
    key = os.path.join(d, SERVING_PENDING)
    csr_path = os.path.join(d, SERVING_PENDING_CSR)
    tmp, conf = key + ".tmp", os.path.join(d, "serving-csr.cnf.tmp")
    text = ("[req]\ndistinguished_name = dn\nreq_extensions = ext\n[dn]\n[ext]\n"
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature\n"
            "extendedKeyUsage = serverAuth\n"
            f"subjectAltName = {', '.join(sans)}\n")
    try:
        for p in (tmp, conf, key, csr_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, key)
        csr = _openssl("req", "-new", "-sha256", "-key", key, "-subj", subj,
                       "-config", conf)
        if b"-----BEGIN CERTIFICATE REQUEST-----" not in csr:
            raise PkiError("openssl req printed no CSR")
        _write_new(csr_path, csr, _ROOT)
        fsync_dir(d)
    except PkiError as e:
        for p in (tmp, key, csr_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise Status("INTERNAL", str(e)) from None
    finally:
        try:
            os.unlink(conf)
        except FileNotFoundError:
            pass
    log.info("new key and serving CSR for %s, %s", subj, ", ".join(sans))
    return csr.decode("ascii")


def _check_serving_cert(cfg: Config, pem: bytes, key: str, csr: bytes) -> ServingInfo:
    """The first certificate of pem must be for key, with our subject, the
    names of our CSR (no more, no fewer), server auth among its usages,
    and valid now.  Intermediates are the signer's business."""
    first, info = _leaf_for(cfg, pem, key, "serving certificate",
                             "pending serving key")
    try:
        lines = _extensions("x509", first)
        dns, ips = _sans(lines)
        want_dns, want_ips = _sans(_extensions("req", csr))
    except PkiError as e:
        raise Status("INVALID_ARGUMENT", f"not a serving certificate: {e}") from None
    if (dns, ips) != (want_dns, want_ips):
        raise Status("INVALID_ARGUMENT",
                     f"certificate names {', '.join(sorted(dns | ips)) or 'nothing'}, "
                     f"the request {', '.join(sorted(want_dns | want_ips))}")
    eku = _after(lines, "X509v3 Extended Key Usage") or ""
    if _SERVER_AUTH not in eku.split(", "):
        raise Status("INVALID_ARGUMENT", "certificate is not for server auth")
    _check_valid_now(info)
    return ServingInfo(info.not_before, info.not_after, tuple(sorted(dns)), tuple(sorted(ips)))


def store_serving_cert(cfg: Config, owner: Identity, cert_pem: str) -> ServingInfo:
    """Check a certificate for the pending serving key, install it with the
    key as serving-<time>.pem and point serving-current.pem at it.  On
    refusal nothing on disk changes."""
    d = pki_dir(cfg)
    key = os.path.join(d, SERVING_PENDING)
    csr_path = os.path.join(d, SERVING_PENDING_CSR)
    if not os.path.isfile(key) or os.path.islink(key) or os.path.islink(csr_path):
        raise Status("FAILED_PRECONDITION", "no serving CSR pending: call CreateServingCSR first")
    pem = cert_pem.encode("ascii")
    info = _check_serving_cert(cfg, pem, key, _read_small(csr_path, "pending serving CSR"))
    if not pem.endswith(b"\n"):
        pem += b"\n"
    name = _new_name(d, "serving")
    _write_new(os.path.join(d, name), pem + _read_small(key, "pending serving key"), owner)
    previous = _point(d, SERVING_CURRENT, name)
    os.unlink(key)
    os.unlink(csr_path)
    fsync_dir(d)
    _prune(d, "serving", keep={name, previous})
    log.info("installed serving certificate %s for %s, valid until %s", name,
             ", ".join(info.dns_names + info.ips),
             time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.not_after)))
    return info


def serving_info(cfg: Config) -> ServingInfo | None:
    """Validity and names of the certificate serving-current.pem holds,
    None without one."""
    first = _first_cert(serving_current_path(cfg))
    if first is None:
        return None
    try:
        info = cert_info(first)
        dns, ips = _sans(_extensions("x509", first))
    except PkiError as e:
        raise Status("INTERNAL", str(e)) from None
    return ServingInfo(info.not_before, info.not_after, tuple(sorted(dns)), tuple(sorted(ips)))
