"""Integration tests: a real Bastion node, in-process, on 127.0.0.1."""
