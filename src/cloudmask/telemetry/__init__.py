"""What a run measures about itself: phase timers, energy windows over NVML and RAPL sources, and the
provenance in manifest.json."""
