"""What training reads: the batch order and stream (batches.py) over a patch source — raw HDF5 files
(hdf5_source.py) or a patch store (store.py, zarr_arrays.py), both through row files and the patch cache — and
the inputs one run uses (run_inputs.py)."""
