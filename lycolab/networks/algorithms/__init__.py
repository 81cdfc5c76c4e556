"""One file per adapter algorithm; each defines ``ALGORITHM`` (see ``lycolab.networks.registry``)."""
