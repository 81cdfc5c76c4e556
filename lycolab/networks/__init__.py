"""LyCORIS adapters (LoRA, LoCon, LoHa) with kohya/LyCORIS file names, so files load in every common tool."""

from lycolab.networks.io import AdapterFileError, load_network, read_adapter_file
from lycolab.networks.network import ALGORITHM_MODULES, AdapterNetwork, create_network

__all__ = ["ALGORITHM_MODULES", "AdapterFileError", "AdapterNetwork", "create_network", "load_network",
           "read_adapter_file"]
