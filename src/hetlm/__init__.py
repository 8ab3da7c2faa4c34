"""hetlm: language models on a lab's own mixed-GPU machines.

Data-parallel training in which every rank has its own micro-batch size while the trained model
stays exactly what one large-batch run would give (see docs/DESIGN.md).
"""

__version__ = "0.1.0"
