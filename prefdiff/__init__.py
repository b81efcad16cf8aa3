"""prefdiff: preference alignment (D3PO, Diffusion-DPO) for text-to-image diffusion models.

The package is a library: importing it (or any submodule) has no side effects and no CLI.
Stages in ``stages/`` and flows in ``flows/`` are the entry points.
"""

__version__ = "0.1.0"
