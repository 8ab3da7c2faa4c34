"""Measurements that feed the planner and check its predictions.

* ``probe``: the largest micro-batch that fits a device and its samples/s, written as the probe
  file that a cluster description's ``samples_per_s`` reads (``hetlm probe``);
* ``net``: all-reduce bus bandwidth between the ranks of a job (``hetlm bench net``);
* ``storage``: filesystem and data-loader rates (``hetlm bench io``, ``hetlm bench data``);
* ``cgroups`` / ``netns``: slower, smaller and farther-apart "nodes" on one Linux machine, for the
  emulated heterogeneous cluster benchmark (``benchmarks/emulated_cluster.py``).

Heavy imports (torch, transformers) stay inside functions, as everywhere in hetlm.
"""
