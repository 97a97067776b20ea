"""gatefleet's message vocabulary: msgspec Structs for the wire, events and settings.

No I/O here and no imports from the packages above (bus, actors, gatefleet).
"""
