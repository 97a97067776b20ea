"""NATS's own security model for gatefleet: nkeys, JWTs, `.creds` files and TLS material.

`jwt` encodes and reads NATS JWTs, `permissions` says what each kind of user may do,
`authority` keeps the operator, accounts and issued users under `[bus] data_dir`, and
`tls` makes a CA and a server certificate for a non-loopback embedded server.
"""
