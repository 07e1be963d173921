"""Loading: the model source parsed once (source.py), presets, the loader that builds and fills a
model (loader.py) and the on-load quantisation policy (quantize.py)."""
