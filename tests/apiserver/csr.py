"""CertificateSigningRequest approval and signing (what kube-controller-manager's
csrapproving/csrsigning controllers would do), signed by the cluster CA.

Signing is a separate write after approval, so watchers see the Approved
condition and the certificate arrive as two MODIFIED events, as with a real
controller.  Signer rules checked (pkg/controller/certificates/authority and
signer): kube-apiserver-client-kubelet needs CN=system:node:<n>, O=[system:nodes]
and client usages; kubelet-serving the same subject and server usages;
kube-apiserver-client anything; legacy-unknown is never signed.
"""
from __future__ import annotations

import base64
import datetime as dt
from typing import TYPE_CHECKING, Any

from .errors import invalid
from .pki import CA, csr_sans, csr_subject
from .resources import by_key

if TYPE_CHECKING:
    from .store import Store

DEFAULT_SECONDS = 365 * 86400          # --cluster-signing-duration default
_CLIENT_USAGES = {"digital signature", "key encipherment", "client auth"}
# ValidateKubeletServingCSR (pkg/apis/certificates/v1/helpers.go): the
# usages must be exactly one of these sets.
_SERVING_USAGES = ({"digital signature", "key encipherment", "server auth"},
                   {"digital signature", "server auth"})
# The only signer kube-controller-manager's csrapproving controller
# approves (nodeclient and selfnodeclient); kubelet-serving is never
# auto-approved.
AUTO_APPROVED_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def decode_request(obj: dict[str, Any]) -> bytes:
    """spec.request as PEM bytes; raises 422 if it is not a PEM CSR."""
    res = by_key("certificatesigningrequests")
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec") or {}
    try:
        pem = base64.b64decode(spec.get("request", ""), validate=True)
    except Exception:
        raise invalid(res, name, [("spec.request", "Invalid value: illegal base64 data")]) from None
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise invalid(res, name, [("spec.request", "Invalid value: []byte{...}: PEM block type "
                                   "must be CERTIFICATE REQUEST")])
    return pem


def validate_create(obj: dict[str, Any]) -> None:
    res = by_key("certificatesigningrequests")
    name = obj["metadata"].get("name", "")
    pem = decode_request(obj)
    try:
        csr_subject(pem)
    except ValueError:
        raise invalid(res, name, [("spec.request", "Invalid value: []byte{...}: "
                                   "x509: malformed certificate request")]) from None
    spec = obj.get("spec") or {}
    if not spec.get("signerName"):
        raise invalid(res, name, [("spec.signerName", "Required value")])
    exp = spec.get("expirationSeconds")
    if exp is not None and (not isinstance(exp, int) or exp < 600):
        raise invalid(res, name, [("spec.expirationSeconds", f"Invalid value: {exp}: may not "
                                   "specify a duration less than 600 seconds (10 minutes)")])


def _condition(ctype: str, reason: str, message: str) -> dict[str, Any]:
    t = _now()
    return {"type": ctype, "status": "True", "reason": reason, "message": message,
            "lastUpdateTime": t, "lastTransitionTime": t}


def _kubelet_serving_problem(pem: bytes, cn: str, orgs: list[str], usages: list[str]) -> str:
    """ValidateKubeletServingCSR's checks, in its order and with its messages."""
    if orgs != ["system:nodes"]:
        return "subject organization is not system:nodes"
    dns, ips, emails, uris = csr_sans(pem)
    if not dns and not ips:
        return "DNS or IP subjectAltName is required"
    if emails:
        return "Email subjectAltNames are not allowed"
    if uris:
        return "URI subjectAltNames are not allowed"
    if set(usages) not in _SERVING_USAGES or len(set(usages)) != len(usages):
        return f"usages did not match {sorted(_SERVING_USAGES[0])}"
    if not cn.startswith("system:node:"):
        return "subject common name does not begin with system:node:"
    return ""


def set_approval(store: "Store", name: str, approve: bool = True,
                 reason: str = "", message: str = "") -> dict[str, Any]:
    """Add an Approved (or Denied) condition via the approval subresource."""
    obj = store.get("certificatesigningrequests", "", name)
    conds = [c for c in (obj.get("status") or {}).get("conditions") or []
             if c.get("type") not in ("Approved", "Denied")]
    ctype = "Approved" if approve else "Denied"
    conds.append(_condition(ctype, reason or ("TestApprove" if approve else "TestDeny"),
                            message or f"{ctype.lower()} by the test"))
    obj.setdefault("status", {})["conditions"] = conds
    return store.update("certificatesigningrequests", obj, subresource="approval")


def sign_if_approved(store: "Store", ca: CA, name: str,
                     max_seconds: int | None = None) -> dict[str, Any] | None:
    """The signing controller: issue status.certificate for an approved CSR."""
    obj = store.try_get("certificatesigningrequests", "", name)
    if obj is None:
        return None
    status = obj.get("status") or {}
    types = {c.get("type") for c in status.get("conditions") or []}
    if "Approved" not in types or "Denied" in types or "Failed" in types or status.get("certificate"):
        return obj
    spec = obj.get("spec") or {}
    signer = spec.get("signerName", "")
    pem = decode_request(obj)
    cn, orgs = csr_subject(pem)
    usages = list(spec.get("usages") or [])
    problem = ""
    if signer == "kubernetes.io/kube-apiserver-client-kubelet":
        if not cn.startswith("system:node:") or orgs != ["system:nodes"] or not set(usages) <= _CLIENT_USAGES \
                or "client auth" not in usages:
            problem = "invalid subject or usages for kubernetes.io/kube-apiserver-client-kubelet"
    elif signer == "kubernetes.io/kubelet-serving":
        problem = _kubelet_serving_problem(pem, cn, orgs, usages)
    elif signer != "kubernetes.io/kube-apiserver-client":
        return obj                       # not a signer this cluster runs
    if problem:
        status.setdefault("conditions", []).append(_condition("Failed", "SignerValidationFailure", problem))
        obj["status"] = status
        return store.update("certificatesigningrequests", obj, subresource="status")
    seconds = DEFAULT_SECONDS
    if spec.get("expirationSeconds"):
        seconds = min(seconds, int(spec["expirationSeconds"]))
    if max_seconds:
        seconds = min(seconds, max_seconds)
    # The real signer backdates by 5 minutes, less for very short certs.
    backdate = 300 if seconds >= 600 else seconds // 2
    cert = ca.sign(pem, seconds, usages, backdate=backdate)
    status["certificate"] = base64.b64encode(cert).decode()
    obj["status"] = status
    return store.update("certificatesigningrequests", obj, subresource="status")
