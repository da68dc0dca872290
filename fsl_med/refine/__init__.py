"""Test-time refinement of predictions: connected-component post-processing (CCA) and test-time training (TTT)."""
