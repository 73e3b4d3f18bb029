"""Transports: dispatch/combine and control messages between ranks.

- :mod:`.wire`: the message format of every socket (a versioned msgpack header plus raw
  tensor frames, zero-copy, validated before use; no pickle).
- :mod:`.zmq_transport`: ZeroMQ over ``ipc://`` or ``tcp://127.0.0.1`` (CPU, any machine).
- :mod:`.dispatch`: the fault-tolerant request/response dispatch/combine of one rank's MoE
  layers, over any transport with ``send``.
- :mod:`.reference`: the plain-torch single-process dispatch/combine, the correctness oracle.
"""
