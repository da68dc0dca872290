"""Raw downloads -> prepared volumes (CHAOS MRI, Synapse/BTCV CT): geometry, intensities, manifest."""
