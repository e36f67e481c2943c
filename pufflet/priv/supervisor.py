"""The root parent: serve the agent, restart it when it dies, obey signals.

Single-threaded on purpose: one selector watches the agent's socket and a
signal wakeup fd, so a signal never interrupts a half-done privileged
operation.
"""

import dataclasses
import logging
import os
import selectors
import signal
import socket
import time

from pufflet import config, log as plog, platform
from pufflet.config import Config
from pufflet.privsep import drop
from pufflet.privsep.channel import Server
from pufflet.privsep.spec import Spec
from pufflet.priv import pki
from pufflet.priv.services import Services

log = logging.getLogger("pufflet.priv")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
# An agent that stayed up this long had a real run; its death starts the
# backoff over instead of doubling it.
STABLE_RUN = 60.0
STOP_GRACE = 5.0
# The kubelet's ImageGCPeriod.
IMAGE_GC_PERIOD = 300.0

# Fields the parent itself acts on with root: changing them under running
# pods would orphan state, so SIGHUP leaves them alone.
RESTART_ONLY = {"user": "user", "state_dir": "state directory", "log_dir": "log directory",
                "pod_uid_min": "pod uid range", "pod_uid_max": "pod uid range",
                # The parent's pod networks and routes are set up at start.
                "pod_network": "pod network", "pod_routes": "pod routes"}


