"""resflow: restore large image datasets with residual networks on Ray.

The library: no Prefect import anywhere (flows/ wraps it), no dev services (local/);
see docs/architecture.md.
"""

__version__ = "0.1.0"
