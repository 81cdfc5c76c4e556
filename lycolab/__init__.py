"""lycolab: train LyCORIS adapters (LoRA, LoCon, LoHa) for Stable Diffusion 1.x/2.x from notebooks or the CLI."""

__version__ = "0.1.0"
