"""The adapter algorithms, each described once, and read by everything that needs to know them.

Every module of ``lycolab.networks.algorithms`` that defines ``ALGORITHM`` (an :class:`Algorithm`) is one algorithm:
its name and aliases, the parameter names that identify it in a file, its module class (math and fast paths) and,
through that class, a typed options dataclass. ``create_network``, ``load_network``, config validation, metadata,
the notebook's choices and the CLI all read this table, so adding an algorithm is adding one file there.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AdapterOptions:
    """Options LyCORIS passes to every module, whatever the algorithm (``network_args`` keys, same names).

    ``dropout`` / ``rank_dropout`` / ``module_dropout`` act in training mode only; ``rank_dropout_scale`` rescales
    kept ranks/rows by the kept fraction; ``bypass_mode`` asks LyCORIS to run ΔW·x beside the frozen layer instead of
    merging — lycolab already picks the cheapest exact form per call, so it changes no result and is accepted as is.
    """

    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    bypass_mode: bool = False


@dataclass(frozen=True)
class Algorithm:
    """One adapter algorithm as files, configs and the notebook know it."""

    name: str  # the ``algo`` LyCORIS writes in ``ss_network_args`` ("loha")
    title: str  # what people call it ("LoHa"), for tables and model cards
    module_class: type  # an AdapterModule subclass; its ``options_class`` holds the typed options
    markers: tuple[str, ...]  # parameter names (after the module name) that only this algorithm's modules hold
    aliases: tuple[str, ...] = ()  # other ``algo`` spellings that mean this algorithm ("locon" for lora)
    category: str = ""  # the notebook's network_category for it under lycoris.kohya ("" = not offered there)
    category_algo: str = ""  # the ``algo`` that category writes, when not ``name`` (LoCon_Lycoris writes locon)
    recommended_dims: tuple[int, int] = (1, 1024)  # network_dim range the authors recommend (a note outside it)
    recommendation: str = ""  # that recommendation in words, for the note
    uses_dropout: bool = True  # whether ``dropout`` acts (LyCORIS ignores it for LoHa/LoKr)
    adapts_conv: bool = True  # whether kxk convs get an adapter (conv_dim) as well as Linear layers
    menu_order: int = 100  # position among the notebook's choices
    # When markers are shared (diag-OFT and BOFT both hold ``oft_blocks``): whether a module's tensors are this one's
    accepts: Callable[[dict[str, torch.Tensor]], bool] | None = None

    @property
    def options_class(self) -> type[AdapterOptions]:
        return self.module_class.options_class

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(self.options_class))


class UnknownAlgorithm(ValueError):
    """An ``algo`` no registered algorithm answers to; the message lists the known ones."""


@functools.cache
def algorithms() -> dict[str, Algorithm]:
    """Every registered algorithm by name, in menu order (found by importing ``lycolab.networks.algorithms``)."""
    package = importlib.import_module("lycolab.networks.algorithms")
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        algorithm = getattr(module, "ALGORITHM", None)
        if isinstance(algorithm, Algorithm):
            found.append(algorithm)
    found.sort(key=lambda algorithm: (algorithm.menu_order, algorithm.name))
    return {algorithm.name: algorithm for algorithm in found}


def algorithm_names() -> tuple[str, ...]:
    """Every ``algo`` spelling accepted, names and aliases."""
    return tuple(name for algorithm in algorithms().values() for name in algorithm.names)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm ``name`` (or an alias) means, case-insensitively; raises :class:`UnknownAlgorithm`."""
    wanted = str(name).strip().lower()
    for algorithm in algorithms().values():
        if wanted in algorithm.names:
            return algorithm
    raise UnknownAlgorithm(f"unknown algo {name!r}; choose one of {', '.join(algorithm_names())}")


def algorithm_of_module(parameters: dict[str, torch.Tensor]) -> Algorithm | None:
    """The algorithm whose markers a file's module holds (``{"hada_w1_a": ..., "alpha": ...}`` → LoHa)."""
    for algorithm in algorithms().values():
        if any(marker in parameters for marker in algorithm.markers) and (
                algorithm.accepts is None or algorithm.accepts(parameters)):
            return algorithm
    return None


def option_types(options_class: type[AdapterOptions]) -> dict[str, type]:
    """Each option's name → its type (bool, int, float or str), from the dataclass annotations."""
    hints = typing.get_type_hints(options_class)
    return {field.name: hints[field.name] for field in dataclasses.fields(options_class)}


def make_options(options_class: type[AdapterOptions], options: AdapterOptions | None = None, **values: Any
                 ) -> AdapterOptions:
    """``options`` (or the defaults) with ``values`` replacing fields; an unknown name is a TypeError naming it."""
    base = options if options is not None else options_class()
    unknown = sorted(set(values) - set(option_types(type(base))))
    if unknown:
        known = ", ".join(option_types(type(base)))
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for {options_class.__name__}; known: {known}")
    return dataclasses.replace(base, **values) if values else base


def changed_options(options: AdapterOptions) -> dict[str, Any]:
    """The options that differ from their defaults, for ``ss_network_args`` (so files stay as short as LyCORIS')."""
    defaults = type(options)()
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)
            if getattr(options, field.name) != getattr(defaults, field.name)}
