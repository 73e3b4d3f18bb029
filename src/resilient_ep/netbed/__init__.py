"""A network test bed on one machine: several "nodes", each a Linux network namespace with
an address of its own, joined by a switch; links that can be taken down, delayed and made
lossy. What the multi-node tests and benchmarks run on (root only; traffic never leaves the
namespaces, the host's own network is not touched).

- :mod:`.namespaces`: :class:`NetBed` (make and remove the namespaces, run a process on a
  node, kill every process of a node, take a link down or up, impair it, enter a node from a
  thread of this process);
- :mod:`.linkemu`: the userspace link emulator behind ``link="emulated"`` beds (delay and
  loss per node, as ``tc netem`` would; this machine's kernel has no ``sch_netem``).

``python -m resilient_ep.netbed`` (``ci/netns.sh``) makes a bed by hand and removes beds
left behind by a killed run.
"""

from .namespaces import NetBed, NetBedError, cleanup_stale, netbed_available

__all__ = ["NetBed", "NetBedError", "cleanup_stale", "netbed_available"]
