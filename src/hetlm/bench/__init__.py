"""Measurements that check the planner's predictions (``hetlm probe``, which feeds the planner,
is :mod:`hetlm.probe`).

* ``net``: all-reduce bus bandwidth between the ranks of a job (``hetlm bench net``);
* ``storage``: filesystem and data-loader rates (``hetlm bench io``, ``hetlm bench data``);

Heavy imports (torch, transformers) stay inside functions, as everywhere in hetlm.
"""
