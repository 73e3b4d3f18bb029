"""Liveness: who of an instance's ranks is alive, decided in one place.

- :mod:`.beacons`: the one wire format of liveness traffic (a rank's "I am alive" beacon, a
  group's "I lost rank r" report) and the threads that send it;
- :mod:`.tracker`: :class:`~.tracker.LivenessTracker`, the decisions of an instance's
  membership authority with no thread and no socket (the reference runtime's coordinator
  feeds one from its own loop);
- :mod:`.monitor`: :class:`~.monitor.LivenessMonitor`, the membership authority of an
  instance as a thread (vLLM's front end and launcher): it watches the rank processes (sentinels), their beacons and the loss reports,
  fences what it must, and records every change in the instance's
  :class:`~resilient_ep.membership.Membership`; it can publish each change to other
  processes of the instance (:class:`~.monitor.MembershipSubscriber`), so every front end of
  one instance sees the same epochs;
- :mod:`.detector`: the failure detector (crash and hang bookkeeping, no I/O), which the
  monitor and every :class:`~resilient_ep.transport.group.LiveGroup` run.
"""

from .beacons import Beacon, LossReporter, parse_beacon
from .monitor import LivenessMonitor, MembershipSubscriber
from .tracker import LivenessTracker, RankJoin, RankLoss

__all__ = ["Beacon", "LossReporter", "parse_beacon", "LivenessMonitor", "LivenessTracker",
           "MembershipSubscriber", "RankJoin", "RankLoss"]
