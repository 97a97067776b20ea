"""The application: configuration, command line, process wiring, HTTP API."""
