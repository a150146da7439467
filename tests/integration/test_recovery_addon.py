"""The pusher-js recovery add-on as a real ``bastion serve`` serves it.

The served file is the npm package's file, byte for byte (clients/js/), with a
script content type and cache headers; its behaviour with the real pusher-js is
in tests/interop/test_pusherjs_recovery.py.
"""

from __future__ import annotations

from pathlib import Path

from support.clients import http_request
from support.server import BastionProcess

ROOT = Path(__file__).resolve().parents[2]


async def test_the_add_on_is_served_as_a_cacheable_script(bastion: BastionProcess) -> None:
    served = await http_request(bastion.port, "GET", "/bastion/recovery.js")
    assert served.status == 200
    assert served.headers["content-type"] == "text/javascript; charset=utf-8"
    assert served.headers["cache-control"] == "public, max-age=3600"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.body == (ROOT / "clients" / "js" / "bastion-recovery.js").read_bytes()
    head = await http_request(bastion.port, "HEAD", "/bastion/recovery.js")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(served.body))
    post = await http_request(bastion.port, "POST", "/bastion/recovery.js")
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
