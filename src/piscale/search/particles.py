"""Former home of the step tree and the driver, kept for the modules that
still import from here (``piscale.annotate``, ``piscale.values.collect``,
``piscale.serve.generation``): new code imports ``piscale.search.node``,
``piscale.search.driver`` and ``piscale.search.result``."""

from piscale.search.driver import SEED_RANGE, Driver, SearchUsage
from piscale.search.node import Node, ready, split_steps
from piscale.search.result import Outcome

__all__ = ["SEED_RANGE", "Driver", "Node", "Outcome", "SearchUsage", "ready", "split_steps"]
