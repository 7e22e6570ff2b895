"""tdro: group-robust learning across heterogeneous feature spaces.

The top-level import stays light (no torchvision); import submodules for the parts you need:
``tdro.config``, ``tdro.data``, ``tdro.models``, ``tdro.objectives``, ``tdro.training``, ``tdro.runs``.
"""
__version__ = "0.1.0"
