"""$(VAR) expansion and a container's argv, as the kubelet and containerd
make them.

Kubernetes expands $(NAME) in command, args and env values against the
container's variables (k8s.io/kubernetes third_party/forked/golang/
expansion).  The rules, kept exactly because pod authors rely on them:

    $(NAME)     the variable's value; left as written when NAME is unknown
    $$          a single '$' (so $$(NAME) is the literal text $(NAME))
    $(NAME      no closing ')': left as written, scanning goes on after '('
    $X          any other character after '$': both kept
    $ at end    kept
    nesting     none: $(A$(B)) looks up the name "A$(B" and is left alone

Unlike Go, this scans characters, not bytes: '$' before a multi-byte
character keeps that character whole (Go would mangle it into another
code point; no one can depend on that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["expand", "env_map", "command_args", "NoCommandError"]


class NoCommandError(ValueError):
    """Neither the pod nor the image says what to run (containerd's "no
    command specified": the kubelet reports CreateContainerError)."""


def expand(s: str, variables: Mapping[str, str]) -> str:
    """s with every $(NAME) that variables defines replaced."""
    if "$" not in s:
        return s
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "$" or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = s[i + 1]
        if nxt == "$":                       # escaped operator
            out.append("$")
            i += 2
        elif nxt == "(":
            close = s.find(")", i + 2)
            if close < 0:
                # Incomplete: emit "$(" and rescan what follows it, so a
                # later complete reference still expands.
                out.append("$(")
                i += 2
            else:
                name = s[i + 2:close]
                value = variables.get(name)
                out.append(f"$({name})" if value is None else value)
                i = close + 1
        else:
            out.append(c + nxt)
            i += 2
    return "".join(out)


def env_map(env: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """A mapping from "K=V" strings (the last of a name wins, as the
    kubelet's EnvVarsToMap), or a copy of a mapping."""
    if isinstance(env, Mapping):
        return dict(env)
    out: dict[str, str] = {}
    for kv in env:
        k, sep, v = kv.partition("=")
        if sep:
            out[k] = v
    return out


def _image_lists(image_config: Any) -> tuple[list[str] | None, list[str] | None]:
    """(Entrypoint, Cmd) from an oci.ImageConfig or the "config" object of
    an image config JSON; None where the image does not set them."""
    if image_config is None:
        return None, None
    if isinstance(image_config, Mapping):
        ep, cmd = image_config.get("Entrypoint"), image_config.get("Cmd")
    else:
        ep, cmd = image_config.entrypoint, image_config.cmd
    return (list(ep) if ep is not None else None,
            list(cmd) if cmd is not None else None)


def command_args(container: Mapping[str, Any], image_config: Any,
                 env: Mapping[str, str] | Sequence[str]) -> list[str]:
    """The argv to exec for a container.

    The kubelet expands the pod's command and args, each element against
    env (ExpandContainerCommandAndArgs); the runtime then merges them with
    the image (containerd's WithProcessArgs, after moby):

        command set        command + args (the image's Entrypoint and Cmd
                           both ignored, even with no args)
        only args          Entrypoint + args
        neither            Entrypoint + Cmd
        Entrypoint [""]    counts as no Entrypoint (docker's way to reset it)

    env should be what the kubelet expands with: the variables it made
    (envvars.ContainerEnv.variables), not the image's Env, which the
    kubelet never sees.  Image values are never expanded."""
    variables = env_map(env)
    command = [expand(c, variables) for c in container.get("command") or ()]
    args = [expand(a, variables) for a in container.get("args") or ()]
    if not command:
        entrypoint, cmd = _image_lists(image_config)
        if not args:
            args = cmd or []
        if entrypoint is not None and entrypoint != [""]:
            command = entrypoint
    argv = command + args
    if not argv:
        raise NoCommandError(f"container {container.get('name', '?')}: "
                             "no command specified")
    return argv
