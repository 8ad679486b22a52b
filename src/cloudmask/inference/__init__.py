"""Test inference and scoring: test patches -> predictions -> stitched masks -> per-file accuracy."""
