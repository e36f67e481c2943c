"""OCI images: names, manifests and configs.

Shared by both halves of pufflet: the agent's registry client and the
parent's image store.  Pure parsing and validation only; no network code
and no file system writes live here.
"""
