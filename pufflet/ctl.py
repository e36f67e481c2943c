"""puffletctl: manage pufflet's image store.

    puffletctl [-f file] image list | rm | tag | import | build | pull | push

Works on the store directly, as root, beside a running daemon: every
change to the store takes the store's lock, and images only ever enter it
through put_manifest, the same verification and unpacker a pull uses.
"""

from __future__ import annotations

import getopt
import json
import os
import shlex
import sys

from pufflet import config
from pufflet.images import oci
from pufflet.images.oci import ImageConfig, ImageError

DEFAULT_CONFIG = "/etc/pufflet.conf"
USAGE = """usage: puffletctl [-f file] image list
       puffletctl [-f file] image rm ref ...
       puffletctl [-f file] image tag source target
       puffletctl [-f file] image import [-p platform] path [name]
       puffletctl [-f file] image build -t name [-p platform] [--entrypoint cmd]
                  [--cmd cmd] [--env name=value] [--workdir dir] [--user user]
                  directory | --files listfile | --file path ...
       puffletctl [-f file] image pull [-p platform] ref
       puffletctl [-f file] image push ref [destination]"""


class UsageError(Exception):
    pass


def _store(cfg):
    from pufflet.priv.imagestore import Store
    return Store(os.path.join(cfg.state_dir, "images"))


def _platform(opts: dict) -> oci.Platform:
    return oci.parse_platform(opts["-p"]) if "-p" in opts else oci.host_platform()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def cmd_list(cfg, args: list[str]) -> int:
    if args:
        raise UsageError()
    store = _store(cfg)
    rows = [("NAME", "DIGEST", "SIZE")]
    for img in store.list():
        for n in img.names or ("<none>",):
            rows.append((n, img.digest[:19], _size(img.size)))
    w0 = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<19}  {r[2]}")
    return 0


def cmd_rm(cfg, args: list[str]) -> int:
    if not args:
        raise UsageError()
    store = _store(cfg)
    for ref in args:
        store.remove(ref)
    return 0


def cmd_tag(cfg, args: list[str]) -> int:
    if len(args) != 2:
        raise UsageError()
    _store(cfg).tag(args[0], args[1])
    return 0


def cmd_import(cfg, args: list[str]) -> int:
    opts, rest = getopt.getopt(args, "p:")
    if len(rest) not in (1, 2):
        raise UsageError()
    from pufflet.priv.imageimport import import_image
    images = import_image(_store(cfg), rest[0], rest[1] if len(rest) == 2 else None,
                          _platform(dict(opts)))
    for img in images:
        print(f"{', '.join(img.names) or '<none>'} {img.digest}")
    return 0


def _argv(value: str) -> tuple[str, ...]:
    """A JSON array, as in a Dockerfile, or words split as sh(1) would."""
    if value.lstrip().startswith("["):
        try:
            v = json.loads(value)
        except ValueError:
            raise ImageError(f"{value!r}: not a JSON array") from None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ImageError(f"{value!r}: want a JSON array of strings")
        return tuple(v)
    return tuple(shlex.split(value))


def cmd_build(cfg, args: list[str]) -> int:
    opts, rest = getopt.gnu_getopt(args, "t:p:", ["files=", "file=", "entrypoint=",
                                                  "cmd=", "env=", "workdir=", "user="])
    name, files, env = None, [], []
    entrypoint = cmd = None
    workdir = user = ""
    for o, v in opts:
        if o == "-t":
            name = v
        elif o == "--files":
            with open(v) as f:
                files += [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
        elif o == "--file":
            files.append(v)
        elif o == "--entrypoint":
            entrypoint = _argv(v)
        elif o == "--cmd":
            cmd = _argv(v)
        elif o == "--env":
            if "=" not in v:
                raise ImageError(f"--env {v!r}: want NAME=value")
            env.append(v)
        elif o == "--workdir":
            workdir = v
        elif o == "--user":
            user = v
    if name is None or (files and rest) or (not files and len(rest) != 1):
        raise UsageError()
    from pufflet.priv import imagebuild
    layer = imagebuild.Layer()
    if files:
        for f in files:
            layer.add_host_path(f)
    else:
        layer.add_tree(rest[0])
    conf = ImageConfig(entrypoint, cmd, tuple(env), workdir, user, None, (), ())
    img = imagebuild.build(_store(cfg), name, layer, conf, _platform(dict(opts)))
    print(f"{img.names[0]} {img.digest}")
    return 0


def _client(cfg):
    from pufflet.images import auth, registry
    keyring = auth.Keyring()
    if cfg.registry_credentials:
        keyring = auth.Keyring.from_file(cfg.registry_credentials)
    return registry.Client(insecure=cfg.insecure_registries, keyring=keyring)


def cmd_pull(cfg, args: list[str]) -> int:
    opts, rest = getopt.getopt(args, "p:")
    if len(rest) != 1:
        raise UsageError()
    from pufflet.images import reference
    store = _store(cfg)
    client = _client(cfg)
    try:
        repo = client.repository(rest[0])
        res = repo.resolve(_platform(dict(opts)))
        for d in res.blobs:
            if store.has_blob(d.digest):
                continue
            fd, have = store.open_blob(d.digest, d.size)
            try:
                repo.fetch_blob(d, fd, have)
            finally:
                os.close(fd)
            store.commit_blob(d.digest, d.size)
        ref = reference.parse(rest[0])
        img = store.put_manifest(str(ref), res.manifest, res.media_type)
    finally:
        client.close()
    print(f"{', '.join(img.names)} {img.digest}")
    return 0


def cmd_push(cfg, args: list[str]) -> int:
    if len(args) not in (1, 2):
        raise UsageError()
    store = _store(cfg)
    src = store.source(args[0])
    client = _client(cfg)
    try:
        digest = client.repository(args[-1], push=True).push(src)
    finally:
        client.close()
    print(f"{args[-1]} {digest}")
    return 0


COMMANDS = {"list": cmd_list, "ls": cmd_list, "rm": cmd_rm, "tag": cmd_tag,
            "import": cmd_import, "build": cmd_build, "pull": cmd_pull, "push": cmd_push}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts, rest = getopt.getopt(args, "f:")
        if len(rest) < 2 or rest[0] != "image" or rest[1] not in COMMANDS:
            raise UsageError()
        path = dict(opts).get("-f", DEFAULT_CONFIG)
        if os.geteuid() != 0:
            print("puffletctl: need root privileges", file=sys.stderr)
            return 1
        try:
            cfg = config.load(path)
        except config.ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        return COMMANDS[rest[1]](cfg, rest[2:])
    except (UsageError, getopt.GetoptError) as e:
        if str(e):
            print(f"puffletctl: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 1
    except Exception as e:
        # Errors from the store, the archive or the registry are for the
        # admin to read, not tracebacks.
        from pufflet.images import reference
        known = (ImageError, OSError, reference.ReferenceError)
        try:
            from pufflet.images import registry
            known += (registry.RegistryError,)
        except ImportError:
            pass
        if not isinstance(e, known):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename \
            else f"{e.filename}: {e.strerror}"
        print(f"puffletctl: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
