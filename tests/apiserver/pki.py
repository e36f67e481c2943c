"""Test PKI made with the openssl(1) CLI: cluster CA, server and client certs,
and CSR signing with a duration in seconds (via `openssl ca`, since
`openssl x509 -req` only takes whole days before OpenSSL 3.4).

Keys are EC P-256 (fast to generate).  The CA and fixed certs are cached in
the directory given, so restarting an emulator on the same dir is cheap.
"""
from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import tempfile
from pathlib import Path


def _run(*args: str, stdin: bytes | None = None) -> bytes:
    p = subprocess.run(["openssl", *args], input=stdin, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


def new_key(path: Path) -> Path:
    if not path.exists():
        _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
        path.chmod(0o600)
    return path


def subject(cn: str, orgs: tuple[str, ...] | list[str] = ()) -> str:
    # openssl -subj syntax; "/" and "=" in values must be escaped.
    esc = lambda v: v.replace("\\", "\\\\").replace("/", "\\/").replace("=", "\\=")
    return "".join(f"/O={esc(o)}" for o in orgs) + f"/CN={esc(cn)}"


def make_csr(key: Path, cn: str, orgs: tuple[str, ...] | list[str] = (),
             dns: tuple[str, ...] | list[str] = (), ips: tuple[str, ...] | list[str] = ()) -> bytes:
    """A PEM PKCS#10 request, as a kubelet would send in a CSR object."""
    args = ["req", "-new", "-key", str(key), "-subj", subject(cn, orgs)]
    san = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
    if san:
        args += ["-addext", "subjectAltName=" + ",".join(san)]
    return _run(*args)


class CA:
    """A self-signed cluster CA living in `directory`."""

    def __init__(self, directory: Path | str, cn: str = "kubernetes") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = new_key(self.dir / "ca.key")
        self.cert = self.dir / "ca.crt"
        if not self.cert.exists():
            _run("req", "-x509", "-new", "-key", str(self.key), "-subj", f"/CN={cn}",
                 "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
                 "-out", str(self.cert))
        self.pem = self.cert.read_text()

    def issue(self, name: str, cn: str, orgs: tuple[str, ...] | list[str] = (), *,
              server: bool = False, seconds: int = 365 * 86400) -> tuple[Path, Path]:
        """Key and certificate files <name>.key/<name>.crt, reused if present."""
        key = new_key(self.dir / f"{name}.key")
        crt = self.dir / f"{name}.crt"
        if not crt.exists():
            usages = ["server auth"] if server else ["client auth"]
            san = ("DNS:localhost", "IP:127.0.0.1") if server else ()
            csr = _run("req", "-new", "-key", str(key), "-subj", subject(cn, orgs))
            crt.write_bytes(self.sign(csr, seconds, usages, extra_san=san))
        return key, crt

    def sign(self, csr_pem: bytes, seconds: int, usages: list[str],
             extra_san: tuple[str, ...] = (), backdate: int = 300) -> bytes:
        """Sign a CSR keeping its subject and SANs; validity from now-backdate
        to now+seconds (capped at the CA's own expiry by openssl's caller)."""
        ku, eku = [], []
        for u in usages:
            m = {"digital signature": ("ku", "digitalSignature"),
                 "key encipherment": ("ku", "keyEncipherment"),
                 "client auth": ("eku", "clientAuth"), "server auth": ("eku", "serverAuth"),
                 "code signing": ("eku", "codeSigning"), "email protection": ("eku", "emailProtection")
                 }.get(u)
            if m:
                (ku if m[0] == "ku" else eku).append(m[1])
        now = dt.datetime.now(dt.timezone.utc)
        fmt = "%Y%m%d%H%M%SZ"
        start = (now - dt.timedelta(seconds=backdate)).strftime(fmt)
        end = (now + dt.timedelta(seconds=seconds)).strftime(fmt)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "index.txt").write_text("")
            (t / "serial").write_text(secrets.token_hex(16) + "\n")
            ext = ["basicConstraints=critical,CA:FALSE"]
            if ku:
                ext.append("keyUsage=critical," + ",".join(ku))
            if eku:
                ext.append("extendedKeyUsage=" + ",".join(eku))
            if extra_san:
                ext.append("subjectAltName=" + ",".join(extra_san))
            (t / "ca.cnf").write_text(
                "[ca]\ndefault_ca=c\n[c]\n"
                f"database={t}/index.txt\nserial={t}/serial\nnew_certs_dir={t}\n"
                "default_md=sha256\npolicy=p\nunique_subject=no\ncopy_extensions=copy\n"
                "email_in_dn=no\n[p]\ncommonName=optional\norganizationName=optional\n"
                "[x]\n" + "\n".join(ext) + "\n")
            (t / "req.pem").write_bytes(csr_pem)
            _run("ca", "-batch", "-config", str(t / "ca.cnf"), "-extensions", "x",
                 "-cert", str(self.cert), "-keyfile", str(self.key), "-in", str(t / "req.pem"),
                 "-out", str(t / "out.pem"), "-startdate", start, "-enddate", end,
                 "-notext", "-preserveDN", "-utf8")
            return (t / "out.pem").read_bytes()


def csr_subject(csr_pem: bytes) -> tuple[str, list[str]]:
    """(CN, [O...]) of a PEM CSR; raises ValueError if it does not parse or verify."""
    try:
        out = _run("req", "-noout", "-verify", "-subject", "-nameopt", "RFC2253", stdin=csr_pem)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    line = out.decode().strip().split("subject=", 1)[-1]
    cn, orgs = "", []
    for part in _split_rfc2253(line):
        k, _, v = part.partition("=")
        if k.strip() == "CN":
            cn = v
        elif k.strip() == "O":
            orgs.append(v)
    return cn, orgs


def csr_sans(csr_pem: bytes) -> tuple[list[str], list[str], list[str], list[str]]:
    """(DNS names, IP addresses, emails, URIs) of a PEM CSR's subjectAltName."""
    text = _run("req", "-noout", "-text", stdin=csr_pem).decode().splitlines()
    out: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
    for i, line in enumerate(text[:-1]):
        if line.strip().startswith("X509v3 Subject Alternative Name"):
            for item in text[i + 1].strip().split(", "):
                kind, _, v = item.partition(":")
                which = {"DNS": 0, "IP Address": 1, "email": 2, "URI": 3}.get(kind)
                if which is not None:
                    out[which].append(v)
    return out


def _split_rfc2253(s: str) -> list[str]:
    out, cur, esc = [], "", False
    for ch in s:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def verify(ca_cert: Path, cert_pem: bytes) -> bool:
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(cert_pem)
        f.flush()
        p = subprocess.run(["openssl", "verify", "-CAfile", str(ca_cert), f.name],
                           capture_output=True)
        return p.returncode == 0
