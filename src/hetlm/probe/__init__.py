"""``hetlm probe``: measurements of the real training step that feed the planner.

* ``probe``: the largest micro-batch that fits a device and its samples/s, written as the probe
  file that a cluster description's ``samples_per_s`` reads;
* ``worker``: one rank's training step at a given micro-batch, measured (peak memory, step
  time), run in a subprocess on a CPU (``python -m hetlm.probe.worker``);
* ``sysinfo``: the CPU, its quota and the memory limits (cgroups, RAM) the probe works within.

The worker runs hetlm's own step (models, optimizer from :mod:`hetlm.train`), so this package
sits above ``train`` and ``cluster``: the planner in :mod:`hetlm.cluster` reads the probe file,
never this code. Heavy imports (torch, transformers) stay inside functions.
"""
