"""Image references: "name[:tag][@digest]" with Docker's normalisation.

The grammar is the one of distribution's reference package
(github.com/distribution/reference):

    reference      := name [ ":" tag ] [ "@" digest ]
    name           := [domain "/"] remote-name
    domain         := host [ ":" port ]
    remote-name    := path-component [ "/" path-component ]*
    path-component := [a-z0-9]+ ( separator [a-z0-9]+ )*
    separator      := "." | "_" | "__" | "-"+
    tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest         := "sha256:" 64 lowercase hex digits

Normalisation follows Docker: a first component without "." or ":" that is
not "localhost" is part of the repository on docker.io; a single component
on docker.io gets "library/"; "index.docker.io" is "docker.io"; a reference
without tag or digest means ":latest".  Repository names must be lowercase
(Docker refuses rather than folds them, so two spellings never name one
image).
"""

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
LEGACY_REGISTRIES = ("index.docker.io", "registry-1.docker.io")
DEFAULT_TAG = "latest"
MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ReferenceError(ValueError):
    pass


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """"registry/repository", the part a tag or digest hangs off."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += ":" + self.tag
        if self.digest is not None:
            s += "@" + self.digest
        return s

    def familiar(self) -> str:
        """The short form docker prints: "alpine:3" for docker.io/library/alpine:3."""
        s = str(self)
        if self.registry == DEFAULT_REGISTRY:
            s = s[len(DEFAULT_REGISTRY) + 1:]
            if s.startswith("library/") and "/" not in self.repository[8:]:
                s = s[8:]
        return s


def parse(ref: str) -> Reference:
    """Parse and normalise a reference; ReferenceError says what is wrong."""
    if not isinstance(ref, str) or not ref:
        raise ReferenceError("empty image reference")
    if len(ref) > 4 * MAX_NAME:
        raise ReferenceError("image reference too long")
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ReferenceError(f"{ref!r}: invalid digest (want sha256: and 64 lowercase hex digits)")
    tag = None
    # A ":" after the last "/" starts the tag; one before it is a port.
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(f"{ref!r}: invalid tag {tag!r}")
    if not rest:
        raise ReferenceError(f"{ref!r}: no repository name")
    registry, repository = _split_domain(rest)
    if not _DOMAIN.fullmatch(registry):
        raise ReferenceError(f"{ref!r}: invalid registry {registry!r}")
    if registry in LEGACY_REGISTRIES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = "library/" + repository
    if repository != repository.lower() and _all_valid(repository.lower()):
        raise ReferenceError(f"{ref!r}: repository name must be lowercase")
    if not _all_valid(repository):
        raise ReferenceError(f"{ref!r}: invalid repository name {repository!r}")
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise ReferenceError(f"{ref!r}: repository name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"
                   and first == first.lower()):
        return DEFAULT_REGISTRY, name
    return first, remainder


def _all_valid(repository: str) -> bool:
    return all(_COMPONENT.fullmatch(c) for c in repository.split("/"))
