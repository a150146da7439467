"""Shared test support for Bastion: time-out scaling, a real server process, clients.

Import as ``from support.server import run_bastion`` (``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there and ``tests/`` is not a package).
"""
