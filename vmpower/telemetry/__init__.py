"""Telemetry: signals and controls served to local clients through shared memory.

The daemon's ``BatchService`` (``service``) starts one batch server (``server``) per
client session; the two share value buffers (``shm``) and a controller/worker channel
(``channel``). Names, domains and rights are ``catalog`` and ``access``; readers and
the frequency controls are ``sources``; clients use ``BatchClient`` (``client``) or the
``vmpower signals|read|write|session`` commands (``cli``).
"""

from vmpower.telemetry.catalog import CATALOG, Request, SignalInfo
from vmpower.telemetry.client import BatchClient

__all__ = ["CATALOG", "BatchClient", "Request", "SignalInfo"]
