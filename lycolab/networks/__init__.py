"""LyCORIS adapters (every algorithm in ``lycolab.networks.algorithms``) with kohya/LyCORIS file names, so files load
in every common tool."""

from lycolab.networks.io import AdapterFileError, load_network, read_adapter_file
from lycolab.networks.network import AdapterNetwork, create_network
from lycolab.networks.registry import Algorithm, get_algorithm

# registry.algorithms() is not re-exported: the name would shadow the subpackage lycolab.networks.algorithms.
__all__ = ["AdapterFileError", "AdapterNetwork", "Algorithm", "create_network", "get_algorithm", "load_network",
           "read_adapter_file"]
