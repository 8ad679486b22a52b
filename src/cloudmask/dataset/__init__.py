"""The dataset on disk and elsewhere: its files and layouts (files.py), checksums, object storage, download,
synthetic data, and the reference's preprocessing (normalisation, patches, stitching)."""
