/*! bastion-recovery: pusher-js channels recover the events they missed while
 * disconnected, from a Bastion server with channel history (docs/recovery.md).
 * Apache-2.0. No dependency besides the pusher-js instance it wraps. */
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.BastionRecovery = factory();
})(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  // Wraps a Pusher instance (once) and returns it: every subscribe carries the
  // channel's last position, so after any reconnect the server replays what the
  // channel missed and fires `bastion:recovery` with {recovered, position}.
  function withRecovery(pusher) {
    if (pusher.__bastionRecovery) return pusher;
    pusher.__bastionRecovery = true;
    // channel -> {p: last position, s: id of the connection it was reached on}
    var kept = {};
    var send = pusher.send_event;

    pusher.send_event = function (name, data, channel) {
      if (data && typeof data.channel === 'string') {
        if (name === 'pusher:subscribe') {
          var at = kept[data.channel];
          var resume = at ? { position: at.p, socket_id: at.s } : {};
          data = Object.assign({}, data, { bastion_resume: resume });
        } else if (name === 'pusher:unsubscribe') {
          delete kept[data.channel];
        }
      }
      return send.call(pusher, name, data, channel);
    };

    function keep(channel, position) {
      kept[channel] = { p: position, s: pusher.connection.socket_id };
    }

    // Raw frames: pusher-js decodes only event, channel, data and user_id, so the
    // position is read here, after pusher-js has dispatched the frame.
    function onMessage(message) {
      var frame, answer;
      try {
        frame = JSON.parse(message.data);
      } catch (e) {
        return;
      }
      if (!frame || typeof frame.channel !== 'string') return;
      if (typeof frame.bastion_position === 'string') {
        keep(frame.channel, frame.bastion_position);
      } else if (frame.event === 'bastion:recovery') {
        try {
          answer = JSON.parse(frame.data);
        } catch (e) {
          return;
        }
        // Without a position (history off, or unreadable), the old one stays: the
        // next resume is asked again rather than claiming to have missed nothing.
        if (answer && typeof answer.position === 'string') keep(frame.channel, answer.position);
      }
    }

    var bound = null;
    function watch() {
      var connection = pusher.connection.connection;
      var transport = connection && connection.transport;
      if (transport && transport !== bound) {
        bound = transport;
        transport.bind('message', onMessage);
      }
    }
    pusher.connection.bind('connected', watch);
    watch();
    return pusher;
  }

  return { withRecovery: withRecovery };
});
