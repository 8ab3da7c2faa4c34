"""Emulated nodes on one Linux machine, for the benchmarks only (needs root).

* ``cgroups``: slower and smaller "nodes" (own cores, a CPU quota, a memory cap);
* ``netns``: farther-apart ones (network namespaces joined by a rate-limited veth pair).

The benchmark scripts run as ``python benchmarks/NAME.py``, so ``benchmarks/`` is on
``sys.path`` and they import ``from emulation import cgroups``.
"""
