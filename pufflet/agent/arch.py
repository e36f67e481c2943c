"""Machine names as uname(3) gives them → Go's GOARCH, which is what the
kubernetes.io/arch label holds and what images are published for."""

_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "armv7": "arm", "armv7l": "arm", "arm": "arm",
    "riscv64": "riscv64",
    "ppc64le": "ppc64le",
    "powerpc64": "ppc64",
    "s390x": "s390x",
    "mips64": "mips64",
    # OpenBSD names some ports after the machine, not the CPU: octeon is
    # big-endian MIPS64, loongson little-endian.
    "octeon": "mips64",
    "loongson": "mips64le",
    # Go has no sparc64 port; the name is kept so the node says what it is.
    "sparc64": "sparc64",
}


def goarch(machine: str) -> str:
    """GOARCH for a uname machine; unknown names are passed through."""
    return _GOARCH.get(machine, machine)
