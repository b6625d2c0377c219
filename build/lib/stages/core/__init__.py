"""What every stage shares: `artifacts` (HDF5 files that describe themselves, written atomically, weights as
datasets, schema checks) and `options` (the CLI flags two or more stages declare, and the help panels)."""