class Supervisor:
    def __init__(self, cfg: Config, spec: Spec, agent_main) -> None:
        self.cfg = cfg
        self.spec = spec
        self.agent_main = agent_main
        self.ident = drop.lookup(cfg.user)
        # Loaded once here so neither half imports it after fork.
        self.platform = platform.current()
        self.sel = selectors.DefaultSelector()
        self.agent_pid = 0
        self.agent_started = 0.0
        self.server: Server | None = None
        self.backoff = BACKOFF_MIN
        self.restart_at: float | None = 0.0
        self.stopping = False
        self.pending: set[int] = set()
        self.reloading = False
        self.next_gc = time.monotonic() + IMAGE_GC_PERIOD
        self._store = None
        # The pods (priv/pods.py): one for the daemon's life, made in run()
        # once the state directory is there; every agent connection uses it.
        self.pods = None

    # -- signals ---------------------------------------------------------

    def _install_signals(self) -> None:
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        self._sigsock = (rfd, wfd)
        signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._note)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.register(rfd, selectors.EVENT_READ, "signal")

    def _note(self, signum, frame) -> None:
        self.pending.add(signum)

    def _handle_signals(self) -> None:
        try:
            self._sigsock[0].recv(512)
        except BlockingIOError:
            pass
        pending, self.pending = self.pending, set()
        if signal.SIGCHLD in pending:
            self._reap()
        if signal.SIGHUP in pending:
            self.reload()
        if pending & {signal.SIGTERM, signal.SIGINT}:
            self.stopping = True

    # -- the agent -------------------------------------------------------

    def _start_agent(self) -> None:
        cfg, ident, spec = self.cfg, self.ident, self.spec
        # Before the fork: the agent's sandbox only covers files that exist
        # when it is applied (see pki.refresh_kubeconfig).
        pki.refresh_kubeconfig(cfg, ident)

        def child(sock: socket.socket) -> int:
            # The agent must not inherit the parent's signal plumbing.
            signal.set_wakeup_fd(-1)
            for s in self._sigsock:
                s.close()
            self.sel.close()
            if self.pods is not None:
                # Above all the logger's socket: the agent must not hand
                # the root logger pipes of its own.
                for fd in self.pods.private_fds():
                    os.close(fd)
            # And nothing else of the parent's: pidfds, image store locks,
            # whatever a handler had open.  The Python objects that owned
            # them are never used again in this process.
            keep = sock.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            plog.reopen()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            return self.agent_main(sock, cfg, spec, ident)

        self.agent_pid, sock = drop.spawn(child)
        self.agent_started = time.monotonic()
        self.restart_at = None
        self.server = Server(sock, self.spec,
                             Services(self.cfg, self.spec, self.pods).table(),
                             logging.getLogger("pufflet.priv.rpc"))
        self.sel.register(self.server.fileno(), selectors.EVENT_READ, "agent")
        log.info("agent started, pid %d", self.agent_pid)

    def _drop_channel(self) -> None:
        if self.server is not None:
            self.sel.unregister(self.server.fileno())
            self.server.close()
            self.server = None

    def _stop_agent(self) -> None:
        """Tell the agent to go and close our end; the SIGCHLD reaps it."""
        self._drop_channel()
        if self.agent_pid:
            try:
                os.kill(self.agent_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.agent_pid:
                self._agent_exited(status)
            elif self.pods is not None:
                # A container or exec (whose status the pods need), or a
                # helper of theirs: never dropped here.
                self.pods.child_exited(pid, status)

    def _agent_exited(self, status: int) -> None:
        self.agent_pid = 0
        self._drop_channel()
        if os.WIFSIGNALED(status):
            why = f"killed by signal {os.WTERMSIG(status)}"
        else:
            why = f"exited with status {os.WEXITSTATUS(status)}"
        if self.stopping:
            log.info("agent %s", why)
            return
        if self.reloading:
            self.reloading = False
            self.restart_at = time.monotonic()
            return
        ran = time.monotonic() - self.agent_started
        if ran >= STABLE_RUN:
            self.backoff = BACKOFF_MIN
        log.warning("agent %s after %.1fs; restarting in %.0fs", why, ran, self.backoff)
        self.restart_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    # -- configuration ---------------------------------------------------

    def reload(self) -> None:
        try:
            new = config.load(self.cfg.path)
        except config.ConfigError as e:
            for line in str(e).splitlines():
                log.error("%s", line)
            log.error("not reloading: configuration has errors")
            return
        kept = {}
        for field, statement in RESTART_ONLY.items():
            if getattr(new, field) != getattr(self.cfg, field):
                kept[field] = getattr(self.cfg, field)
        for statement in sorted({RESTART_ONLY[f] for f in kept}):
            log.warning("%s changed: restart pufflet to apply it", statement)
        new = dataclasses.replace(new, **kept)
        if new == self.cfg:
            log.info("configuration reloaded, nothing changed")
            return
        self.cfg = new
        log.info("configuration reloaded; restarting the agent to apply it")
        # The agent's death is reaped as usual; the new one starts without
        # waiting out a backoff the reload did not earn.
        if self.agent_pid:
            self.reloading = True
            self._stop_agent()
        else:
            self.restart_at = time.monotonic()

    # -- main loop -------------------------------------------------------

    def prepare(self) -> None:
        """Directories only root may write: created before the agent exists."""
        for path, mode in ((self.cfg.state_dir, 0o700), (self.cfg.log_dir, 0o755)):
            os.makedirs(path, mode=mode, exist_ok=True)
            st = os.stat(path)
            if st.st_uid != 0:
                raise SystemExit(f"{path}: must be owned by root")
        # The agent must reach its client certificate under the state
        # directory; pki.prepare opens exactly that much to its group.
        try:
            pki.prepare(self.cfg, self.ident)
        except (OSError, pki.PkiError) as e:
            raise SystemExit(f"{self.cfg.state_dir}: {e}") from None
        # Container logs, which the agent's node API reads (kubectl logs):
        # its group may read, only root writes.  Made now because the
        # agent's Landlock sandbox only covers paths that exist.
        pods_logs = os.path.join(self.cfg.log_dir, "pods")
        os.makedirs(pods_logs, mode=0o750, exist_ok=True)
        st = os.lstat(pods_logs)
        if not os.path.isdir(pods_logs) or os.path.islink(pods_logs) or st.st_uid != 0:
            raise SystemExit(f"{pods_logs}: must be a directory owned by root")
        if st.st_gid != self.ident.gid or st.st_mode & 0o7777 != 0o750:
            os.chown(pods_logs, 0, self.ident.gid)
            os.chmod(pods_logs, 0o750)

    def start_pods(self) -> None:
        """Load the pods' state, re-adopt running containers, sweep what is
        left of removed pods, connect to (or start) the container logger."""
        from pufflet.priv.logger import LoggerError
        from pufflet.priv.pods import PodRuntime
        self.pods = PodRuntime(self.cfg, self._image_store)
        self.pods.waker = self._wake_streams
        self.pods.reaper = self._reap
        self.sel.register(self.pods.fileno(), selectors.EVENT_READ, "pods")
        try:
            self.pods.logger.connect()
        except (OSError, LoggerError) as e:
            # Tried again at the first container start.
            log.error("container logger: %s", e)

    def _wake_streams(self) -> None:
        if self.server is not None:
            self.server.wake()

    def run(self) -> int:
        self.prepare()
        self.start_pods()
        self._install_signals()
        self.restart_at = time.monotonic()
        while True:
            if self.stopping:
                return self._shutdown()
            if self.restart_at is not None and not self.agent_pid \
                    and time.monotonic() >= self.restart_at:
                self._start_agent()
            now = time.monotonic()
            if now >= self.next_gc:
                self.collect_images()
                self.next_gc = now + IMAGE_GC_PERIOD
            timeout = self.next_gc - now
            if self.restart_at is not None:
                timeout = max(0.0, min(timeout, self.restart_at - now))
            if self.pods is not None:
                # Port-forward dialers past their deadline are killed (and
                # their streams end); sleep no longer than the next one.
                self.pods.forwarder.expire(now)
                due = self.pods.forwarder.next_deadline()
                if due is not None:
                    timeout = max(0.0, min(timeout, due - now))
            # Streams in flight advance one frame per turn: do not sleep
            # while one has more to send.
            if self.server is not None and self.server.busy():
                timeout = 0.0
            events = self.sel.select(timeout)
            for key, _ in events:
                if key.data == "signal":
                    self._handle_signals()
                elif key.data == "pods":
                    self.pods.poll()
                elif key.data == "agent" and self.server is not None:
                    if not self.server.on_readable():
                        self._lost_channel()
            if not events and self.server is not None and not self.server.on_idle():
                self._lost_channel()

    def images_in_use(self) -> set[str]:
        """Digests of images that pods use: never collected."""
        return self.pods.images_in_use() if self.pods is not None else set()

    def _image_store(self):
        from pufflet.priv.imagestore import Store
        if self._store is None:
            self._store = Store(os.path.join(self.cfg.state_dir, "images"))
        return self._store

    def collect_images(self) -> list[str]:
        """Image garbage collection, as the kubelet's image GC manager."""
        from pufflet.priv.imagestore import ImageError
        try:
            removed = self._image_store().gc(self.cfg.image_gc_high, self.cfg.image_gc_low,
                                     self.images_in_use())
        except (OSError, ImageError) as e:
            log.error("image garbage collection failed: %s", e)
            return []
        for digest in removed:
            log.info("image %s removed: state file system above %d%%",
                     digest, self.cfg.image_gc_high)
        return removed

    def _lost_channel(self) -> None:
        log.warning("agent channel closed")
        self._drop_channel()
        # The agent is useless without its channel; its death comes back
        # here as SIGCHLD.
        if self.agent_pid:
            os.kill(self.agent_pid, signal.SIGKILL)

    def _shutdown(self) -> int:
        log.info("stopping")
        self._stop_agent()
        deadline = time.monotonic() + STOP_GRACE
        while self.agent_pid and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.agent_pid:
            log.warning("agent did not stop in %.0fs; killing it", STOP_GRACE)
            os.kill(self.agent_pid, signal.SIGKILL)
            os.waitpid(self.agent_pid, 0)
        # Pods and the container logger keep running (each in a session of
        # its own, so this stop never reaches them); the next start
        # re-adopts the pods and reconnects to the logger.
        if self.pods is not None:
            self.pods.close()
        return 0
