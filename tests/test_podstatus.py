"""Pod status, against the kubelet's getPhase, convertToAPIContainerStatuses,
status/generate.go, the status manager's transition times, ComputePodQOS,
ShouldContainerBeRestarted and the container back-off."""

import pytest

from pufflet.agent.podstatus import (Backoff, ContainerView, PodView, Running, Terminated,
                                     Waiting, backoff_event_message, backoff_message,
                                     crashloop_backoff, exit_state, finished, go_duration,
                                     phase, pod_status, qos_class, rfc3339, should_restart)

T0 = 1_700_000_000.0
NOW = T0 + 100


def mkpod(containers=("a",), init=(), policy=None, sidecars=(), **spec):
    s = {"containers": [{"name": n, "image": f"img/{n}:1"} for n in containers],
         **spec}
    inits = [{"name": n, "image": "img/init"} for n in init] + \
        [{"name": n, "image": "img/side", "restartPolicy": "Always"} for n in sidecars]
    if inits:
        s["initContainers"] = inits
    if policy:
        s["restartPolicy"] = policy
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": s}


def run(name, **kw):
    return ContainerView(name, Running(T0), **kw)


def done(name, code=0, **kw):
    return ContainerView(name, Terminated(code, started_at=T0, finished_at=T0 + 5), **kw)


def crash(name, code=1, **kw):
    return ContainerView(name, Waiting("CrashLoopBackOff", "back-off"),
                         last_state=Terminated(code, started_at=T0, finished_at=T0 + 5),
                         restart_count=1, **kw)


def wait(name, reason="ContainerCreating"):
    return ContainerView(name, Waiting(reason))


def status(pod, *views, sandbox=True, terminal=False, previous=None, **kw):
    rt = PodView(sandbox, {v.name: v for v in views}, terminal)
    return pod_status(pod, rt, now=NOW, previous=previous, **kw)


@pytest.mark.parametrize("pod,views,terminal,want", [
    (mkpod(), [], False, "Pending"),
    (mkpod(), [wait("a")], False, "Pending"),
    (mkpod(), [run("a")], False, "Running"),
    (mkpod(("a", "b")), [run("a")], False, "Pending"),                # b unknown → default waiting
    (mkpod(("a", "b")), [run("a"), crash("b")], False, "Running"),   # restarting counts as stopped
    (mkpod(("a", "b")), [run("a"), wait("b")], False, "Pending"),
    (mkpod(policy="Always"), [done("a")], False, "Running"),
    (mkpod(policy="Always"), [done("a", 1)], False, "Running"),
    (mkpod(policy="OnFailure"), [done("a")], False, "Succeeded"),
    (mkpod(policy="OnFailure"), [done("a", 2)], False, "Running"),
    (mkpod(policy="Never"), [done("a")], False, "Succeeded"),
    (mkpod(("a", "b"), policy="Never"), [done("a"), done("b", 3)], False, "Failed"),
    (mkpod(("a", "b"), policy="Never"), [done("a"), run("b")], False, "Running"),
    # terminal: restart policy no longer matters
    (mkpod(policy="Always"), [done("a", 1)], True, "Failed"),
    (mkpod(policy="Always"), [done("a")], True, "Succeeded"),
    # waiting after a clean exit counts as stopped, not succeeded (the kubelet's quirk)
    (mkpod(policy="Always"), [crash("a", 0)], True, "Failed"),
    # init containers
    (mkpod(init=("i",)), [run("i")], False, "Pending"),
    (mkpod(init=("i",)), [done("i"), wait("a")], False, "Pending"),
    (mkpod(init=("i",)), [done("i"), run("a")], False, "Running"),
    (mkpod(init=("i",), policy="Never"), [done("i", 1)], False, "Failed"),
    (mkpod(init=("i",), policy="OnFailure"), [crash("i")], False, "Pending"),
    (mkpod(init=("i", "j")), [done("i"), run("j")], False, "Pending"),
    # sidecars (restartable init containers)
    (mkpod(sidecars=("s",)), [run("s", started=False)], False, "Pending"),
    (mkpod(sidecars=("s",)), [run("s"), run("a")], False, "Running"),
    (mkpod(sidecars=("s",)), [run("s"), wait("a")], False, "Pending"),
    (mkpod(sidecars=("s",), policy="Never"), [done("s", 137), done("a")], False, "Succeeded"),
    # started app + restarting sidecar: not back to Pending
    (mkpod(sidecars=("s",)), [crash("s"), run("a")], False, "Running"),
    # a sidecar waiting that never ran holds the pod in Pending
    (mkpod(sidecars=("s",)), [ContainerView("s", Waiting("ErrImagePull")), run("a")], False,
     "Pending"),
])
def test_phase(pod, views, terminal, want):
    assert status(pod, *views, terminal=terminal)["phase"] == want


