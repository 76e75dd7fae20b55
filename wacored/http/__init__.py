"""What faces the network: the webhook (ingress and its admission bounds), /health and /metrics, the
admin API, the listening socket and the server's TLS checks."""
