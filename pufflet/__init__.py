"""pufflet: a Kubernetes node for OpenBSD."""

__version__ = "0.1.0"
