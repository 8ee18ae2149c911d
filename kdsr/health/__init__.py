"""Health monitoring: probes that follow the DSR path, the rise/fall state of
each server, and the ``kdsr run`` daemon that applies the difference."""
