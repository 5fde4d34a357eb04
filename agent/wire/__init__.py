"""The agent-to-agent wire protocol without I/O: Noise handshake, sealed frames, typed messages."""
