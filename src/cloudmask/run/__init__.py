"""One run: the modes (modes.py) over one session (session.py) that opens the run directory and its state,
runs every phase, and records results.json, the MLPerf log and the reference's text lines; signals; the
throughput mode."""
