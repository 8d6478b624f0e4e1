"""fxquant.passes: one module per pass; each module docstring states the pass contract."""
