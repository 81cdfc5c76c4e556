"""LyCORIS adapters (every algorithm in ``lycolab.networks.algorithms``) with kohya/LyCORIS file names, so files load
in every common tool."""

from lycolab.networks.io import AdapterFileError, load_network, read_adapter_file
from lycolab.networks.network import AdapterNetwork, create_network
from lycolab.networks.registry import Algorithm, algorithms, get_algorithm

__all__ = ["AdapterFileError", "AdapterNetwork", "Algorithm", "algorithms", "create_network", "get_algorithm",
           "load_network", "read_adapter_file"]
