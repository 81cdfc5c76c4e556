"""lycolab: train LyCORIS adapters (LoRA, LoCon, LoHa, LoKr) for Stable Diffusion 1.x/2.x from notebooks or the CLI."""

# the installed distribution's version is the one that counts (``lycolab --version`` asks importlib.metadata); this
# copy, kept equal to pyproject.toml's, serves a source tree that is not installed

__version__ = "0.1.0"
