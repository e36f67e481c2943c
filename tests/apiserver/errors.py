"""API errors rendered as metav1.Status, the way kube-apiserver words them.

Messages follow k8s.io/apimachinery/pkg/api/errors so that clients (and
tests written against a real cluster) see the same text.
"""
from __future__ import annotations

from typing import Any

from .resources import Resource


class ApiError(Exception):
    """An error answered to the client as a Status object."""

    def __init__(self, code: int, reason: str, message: str,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "message": self.message,
                               "reason": self.reason, "code": self.code}
        if self.details is not None:
            out["details"] = self.details
        return out


def qualified(res: Resource) -> str:
    """GroupResource.String(): "pods", "leases.coordination.k8s.io"."""
    return res.key


def _details(res: Resource, name: str, kind: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if res.group:
        d["group"] = res.group
    d["kind"] = kind or res.plural
    return d


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{qualified(res)} "{name}" not found', _details(res, name))


def already_exists(res: Resource, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{qualified(res)} "{name}" already exists',
                    _details(res, name))


def conflict(res: Resource, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {qualified(res)} "{name}": {why}',
                    _details(res, name))


STALE = "the object has been modified; please apply your changes to the latest version and try again"


def invalid(res: Resource, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """causes: (field, message) pairs, e.g. ("spec.nodeName", 'Invalid value: ...')."""
    text = "; ".join(f"{f}: {m}" for f, m in causes)
    if len(causes) > 1:
        text = "[" + ", ".join(f"{f}: {m}" for f, m in causes) + "]"
    details = _details(res, name, kind=res.kind)
    details["causes"] = [{"reason": "FieldValueInvalid", "message": m, "field": f}
                         for f, m in causes]
    return ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: {text}', details)


def forbidden(res: Resource | None, name: str, why: str, resource: str = "") -> ApiError:
    """403 as NewForbidden(qualifiedResource, name, err) renders it."""
    what = qualified(res) if res else resource
    prefix = f'{what} "{name}"' if name else what
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if res and res.group:
        details["group"] = res.group
    details["kind"] = res.plural if res else resource
    return ApiError(403, "Forbidden", f"{prefix} is forbidden: {why}", details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed(what: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed",
                    f"the server does not allow this method on the requested resource{what}")


def path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource",
                    {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]})


def injected(code: int, retry_after: int | None = None) -> ApiError:
    """Errors a test asked for with ApiServer.fail_next()."""
    table = {429: ("TooManyRequests", "the server has received too many requests and has "
                   "asked us to try again later"),
             500: ("InternalError", "Internal error occurred: injected by the test"),
             503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
             504: ("Timeout", "the server was unable to return a response in the time allotted")}
    reason, msg = table.get(code, ("InternalError", f"injected error {code}"))
    if retry_after is None:
        return ApiError(code, reason, msg)
    return ApiError(code, reason, msg, {"retryAfterSeconds": retry_after},
                    {"Retry-After": str(retry_after)})
