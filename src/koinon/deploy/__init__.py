"""Real deployment: `koinon certs`, `koinon server` and `koinon client` over gRPC with mutual TLS.

`certs` makes the credentials, `wire` frames payloads into size-checked chunks, `store` keeps
the server's durable state (SQLite + safetensors), `server` and `client` run the rounds with the
simulation's own components (see `koinon.topology.federated.Federation`).
"""
