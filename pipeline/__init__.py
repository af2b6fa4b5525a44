"""resflow: restore large image datasets with residual networks on Ray.

The library has no Prefect import anywhere (flows/ wraps it); see ../DESIGN.md.
"""

__version__ = "0.1.0"
