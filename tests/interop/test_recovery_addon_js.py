"""The recovery add-on's own logic under Node, against a stand-in Pusher instance.

What it sends in each ``pusher:subscribe`` as the frames it reads go by: no
position at first, then the last ``bastion_position`` with the socket it arrived
on, the position a ``bastion:recovery`` gives, the old one kept when an answer
has none, nothing after an unsubscribe; the rest of the subscribe untouched; one
listener per transport however often it connects. The real pusher-js runs it in
test_pusherjs_recovery*.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from support.timeouts import scaled

ADDON = Path(__file__).resolve().parents[2] / "clients" / "js" / "bastion-recovery.js"

SCRIPT = """
const { withRecovery } = require(process.argv[1]);
const sent = [];
const listeners = [];
const connected = [];
const transport = (name) => ({ bind: (event, fn) => listeners.push([name, event, fn]) });
const pusher = {
  send_event(name, data, channel) { sent.push({ name, data, channel }); return true; },
  connection: {
    socket_id: '1.1',
    connection: { transport: transport('first') },
    bind(event, fn) { if (event === 'connected') connected.push(fn); },
  },
};
const frame = (value) => listeners.forEach(([, event, fn]) => {
  if (event === 'message') fn({ data: JSON.stringify(value) });
});
const recovery = (answer) => frame(
  { event: 'bastion:recovery', channel: 'chat', data: JSON.stringify(answer) });
withRecovery(pusher);
withRecovery(pusher);  // once only
pusher.send_event('pusher:subscribe', { channel: 'chat' });
frame({ event: 'm', channel: 'chat', data: 'x', bastion_position: 'e:5' });
frame({ event: 'm', channel: 'other', data: 'not json: ignored' });
frame('not even an object');
pusher.connection.socket_id = '2.2';
pusher.send_event('pusher:subscribe', { channel: 'chat', auth: 'k:sig', channel_data: '{}' });
recovery({ recovered: false, reason: 'unavailable' });
pusher.send_event('pusher:subscribe', { channel: 'chat' });
recovery({ recovered: false, reason: 'epoch_changed', position: 'f:9' });
pusher.send_event('pusher:subscribe', { channel: 'chat' });
pusher.send_event('pusher:unsubscribe', { channel: 'chat' });
pusher.send_event('pusher:subscribe', { channel: 'chat' });
pusher.send_event('client-typing', { x: 1 }, 'private-chat');
pusher.connection.connection = { transport: transport('second') };
connected.forEach((fn) => fn());
connected.forEach((fn) => fn());
process.stdout.write(JSON.stringify({ sent, listeners: listeners.map(([n, e]) => [n, e]) }));
"""


def run(node_bin: str) -> dict[str, Any]:
    result = subprocess.run(
        [node_bin, "-e", SCRIPT, str(ADDON)],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_the_add_on_sends_the_position_it_holds(node_bin: str) -> None:
    found = run(node_bin)
    resumes = [
        item["data"].get("bastion_resume")
        for item in found["sent"]
        if item["name"] == "pusher:subscribe"
    ]
    assert resumes == [
        {},  # nothing held yet
        {"position": "e:5", "socket_id": "1.1"},  # where it arrived
        {"position": "e:5", "socket_id": "1.1"},  # an answer without a position keeps it
        {"position": "f:9", "socket_id": "2.2"},  # the answer's position, on this socket
        {},  # forgotten on unsubscribe
    ]
    second = found["sent"][1]["data"]
    assert {key: second[key] for key in ("channel", "auth", "channel_data")} == {
        "channel": "chat",
        "auth": "k:sig",
        "channel_data": "{}",
    }
    typing = found["sent"][-1]
    assert typing == {"name": "client-typing", "data": {"x": 1}, "channel": "private-chat"}
    # One listener per transport, however many times it connects.
    assert found["listeners"] == [["first", "message"], ["second", "message"]]
