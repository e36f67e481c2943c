"""A pod's /etc/resolv.conf from its dnsPolicy and dnsConfig, as the
kubelet makes it (pkg/kubelet/network/dns/dns.go):

- ClusterFirst (the default): the cluster DNS addresses, search
  <ns>.svc.<domain> svc.<domain> <domain> then the host's search list,
  options ndots:5.  Without a configured cluster DNS it falls back to
  Default, with a warning event (MissingClusterDNS).
- ClusterFirstWithHostNet: ClusterFirst, for hostNetwork pods as well.
- ClusterFirst on a hostNetwork pod: Default (the pod shares the node's
  network, so it resolves as the node does).
- Default: the node's resolv.conf: nameservers, search, options.
- None: nothing but dnsConfig.
dnsConfig's nameservers and searches are added after the policy's (duplicates dropped),
its options override the policy's of the same name.  Limits as the
kubelet's: 3 nameservers (resolv.conf(5)'s MAXNS), 32 search domains
and 2048 characters of them; beyond, the list is cut and an event says
so (DNSConfigForming).

Pure: the caller reads the node's file and records the events.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["resolv_conf", "parse_resolv_conf", "MAX_NAMESERVERS"]

MAX_NAMESERVERS = 3
MAX_SEARCHES = 32
MAX_SEARCH_CHARS = 2048

Event = tuple[str, str]     # (reason, message), a Warning on the pod


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, search domains, options) of a resolv.conf(5) text.
    As the resolver does, the last search or domain line wins."""
    ns: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        key, args = words[0], words[1:]
        if key == "nameserver":
            ns.append(args[0])
        elif key in ("search", "domain"):
            search = list(args)
        elif key == "options":
            options += args
    return ns, search, options


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _merge_options(base: list[str], extra: list[dict]) -> list[str]:
    """dnsConfig options override those of the same name."""
    out: dict[str, str] = {}
    for o in base:
        out[o.split(":", 1)[0]] = o
    for o in extra:
        name = o.get("name") or ""
        if not name:
            continue
        value = o.get("value")
        out[name] = f"{name}:{value}" if value not in (None, "") else name
    return list(out.values())


def effective_policy(pod: dict, have_cluster_dns: bool) -> tuple[str, list[Event]]:
    """The policy used: ClusterFirst, Default or None; and warnings."""
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    host_net = bool(spec.get("hostNetwork"))
    if policy == "ClusterFirstWithHostNet":
        policy = "ClusterFirst"
    elif policy == "ClusterFirst" and host_net:
        policy = "Default"
    if policy == "ClusterFirst" and not have_cluster_dns:
        return "Default", [("MissingClusterDNS",
                            'pufflet does not have ClusterDNS IP configured and cannot '
                            'create Pod using "ClusterFirst" policy. Falling back to '
                            '"Default" policy.')]
    if policy not in ("ClusterFirst", "Default", "None"):
        # The API server validates dnsPolicy; an unknown one is treated as
        # the kubelet does, as ClusterFirst's fallback.
        return "Default", [("DNSConfigForming", f"unknown dnsPolicy {policy!r}: "
                            "using the node's resolv.conf")]
    return policy, []


def resolv_conf(pod: dict, cluster_dns: Sequence[str], cluster_domain: str,
                host_text: str) -> tuple[str, list[Event]]:
    """The text of the pod's /etc/resolv.conf and the warnings to record."""
    policy, events = effective_policy(pod, bool(cluster_dns))
    host_ns, host_search, host_opts = parse_resolv_conf(host_text)
    if policy == "ClusterFirst":
        ns_name = (pod.get("metadata") or {}).get("namespace") or "default"
        nameservers = list(cluster_dns)
        search = [f"{ns_name}.svc.{cluster_domain}", f"svc.{cluster_domain}",
                  cluster_domain, *host_search]
        options = ["ndots:5"]
    elif policy == "Default":
        nameservers, search, options = host_ns, host_search, host_opts
    else:
        nameservers, search, options = [], [], []
    cfg = (pod.get("spec") or {}).get("dnsConfig") or {}
    nameservers = _unique([*nameservers, *(cfg.get("nameservers") or ())])
    search = _unique([*search, *(cfg.get("searches") or ())])
    options = _merge_options(options, list(cfg.get("options") or ()))

    if len(nameservers) > MAX_NAMESERVERS:
        events.append(("DNSConfigForming",
                       "Nameserver limits were exceeded, some nameservers have been "
                       "omitted, the applied nameserver line is: "
                       + " ".join(nameservers[:MAX_NAMESERVERS])))
        nameservers = nameservers[:MAX_NAMESERVERS]
    cut = search[:MAX_SEARCHES]
    while cut and len(" ".join(cut)) > MAX_SEARCH_CHARS:
        cut.pop()
    if cut != search:
        events.append(("DNSConfigForming",
                       "Search Line limits were exceeded, some search paths have been "
                       "omitted, the applied search line is: " + " ".join(cut)))
        search = cut

    lines = [f"nameserver {n}" for n in nameservers]
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    return "".join(line + "\n" for line in lines), events