def test_static_pods_get_no_terminal_phase():
    pod = mkpod(policy="Always")
    pod["metadata"]["annotations"] = {"kubernetes.io/config.source": "file"}
    assert status(pod, done("a", 1), terminal=True)["phase"] == "Running"
    pod["spec"]["restartPolicy"] = "Never"
    assert status(pod, done("a", 1), terminal=True)["phase"] == "Failed"


def test_phase_helper_on_api_statuses():
    pod = mkpod(("a",))
    assert phase(pod, {"a": {"state": {"running": {}}}}, False) == "Running"
    assert phase(pod, {"a": {"state": {}}}, False) == "Pending"


def cond(st, t):
    return next(c for c in st["conditions"] if c["type"] == t)


def test_conditions_running_ready():
    st = status(mkpod(("b", "a")), run("a"), run("b"))
    assert [c["type"] for c in st["conditions"]] == [
        "PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
    for c in st["conditions"]:
        assert c["status"] == "True" and c["lastTransitionTime"] == rfc3339(NOW)
        assert c["lastProbeTime"] is None and "reason" not in c


def test_conditions_not_ready_messages():
    st = status(mkpod(("c", "b", "a")), run("c", ready=False), run("b", started=False),
                sandbox=False)
    assert cond(st, "PodReadyToStartContainers")["status"] == "False"
    want = {"status": "False", "reason": "ContainersNotReady",
            "message": "containers with unready status: [c b a]"}
    # a is unknown: default waiting, which has a status (unready), as in the kubelet
    for t in ("Ready", "ContainersReady"):
        assert {k: cond(st, t)[k] for k in want} == want


def test_initialized_messages():
    st = status(mkpod(init=("i", "j")), run("i"))
    c = cond(st, "Initialized")
    assert (c["status"], c["reason"], c["message"]) == (
        "False", "ContainersNotInitialized", "containers with incomplete status: [i j]")
    st = status(mkpod(init=("i", "j")), done("i"), done("j"), run("a"))
    assert cond(st, "Initialized")["status"] == "True"
    # a sidecar initializes when started, not when done
    st = status(mkpod(sidecars=("s",)), run("s", started=False))
    assert cond(st, "Initialized")["message"] == "containers with incomplete status: [s]"
    st = status(mkpod(sidecars=("s",)), run("s"))
    assert cond(st, "Initialized")["status"] == "True"


def test_terminal_conditions():
    st = status(mkpod(policy="Never"), done("a"))
    assert (cond(st, "ContainersReady")["reason"], cond(st, "Ready")["reason"],
            cond(st, "Initialized")["reason"]) == ("PodCompleted", "PodCompleted", "PodCompleted")
    assert cond(st, "Initialized")["status"] == "True"
    st = status(mkpod(policy="Never"), done("a", 1))
    assert (cond(st, "ContainersReady")["reason"], cond(st, "Ready")["status"]) == ("PodFailed", "False")


def test_readiness_gates():
    pod = mkpod(readinessGates=[{"conditionType": "example.com/lb"}, {"conditionType": "x/y"}])
    pod["status"] = {"conditions": [{"type": "example.com/lb", "status": "False"}]}
    st = status(pod, run("a"))
    c = cond(st, "Ready")
    assert c["reason"] == "ReadinessGatesNotReady"
    assert c["message"] == ('the status of pod readiness gate "example.com/lb" is not "True", '
                            'but False, corresponding condition of pod readiness gate "x/y" '
                            "does not exist.")
    assert cond(st, "ContainersReady")["status"] == "True"
    assert st["conditions"][0] == {"type": "example.com/lb", "status": "False"}   # kept as is


def test_transition_times_kept_unless_flipped():
    old_t = rfc3339(T0 - 1000)
    previous = {"conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": old_t},
        {"type": "Initialized", "status": "True", "lastTransitionTime": old_t},
        {"type": "Ready", "status": "False", "lastTransitionTime": old_t},
        {"type": "ContainersReady", "status": "True", "lastTransitionTime": old_t}],
        "startTime": old_t, "qosClass": "Guaranteed"}
    st = status(mkpod(), run("a", ready=False), previous=previous)
    assert cond(st, "PodScheduled")["lastTransitionTime"] == old_t
    assert cond(st, "Initialized")["lastTransitionTime"] == old_t
    assert cond(st, "Ready")["lastTransitionTime"] == old_t              # still False
    assert cond(st, "ContainersReady")["lastTransitionTime"] == rfc3339(NOW)   # flipped
    assert cond(st, "PodReadyToStartContainers")["lastTransitionTime"] == rfc3339(NOW)  # new
    assert st["startTime"] == old_t and st["qosClass"] == "Guaranteed"


