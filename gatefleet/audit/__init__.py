"""`gatefleet audit`: reading, filtering, explaining and folding the event stream.

- `command`: the click commands (wiring);
- `stream`: reading a JetStream stream with an ordered consumer (a NATS client of its own);
- `read`: connection, replay with progress on stderr, decoding that counts what it skips;
- `filter`: event filters and time parsing;
- `render`: tables and lines;
- `state`: the fleet's state at a moment, folded from events.
"""

from gatefleet.audit.command import audit

__all__ = ["audit"]
