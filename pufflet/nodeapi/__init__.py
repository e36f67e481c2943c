"""The node API's streaming protocols: SPDY/3.1 and the Kubernetes
WebSocket channel protocols, shared by exec, attach and port-forward."""
