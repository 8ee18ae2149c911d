"""The work behind CLI commands that only read an intent (no kernel, no state)."""
