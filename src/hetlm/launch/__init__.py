"""Starting training processes.

- ``local``: ``--local-nodes N`` here: N torchrun agents on 127.0.0.1 (static rendezvous with
  whole-job restarts, or elastic on the c10d rendezvous with kill/rejoin: ``ElasticLocalJob``).
- ``output``: what the agents print, filtered to hetlm's own lines and tracebacks.
- ``scripts``: the torchrun lines and the Slurm batch script that ``hetlm plan`` writes for a
  real cluster.
"""
