"""The multi-node test bed itself: namespaces with their own addresses, a switch between
them, a cut cable, an emulated slow and lossy link, a node killed whole, and nothing left
behind."""

import socket
import subprocess
import sys
import time

import pytest

from resilient_ep.netbed import NetBed, NetBedError, cleanup_stale, netbed_available
from resilient_ep.netbed.namespaces import NETNS_DIR

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netbed_available() is not None,
                                 reason=f"network test bed: {netbed_available()}")]

ECHO = ("import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], 9000)); s.listen(); print('up', flush=True)\n"
        "while True:\n"
        "    c,_=s.accept()\n"
        "    while (d:=c.recv(65536)): c.sendall(d)\n")


def _echo_server(bed, node):
    p = bed.popen(node, [sys.executable, "-c", ECHO, bed.address(node)],
                  stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    return p


def _round_trips(addr, n=5, timeout=3.0):
    """Seconds per echo of 100 bytes, n times."""
    out = []
    with socket.create_connection((addr, 9000), timeout=timeout) as s:
        for _ in range(n):
            t = time.monotonic()
            s.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += s.recv(100 - len(got))
            out.append(time.monotonic() - t)
    return out


def test_nodes_reach_each_other_and_not_the_host(tmp_path):
    with NetBed(3) as bed:
        assert bed.addresses == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        assert all((NETNS_DIR / n).exists() for n in (*bed.names, bed.switch))
        server = _echo_server(bed, 2)
        with bed.entered(0):
            assert len(_round_trips(bed.address(2))) == 5
            with pytest.raises(OSError):  # the host's loopback is not this node's
                socket.create_connection(("10.213.0.3", 1), timeout=1)
        # back home: the node's server is not reachable from the host (a connect may still
        # succeed here: some sandboxes proxy every outgoing connection; no echo comes back)
        with pytest.raises(OSError):
            _round_trips(bed.address(2), n=1, timeout=0.5)
        assert server.pid in bed.pids(2)
        killed = bed.kill_node(2)
        assert server.pid in killed
        assert server.wait(5) == -9
        names = [*bed.names, bed.switch]
    assert not any((NETNS_DIR / n).exists() for n in names), "namespaces removed"


def test_cut_cable_drops_silently_and_mends():
    with NetBed(2) as bed:
        server = _echo_server(bed, 1)
        with bed.entered(0):
            s = socket.create_connection((bed.address(1), 9000), timeout=3)
            bed.set_link(1, up=False)
            s.settimeout(0.5)
            s.sendall(b"ping")
            with pytest.raises(socket.timeout):
                s.recv(4)  # nothing comes back, and no error either: silence
            bed.set_link(1, up=True)
            s.settimeout(10)
            assert s.recv(4) == b"ping"  # TCP retransmits once the cable is back
            s.close()
        server.kill()


def test_emulated_link_delays_and_loses():
    with NetBed(2, link="emulated", seed=7) as bed:
        server = _echo_server(bed, 1)
        with bed.entered(0):
            base = min(_round_trips(bed.address(1)))
            bed.impair(0, delay_ms=15)
            bed.impair(1, delay_ms=15)
            slow = min(_round_trips(bed.address(1)))
            assert slow >= 0.030 > base  # an injected delay: at least 2 x 15 ms per echo
            bed.impair(0, delay_ms=0, loss=1.0)
            with pytest.raises(OSError):
                _round_trips(bed.address(1), timeout=0.5)
            assert bed.counters()["dropped_loss"] > 0
            bed.impair(0, loss=0.0)
            bed.set_link(1, up=False)
            with pytest.raises(OSError):
                _round_trips(bed.address(1), timeout=0.5)
            assert bed.counters()["dropped_down"] > 0
        with pytest.raises(NetBedError, match="loss must be in"):
            bed.impair(0, loss=2)
        server.kill()


def test_a_bed_of_a_killed_run_is_cleaned_up():
    # A bed made by another process that is then SIGKILLed stays behind until cleanup_stale.
    code = ("from resilient_ep.netbed import NetBed; import os, signal; b = NetBed(2).start(); "
            "print(' '.join(b.names), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    names = out.stdout.split()
    assert names and all((NETNS_DIR / n).exists() for n in names)
    removed = cleanup_stale()
    assert set(names) <= set(removed)
    assert not any((NETNS_DIR / n).exists() for n in names)
