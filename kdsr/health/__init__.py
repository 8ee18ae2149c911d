"""Health monitoring: probes that follow the DSR path, the rise/fall state of
each server, and the ``kdsr run`` daemon that applies the difference."""

# Default seconds between `kdsr run`'s drift checks (--check-interval); here,
# not in daemon.py, so that the CLI can show it without importing the daemon.
CHECK_INTERVAL = 30.0
