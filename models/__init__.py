"""servegrid's Triton model repository: model recipes, config rendering and the Python-backend model files."""
