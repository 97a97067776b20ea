"""The only package that imports nats: connection, subjects, codec, JetStream, server."""
