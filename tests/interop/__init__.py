"""Interop tests: real pusher-js / Node and Python SDKs against a real Bastion."""
