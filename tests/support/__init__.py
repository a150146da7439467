"""Shared test support for Bastion.

* ``timeouts`` — the one time-out scale (``scaled``) and the waits on it (``within``,
  ``until``);
* ``clients`` — the Pusher test client (``PusherClient``), the raw frame-level socket
  (``RawWebSocket``) and the signed REST/HTTP callers;
* ``signing`` — Pusher signatures computed from the spec;
* ``server`` — a real ``bastion serve`` process; ``hubs`` — hubs without sockets;
  ``redis_server``, ``webhook_receiver``, ``pki``, ``hygiene``; ``proxy`` — a TCP proxy a
  test pauses, resets and points elsewhere (clients that reconnect by themselves).

Import as ``from support.server import run_bastion`` (``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there and ``tests/`` is not a package).
"""
