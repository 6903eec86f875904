# Minimal stubs for the parts of scikit-learn that examples/ use.
