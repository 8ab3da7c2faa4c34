"""Measurements that check the planner's predictions (``hetlm probe``, which feeds the planner,
is :mod:`hetlm.probe`).

* ``net``: all-reduce bus bandwidth between the ranks of a job (``hetlm bench net``);
* ``storage``: filesystem and data-loader rates (``hetlm bench io``, ``hetlm bench data``);
* ``cgroups`` / ``netns``: slower, smaller and farther-apart "nodes" on one Linux machine, for the
  emulated heterogeneous cluster benchmark (``benchmarks/emulated_cluster.py``).

Heavy imports (torch, transformers) stay inside functions, as everywhere in hetlm.
"""
