"""API requests per minute of an idle node at steady state, against the
kubelet's budget: 6 lease renewals a minute, and the node status at most
once per 5 minutes when nothing changed.

The node logic runs in-process against the API emulator (tests/apiserver)
with node facts from a real privsep channel.  By default every interval
is divided by --scale (lease duration 40 s → 2 s, status every 10 s →
0.5 s, report every 300 s → 15 s) and the counts are scaled back to real
minutes; --scale 1 runs the real intervals (use --seconds 330 or more to
see a report).  Registration is left out: counting starts after --warmup.

    python3 bench/apicalls.py [--scale 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import collections
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from apiserver import ApiServer                      # noqa: E402
from pufflet import config                           # noqa: E402
from pufflet.agent import kube, node                 # noqa: E402
from pufflet.priv.services import Services           # noqa: E402
from pufflet.privsep import spec as specmod          # noqa: E402
from pufflet.privsep.channel import Client, Server   # noqa: E402


def facts_channel(cfg: config.Config):
    spec = specmod.load()
    mine, theirs = socket.socketpair()
    server = Server(theirs, spec, Services(cfg, spec).table(), logging.getLogger("priv"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(mine, spec)
    client.call("Handshake", {"spec_version": spec.version, "spec_digest": spec.digest,
                              "agent_version": "bench"})
    return lambda: client.call("GetNodeFacts", {}).body


def kind(r) -> str:
    if "/leases" in r.path:
        return f"lease {r.verb}"
    if r.path.endswith("/status"):
        return f"status {r.verb}"
    return f"{r.path.split('/')[-1] if r.verb != 'watch' else 'nodes'} {r.verb}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=20, help="divide every interval by this")
    ap.add_argument("--seconds", type=float, default=30.0, help="wall time measured")
    ap.add_argument("--warmup", type=float, default=None,
                    help="wall time before counting (default: one lease duration)")
    args = ap.parse_args()
    s = args.scale
    if 40 % s:
        ap.error("--scale must divide 40 (the lease duration is whole seconds)")
    with tempfile.TemporaryDirectory() as tmp:
        api = ApiServer(Path(tmp) / "api").start()
        cfg = config.parse(
            f'node name bench-node\nstate directory "{tmp}"\n'
            f"node lease duration {40 // s}\nnode status interval {10 / s:g}\n"
            f"node status report {300 / s:g}\n")
        access = kube.load_kubeconfig(str(api.kubeconfig("system:node:bench-node")))
        agent = node.NodeAgent(cfg, kube.api_client(access), facts_channel(cfg), access.server)
        agent.start()
        time.sleep(args.warmup if args.warmup is not None else 40 / s)
        mark = len(api.request_log)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        log = api.request_log[mark:]
        agent.close()
        api.stop()

    minutes = elapsed * s / 60          # real minutes the run stands for
    by = collections.Counter(kind(r) for r in log)
    print(f"pufflet node API calls at steady state: {elapsed:.1f} s wall, intervals "
          f"divided by {s} (= {minutes:.1f} real minutes), figures per real minute")
    for k, n in sorted(by.items()):
        print(f"  {k:<16} {n / minutes:6.2f}/min  ({n} requests)")
    lease = by["lease update"] / minutes
    status = by["status patch"] / minutes
    other = (len(log) - by["lease update"] - by["status patch"]) / minutes
    ok = lease <= 6.0 * 1.05 and status <= 0.2 * 1.5
    print(f"lease_updates_per_min={lease:.1f} status_patches_per_min={status:.2f} "
          f"other_per_min={other:.2f} target: <=6 lease, <=0.2 status "
          f"(kubelet) -> {'OK' if ok else 'OVER'}")
    print("  other: the watch on the node's own Node (the kubelet's informer) is "
          "re-opened every 5-10 minutes of wall time, not scaled: ~0.13/min")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