def test_previous_defaults_to_api_status():
    pod = mkpod()
    pod["status"] = {"startTime": "2020-01-01T00:00:00Z",
                     "conditions": [{"type": "PodScheduled", "status": "True",
                                     "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    st = status(pod, run("a"))
    assert st["startTime"] == "2020-01-01T00:00:00Z"
    assert cond(st, "PodScheduled")["lastTransitionTime"] == "2020-01-01T00:00:00Z"


def test_terminal_phase_is_never_left_and_reason_kept():
    pod = mkpod()
    st = status(pod, run("a"), previous={"phase": "Failed", "reason": "Evicted", "message": "m"})
    assert (st["phase"], st["reason"], st["message"]) == ("Failed", "Evicted", "m")
    pod["status"] = {"phase": "Succeeded"}
    assert status(pod, run("a"), previous={"phase": "Running"})["phase"] == "Succeeded"
    # a reason goes with its phase only
    st = status(mkpod(), run("a"), previous={"phase": "Pending", "reason": "X"})
    assert "reason" not in st


def test_container_statuses():
    pod = mkpod(("web", "app"), init=("init",))
    st = status(pod, done("init", container_id="abc"),
                run("web", restart_count=2, image="docker.io/img/web:1",
                    image_id="docker.io/img/web@sha256:" + "0" * 64, container_id="pufflet://w",
                    last_state=Terminated(1, "Error", "", T0 - 50, T0 - 10, None, "pufflet://old")),
                wait("app", "ErrImagePull"))
    web, app = st["containerStatuses"][1], st["containerStatuses"][0]
    assert [s["name"] for s in st["containerStatuses"]] == ["app", "web"]   # by name
    assert web == {"name": "web", "state": {"running": {"startedAt": rfc3339(T0)}},
                   "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                "startedAt": rfc3339(T0 - 50),
                                                "finishedAt": rfc3339(T0 - 10),
                                                "containerID": "pufflet://old"}},
                   "ready": True, "restartCount": 2, "image": "docker.io/img/web:1",
                   "imageID": "docker.io/img/web@sha256:" + "0" * 64,
                   "containerID": "pufflet://w", "started": True}
    assert app["state"] == {"waiting": {"reason": "ErrImagePull"}}
    assert (app["ready"], app["started"], app["image"], app["imageID"]) == (False, False, "img/app:1", "")
    (init,) = st["initContainerStatuses"]
    assert init["state"]["terminated"]["reason"] == "Completed"
    assert (init["ready"], init["started"], init["containerID"]) == (True, False, "pufflet://abc")


@pytest.mark.parametrize("has_init,reason", [(False, "ContainerCreating"), (True, "PodInitializing")])
def test_default_waiting(has_init, reason):
    pod = mkpod(init=("i",) if has_init else ())
    st = status(pod)
    assert st["containerStatuses"][0]["state"] == {"waiting": {"reason": reason}}
    assert st["containerStatuses"][0]["lastState"] == {}


def test_ready_needs_running_and_started():
    st = status(mkpod(("a", "b", "c")), run("a", ready=True, started=False),
                done("b"), run("c", ready=False))
    got = {s["name"]: (s["ready"], s["started"]) for s in st["containerStatuses"]}
    assert got == {"a": (False, False), "b": (False, False), "c": (False, True)}


def test_unseen_containers_keep_previous():
    prev = {"containerStatuses": [
        {"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
         "restartCount": 3, "lastState": {}, "ready": False, "image": "x", "imageID": "y"},
        {"name": "b", "state": {"running": {"startedAt": "2020-01-01T00:00:00Z"}},
         "restartCount": 1, "lastState": {}},
        {"name": "c", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 4,
         "lastState": {"terminated": {"exitCode": 2}}}]}
    st = status(mkpod(("a", "b", "c")), previous=prev)
    by = {s["name"]: s for s in st["containerStatuses"]}
    assert by["a"] == prev["containerStatuses"][0]
    assert by["b"]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert by["b"]["lastState"]["terminated"]["reason"] == "ContainerStatusUnknown"
    assert by["b"]["lastState"]["terminated"]["exitCode"] == 137
    assert by["b"]["restartCount"] == 2
    assert (by["c"]["restartCount"], by["c"]["lastState"]) == (4, {"terminated": {"exitCode": 2}})
    # deleted: no restart counted
    pod = mkpod(("b",))
    pod["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert status(pod, previous=prev)["containerStatuses"][0]["restartCount"] == 1


def test_ips():
    st = status(mkpod(), run("a"), host_ip="10.0.0.5", pod_ips=["10.1.0.7"])
    assert (st["hostIP"], st["hostIPs"], st["podIP"], st["podIPs"]) == (
        "10.0.0.5", [{"ip": "10.0.0.5"}], "10.1.0.7", [{"ip": "10.1.0.7"}])
    st = status(mkpod(hostNetwork=True), run("a"), host_ip=["10.0.0.5", "fd00::5"])
    assert st["podIPs"] == [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
    st = status(mkpod(), run("a"))
    assert "hostIP" not in st and "podIP" not in st


def test_observed_generation():
    pod = mkpod()
    pod["metadata"]["generation"] = 3
    st = status(pod, run("a"))
    assert st["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


def res(req=None, lim=None):
    return {"resources": {k: v for k, v in (("requests", req), ("limits", lim)) if v}}


@pytest.mark.parametrize("containers,init,want", [
    ([{}], [], "BestEffort"),
    ([res(lim={"nvidia.com/gpu": "1"})], [], "BestEffort"),          # only cpu and memory count
    ([res(req={"cpu": "0"})], [], "BestEffort"),
    ([res(req={"cpu": "100m"})], [], "Burstable"),
    ([res(lim={"cpu": "1", "memory": "1Gi"}, req={"cpu": "1", "memory": "1Gi"})], [], "Guaranteed"),
    ([res(lim={"cpu": "1", "memory": "1Gi"})], [], "Guaranteed"),     # requests default to limits
    ([res(lim={"cpu": "1", "memory": "1Gi"}, req={"cpu": "1000m", "memory": "1024Mi"})], [],
     "Guaranteed"),
    ([res(lim={"cpu": "1", "memory": "1Gi"}, req={"cpu": "500m", "memory": "1Gi"})], [], "Burstable"),
    ([res(lim={"cpu": "1"})], [], "Burstable"),
    ([res(lim={"cpu": "1", "memory": "1Gi"}), {}], [], "Burstable"),
    ([res(lim={"cpu": "1", "memory": "1Gi"})], [res(lim={"cpu": "1", "memory": "1Gi"})], "Guaranteed"),
    ([res(lim={"cpu": "1", "memory": "1Gi"})], [{}], "Burstable"),
])
def test_qos(containers, init, want):
    spec = {"containers": [{"name": f"c{i}", **c} for i, c in enumerate(containers)],
            "initContainers": [{"name": f"i{i}", **c} for i, c in enumerate(init)]}
    assert qos_class({"spec": spec}) == want


@pytest.mark.parametrize("code,sig,want", [
    (0, None, (0, "Completed", None)),
    (3, None, (3, "Error", None)),
    (None, 9, (137, "Error", 9)),
    (None, 15, (143, "Error", 15)),
    (None, None, (137, "ContainerStatusUnknown", None)),
])
def test_exit_state(code, sig, want):
    t = exit_state(code, sig, started_at=T0, finished_at=T0 + 1, reason="gone while down")
    st = status(mkpod(policy="Never"), ContainerView("a", t))
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term.get("signal")) == want
    if code is None and sig is None:
        assert term["message"] == "gone while down"


@pytest.mark.parametrize("policy,cpolicy,view,deleting,want", [
    ("Always", None, None, False, True),
    ("Never", None, None, False, True),                       # never ran
    ("Never", None, wait("a"), False, True),                  # created, not run
    ("Always", None, run("a"), False, False),
    ("Always", None, done("a"), False, True),
    ("OnFailure", None, done("a"), False, False),
    ("OnFailure", None, done("a", 1), False, True),
    ("OnFailure", None, crash("a", 1), False, True),
    ("Never", None, done("a", 1), False, False),
    ("Never", "Always", done("a"), False, True),              # sidecar
    ("Always", None, done("a", 1), True, False),              # being deleted
    ("Always", None, None, True, False),
])
def test_should_restart(policy, cpolicy, view, deleting, want):
    pod = mkpod(policy=policy)
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "x"
    c = {"name": "a", **({"restartPolicy": cpolicy} if cpolicy else {})}
    assert should_restart(pod, c, view) is want


@pytest.mark.parametrize("pod,views,deleting,want", [
    (mkpod(policy="Never"), [done("a", 1)], False, True),
    (mkpod(policy="OnFailure"), [done("a", 1)], False, False),
    (mkpod(policy="OnFailure"), [done("a")], False, True),
    (mkpod(policy="Always"), [done("a")], False, False),
    (mkpod(policy="Never"), [], False, False),
    (mkpod(("a", "b"), policy="Never"), [done("a"), run("b")], False, False),
    (mkpod(init=("i",), policy="Never"), [done("i", 1)], False, True),
    (mkpod(init=("i",), policy="OnFailure"), [done("i", 1)], False, False),
    (mkpod(sidecars=("s",), policy="Never"), [run("s"), done("a")], False, True),
    (mkpod(policy="Always"), [run("a")], True, False),
    (mkpod(policy="Always"), [done("a")], True, True),
    (mkpod(policy="Always"), [], True, True),
])
def test_finished(pod, views, deleting, want):
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "x"
    assert finished(pod, PodView(True, {v.name: v for v in views})) is want


def test_crashloop_backoff_sequence():
    entry, t, delays = None, T0, []
    for _ in range(8):
        finished_at = t + 1                   # each run lasts a second
        wait, entry2 = crashloop_backoff(entry, finished_at, finished_at)
        if wait:
            assert entry2 is entry
            delays.append(round(wait))
            t = finished_at + wait
            wait, entry2 = crashloop_backoff(entry, finished_at, t)
            assert wait == 0
        else:
            delays.append(0)
            t = finished_at
        entry = entry2
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300]


def test_crashloop_backoff_waits_from_finish_and_resets():
    e = Backoff(40.0, T0)
    assert crashloop_backoff(e, T0 + 100, T0 + 110) == (30.0, e)
    assert crashloop_backoff(e, T0 + 100, T0 + 140) == (0.0, Backoff(80.0, T0 + 140))
    # ran more than 10 minutes since the last restart: back to 10 s, no wait
    assert crashloop_backoff(Backoff(300.0, T0), T0 + 601, T0 + 602) == (0.0, Backoff(10.0, T0 + 602))
    assert crashloop_backoff(Backoff(300.0, T0), T0 + 599, T0 + 600)[0] == 299.0


@pytest.mark.parametrize("secs,want", [(0, "0s"), (10, "10s"), (59, "59s"), (60, "1m0s"),
                                       (80, "1m20s"), (300, "5m0s"), (3600, "1h0m0s"),
                                       (3725, "1h2m5s")])
def test_go_duration(secs, want):
    assert go_duration(secs) == want


def test_backoff_messages():
    pod = mkpod()
    assert backoff_message(20, "x", pod) == "back-off 20s restarting failed container=x pod=p_ns(u-1)"
    assert backoff_message(300, "x", pod) == "back-off 5m0s restarting failed container=x pod=p_ns(u-1)"
    assert backoff_event_message("x", pod) == "Back-off restarting failed container x in pod p_ns(u-1)"
