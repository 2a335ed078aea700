"""The lab: a Kubernetes node's DNS path in network namespaces, with fault injection (see docs/lab.md).

    from tests.lab import Lab
    with Lab.up() as lab:
        lab.fault("table-full", 100)
        ...
"""

from tests.lab.faults import NAMES as FAULTS
from tests.lab.faults import FaultError
from tests.lab.topology import Backend, Lab, cleanup, missing_binaries

__all__ = ["FAULTS", "Backend", "FaultError", "Lab", "cleanup", "missing_binaries"]
