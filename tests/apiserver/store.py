"""Objects, the global resourceVersion counter, and the watch event log.

Semantics follow k8s.io/apiserver's generic registry store:
* one counter for every write of every kind (like an etcd revision);
* an update that changes nothing is not written (no new resourceVersion, no event);
* a stale metadata.resourceVersion on update is a 409 Conflict, an empty one is
  an unconditional update;
* deletion: graceful for pods (deletionTimestamp + MODIFIED, removal when deleted
  again with grace 0), deferred while finalizers remain, immediate otherwise;
* the event log keeps the last `watch_window` events; a watch that starts
  before the retained window gets 410 Expired.

Objects are plain JSON dicts and are copied on the way in and out, so callers
can never alias stored state.
"""
from __future__ import annotations

import bisect
import datetime as dt
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import strategy
from .errors import ApiError, STALE, already_exists, conflict, gone, not_found
from .resources import Resource, by_key


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clone(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class Event:
    rv: int
    key: str                 # resource storage key
    namespace: str
    type: str                # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None


_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"    # apimachinery's SimpleNameGenerator alphabet


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_NAME_CHARS) for _ in range(n))


class Store:
    """All objects of the emulated cluster. Thread-safe."""

    def __init__(self, watch_window: int = 1000) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.rv = 1000                      # arbitrary start, like a fresh etcd
        self.watch_window = watch_window
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._log: list[Event] = []
        self._compacted = 0                 # events with rv <= this may be gone
        self.ca_pem = ""                    # published as kube-root-ca.crt
        self.closed = False
        self.inject_service_account_volume = True

    # -- helpers -------------------------------------------------------
    @staticmethod
    def _res(res: Resource | str) -> Resource:
        return res if isinstance(res, Resource) else by_key(res)

    def _table(self, res: Resource) -> dict[tuple[str, str], dict[str, Any]]:
        return self._objects.setdefault(res.key, {})

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, res: Resource, etype: str, obj: dict[str, Any],
              prev: dict[str, Any] | None) -> None:
        ns = obj["metadata"].get("namespace", "")
        self._log.append(Event(int(obj["metadata"]["resourceVersion"]), res.key, ns,
                               etype, clone(obj), prev))
        excess = len(self._log) - self.watch_window
        if excess > 0:
            self._compacted = self._log[excess - 1].rv
            del self._log[:excess]
        self.cond.notify_all()

    # -- reads ---------------------------------------------------------
    def get(self, res: Resource | str, namespace: str, name: str) -> dict[str, Any]:
        res = self._res(res)
        with self.cond:
            obj = self._table(res).get((namespace if res.namespaced else "", name))
            if obj is None:
                raise not_found(res, name)
            return clone(obj)

    def try_get(self, res: Resource | str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.get(res, namespace, name)
        except ApiError:
            return None

    def list(self, res: Resource | str, namespace: str | None = None,
             match: Callable[[dict[str, Any]], bool] | None = None
             ) -> tuple[list[dict[str, Any]], str]:
        """Matching objects sorted by namespace/name, and the list resourceVersion."""
        res = self._res(res)
        with self.cond:
            items = [o for (ns, _), o in sorted(self._table(res).items())
                     if (not namespace or ns == namespace) and (match is None or match(o))]
            return clone(items), str(self.rv)

    def current_rv(self) -> int:
        with self.cond:
            return self.rv

    # -- writes --------------------------------------------------------
    def create(self, res: Resource | str, obj: dict[str, Any], namespace: str | None = None,
               *, dry_run: bool = False, user: dict[str, Any] | None = None,
               admit: Callable[[dict[str, Any] | None, dict[str, Any]], None] | None = None
               ) -> dict[str, Any]:
        """Create an object, with the defaulting and validation the real server applies."""
        res = self._res(res)
        obj = clone(obj)
        md = obj.setdefault("metadata", {})
        if res.namespaced:
            md["namespace"] = namespace or md.get("namespace") or "default"
        else:
            md.pop("namespace", None)
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        with self.cond:
            if not md.get("name") and md.get("generateName"):
                md["name"] = md["generateName"] + random_suffix()
            strategy.prepare_for_create(res, obj, self, user)
            strategy.validate(res, obj, None)
            if admit is not None:
                admit(None, clone(obj))
            ns = md.get("namespace", "")
            if res.namespaced and not self._table(by_key("namespaces")).get(("", ns)):
                raise not_found(by_key("namespaces"), ns)
            if (ns, md["name"]) in self._table(res):
                raise already_exists(res, md["name"])
            for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
                md.pop(k, None)
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now_rfc3339()
            if res.generation:
                md["generation"] = 1
            if dry_run:
                md["resourceVersion"] = str(self.rv)
                return clone(obj)
            md["resourceVersion"] = str(self._bump())
            self._table(res)[(ns, md["name"])] = obj
            self._emit(res, "ADDED", obj, None)
            out = clone(obj)
            strategy.after_create(res, out, self)
            return out

    def update(self, res: Resource | str, obj: dict[str, Any], *,
               subresource: str | None = None, namespace: str | None = None,
               dry_run: bool = False,
               admit: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
               ) -> dict[str, Any]:
        """Replace an object.

        subresource: None writes the whole object (a test convenience: no
        status isolation); "" is a main-resource write (status changes are
        ignored), "status" writes only status (and metadata, as the real
        status strategies allow), "approval" only CSR approval conditions.
        A non-empty metadata.resourceVersion must match (409 otherwise).
        admit(old, new) may raise to reject the write (admission plugins).
        """
        res = self._res(res)
        new = clone(obj)
        md = new.setdefault("metadata", {})
        name = md.get("name", "")
        ns = (namespace or md.get("namespace") or "default") if res.namespaced else ""
        with self.cond:
            old = self._table(res).get((ns, name))
            if old is None:
                raise not_found(res, name)
            if md.get("resourceVersion") and md["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise conflict(res, name, STALE)
            new = strategy.prepare_for_update(res, clone(old), new, subresource)
            new["kind"], new["apiVersion"] = res.kind, res.api_version
            nmd = new["metadata"]
            omd = old["metadata"]
            for k in ("uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "name", "namespace"):
                if k in omd:
                    nmd[k] = omd[k]
                else:
                    nmd.pop(k, None)
            nmd["resourceVersion"] = omd["resourceVersion"]
            strategy.validate(res, new, old)
            if admit is not None:
                admit(clone(old), clone(new))
            if res.generation and strategy.spec_of(new) != strategy.spec_of(old):
                nmd["generation"] = omd.get("generation", 1) + 1
            if new == old:
                return clone(old)           # no-op: nothing written, no event
            if dry_run:
                return clone(new)
            if omd.get("deletionTimestamp") and not nmd.get("finalizers") \
                    and omd.get("deletionGracePeriodSeconds", 0) == 0:
                # The last finalizer went away: the deferred delete completes.
                return self._remove(res, ns, name, new)
            nmd["resourceVersion"] = str(self._bump())
            self._table(res)[(ns, name)] = new
            self._emit(res, "MODIFIED", new, clone(old))
            return clone(new)

    def _remove(self, res: Resource, ns: str, name: str,
                final: dict[str, Any]) -> dict[str, Any]:
        prev = self._table(res).pop((ns, name))
        final["metadata"]["resourceVersion"] = str(self._bump())
        self._emit(res, "DELETED", final, clone(prev))
        return clone(final)

    def delete(self, res: Resource | str, namespace: str, name: str, *,
               grace_period: int | None = None, preconditions: dict[str, Any] | None = None,
               dry_run: bool = False) -> tuple[dict[str, Any], bool]:
        """Delete as the generic store does; returns (object, removed_now)."""
        res = self._res(res)
        ns = namespace if res.namespaced else ""
        with self.cond:
            cur = self._table(res).get((ns, name))
            if cur is None:
                raise not_found(res, name)
            md = cur["metadata"]
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != md["uid"]:
                raise conflict(res, name, f"Precondition failed: UID in precondition: "
                               f"{pre['uid']}, UID in object meta: {md['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != md["resourceVersion"]:
                raise conflict(res, name, "Precondition failed: ResourceVersion in precondition: "
                               f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                               f"{md['resourceVersion']}")
            new = clone(cur)
            nmd = new["metadata"]
            period = 0
            if res.key == "pods":
                period = strategy.pod_grace_period(cur, grace_period)
                if md.get("deletionTimestamp") is not None:
                    # Already terminating: the grace period may only shrink.
                    if md.get("deletionGracePeriodSeconds", 0) <= period:
                        return clone(cur), False
                if period > 0:
                    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=period)
                    nmd["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                    nmd["deletionGracePeriodSeconds"] = period
                    return self._mark(res, ns, name, new, cur, dry_run), False
            if md.get("finalizers"):
                if md.get("deletionTimestamp") and md.get("deletionGracePeriodSeconds", 0) == 0:
                    return clone(cur), False
                nmd.setdefault("deletionTimestamp", now_rfc3339())
                nmd["deletionGracePeriodSeconds"] = 0
                return self._mark(res, ns, name, new, cur, dry_run), False
            if dry_run:
                return clone(cur), True
            out = self._remove(res, ns, name, new)
            strategy.after_delete(res, out, self)
            return out, True

    def _mark(self, res: Resource, ns: str, name: str, new: dict[str, Any],
              old: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        if dry_run:
            return clone(new)
        new["metadata"]["resourceVersion"] = str(self._bump())
        self._table(res)[(ns, name)] = new
        self._emit(res, "MODIFIED", new, clone(old))
        return clone(new)

    # -- watch ---------------------------------------------------------
    def compact(self) -> None:
        """Forget all history: any watch from an older resourceVersion gets 410."""
        with self.cond:
            self._compacted = self.rv
            self._log.clear()

    def check_window(self, since: int) -> None:
        with self.cond:
            if since < self._compacted:
                raise gone(f"too old resource version: {since} ({self._compacted + 1})")

    def wait_events(self, key: str, since: int, timeout: float
                    ) -> tuple[list[Event], int]:
        """Events of one kind with rv > since, waiting up to timeout for one.

        Returns (events, rv) where rv is the point up to which this kind's
        history has been delivered (usable for a BOOKMARK).
        """
        with self.cond:
            self.check_window(since)
            deadline = None
            while True:
                start = bisect.bisect_right(self._log, since, key=lambda e: e.rv)
                evs = [e for e in self._log[start:] if e.key == key]
                if evs or self.closed:
                    return evs, self.rv
                now = time.monotonic()
                deadline = deadline or now + timeout
                if now >= deadline:
                    return [], self.rv
                self.cond.wait(deadline - now)
                self.check_window(since)

    def wake_all(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def all_objects(self, res: Resource | str) -> Iterable[dict[str, Any]]:
        res = self._res(res)
        with self.cond:
            return [clone(o) for o in self._table(res).values()]

    def delete_namespace_contents(self, namespace: str) -> None:
        """What the namespace controller does, minus the waiting."""
        with self.cond:
            for key, table in self._objects.items():
                res = by_key(key)
                if not res.namespaced:
                    continue
                for (ns, name) in [k for k in table if k[0] == namespace]:
                    obj = table[(ns, name)]
                    obj["metadata"].pop("finalizers", None)
                    self._remove(res, ns, name, clone(obj))
