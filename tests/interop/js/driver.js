#!/usr/bin/env node
// Drives the REAL pusher-js client and the REAL Node `pusher` server SDK for pytest.
//
// Protocol: one JSON object per line on stdin (commands), one JSON object per line on
// stdout (replies and events). Nothing else is ever written to stdout: console output
// and pusher-js logs go to stderr, so the Python side can parse every stdout line.
//
//   command: {"id": 7, "cmd": "subscribe", "client": "a", "channel": "private-x"}
//   reply:   {"type": "reply", "id": 7, "ok": true, "result": {...}}
//            {"type": "reply", "id": 7, "ok": false, "error": {"name", "message", "status"?, "body"?}}
//   event:   {"type": "event", "kind": "channel"|"bound"|"message"|"state"|"conn_error"|
//             "user"|"watchlist"|"auth", "client": "a", ...}
//
// Authorisation is a real flow without an HTTP endpoint: pusher-js is given
// channelAuthorization/userAuthentication customHandlers that sign with the Node SDK
// (authorizeChannel / authenticateUser), exactly what an app's auth endpoint would do.
//
// The process is bounded: it exits when stdin closes, on {"cmd": "quit"}, or after
// BASTION_DRIVER_MAX_SECONDS (default 300) whatever happens.
'use strict';

const readline = require('readline');

// Keep stdout for the JSON protocol only.
const toStderr = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
console.log = toStderr;
console.info = toStderr;
console.warn = toStderr;
console.debug = toStderr;

const PusherClient = require('pusher-js');
const PusherServer = require('pusher');
// Bastion's recovery add-on, the npm package of this repository (clients/js).
const { withRecovery } = require('../../../clients/js/bastion-recovery.js');

const maxSeconds = Number(process.env.BASTION_DRIVER_MAX_SECONDS || '300');
setTimeout(() => {
  toStderr(`[driver] exceeded BASTION_DRIVER_MAX_SECONDS=${maxSeconds}, exiting`);
  process.exit(3);
}, maxSeconds * 1000).unref();

PusherClient.log = (msg) => {
  if (process.env.BASTION_DRIVER_VERBOSE) toStderr('[pusher-js]', msg);
};

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function emitEvent(kind, client, fields) {
  out(Object.assign({ type: 'event', kind: kind, client: client }, fields));
}

// ------------------------------------------------------------------ configuration

let target = null; // {port, appId, key, secret, masterKeyBase64}
const clients = new Map(); // name -> {pusher, opts}

function requireTarget() {
  if (!target) throw new Error('driver not initialised: send {"cmd":"init"} first');
  return target;
}

function makeSdk(overrides) {
  const t = requireTarget();
  const o = Object.assign({}, overrides || {});
  const opts = {
    appId: o.appId || t.appId,
    key: o.key || t.key,
    secret: o.secret || t.secret,
    host: o.host || '127.0.0.1',
    port: o.port || t.port,
    useTLS: false,
    timeout: o.timeoutMs || t.timeoutMs || 10000,
  };
  const master = o.masterKeyBase64 === undefined ? t.masterKeyBase64 : o.masterKeyBase64;
  if (master) opts.encryptionMasterKeyBase64 = master;
  return new PusherServer(opts);
}

// ------------------------------------------------------------------ serialisation

function membersSnapshot(members) {
  const list = [];
  members.each((m) => list.push({ id: m.id, info: m.info === undefined ? null : m.info }));
  list.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return { count: members.count, me: members.me, myID: members.myID, members: list };
}

function plain(value) {
  // Channel events can carry library objects (Members); make everything JSON-safe.
  if (value && typeof value === 'object' && typeof value.each === 'function' && 'count' in value) {
    return membersSnapshot(value);
  }
  if (value === undefined) return null;
  try {
    return JSON.parse(JSON.stringify(value));
  } catch (e) {
    return String(value);
  }
}

function errorInfo(err) {
  if (err === null || err === undefined) return { name: 'Error', message: String(err) };
  if (typeof err !== 'object') return { name: 'Error', message: String(err) };
  const info = { name: err.name || (err.constructor && err.constructor.name) || 'Error', message: String(err.message || err) };
  if (err.status !== undefined) info.status = err.status;
  if (err.body !== undefined) info.body = err.body;
  if (err.type !== undefined) info.type = err.type;
  return info;
}

async function responseInfo(res) {
  // node-fetch Response from the Node SDK (status < 400; >= 400 becomes RequestError).
  if (!res || typeof res.status !== 'number') return plain(res);
  const text = await res.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch (e) {
    // keep the text
  }
  return { status: res.status, body: body };
}

// ------------------------------------------------------------------ clients

function getClient(name) {
  const c = clients.get(name);
  if (!c) throw new Error(`no client named ${JSON.stringify(name)}`);
  return c;
}

function connectClient(msg) {
  const t = requireTarget();
  const name = msg.client;
  if (clients.has(name)) throw new Error(`client ${name} already exists`);
  // The signer stands in for the app's auth endpoint; it may deliberately use a wrong
  // secret (authSecret) to produce a signature the server must refuse.
  const signer = makeSdk({ secret: msg.authSecret, key: msg.authKey });
  const state = {
    presenceData: msg.presenceData, // {user_id, user_info} or undefined
    userData: msg.userData, // {id, user_info?, watchlist?} or undefined
    omitChannelData: !!msg.omitChannelData,
  };
  const pusher = new PusherClient(msg.key || t.key, {
    cluster: 'x',
    wsHost: '127.0.0.1',
    // A client may go through a proxy (reconnect tests); the SDK talks to the server.
    wsPort: msg.wsPort || t.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    channelAuthorization: {
      customHandler: (params, callback) => {
        const channelName = params.channelName;
        try {
          const isPresence = channelName.indexOf('presence-') === 0;
          const data = isPresence && !state.omitChannelData ? state.presenceData : undefined;
          const authData = signer.authorizeChannel(params.socketId, channelName, data);
          emitEvent('auth', name, { what: 'channel', channel: channelName, socketId: params.socketId,
            hasSharedSecret: !!authData.shared_secret });
          callback(null, authData);
        } catch (e) {
          emitEvent('auth', name, { what: 'channel', channel: channelName, error: errorInfo(e) });
          callback(e, null);
        }
      },
    },
    userAuthentication: {
      customHandler: (params, callback) => {
        try {
          if (!state.userData) throw new Error('no userData configured for this client');
          const authData = signer.authenticateUser(params.socketId, state.userData);
          emitEvent('auth', name, { what: 'user', socketId: params.socketId });
          callback(null, authData);
        } catch (e) {
          emitEvent('auth', name, { what: 'user', error: errorInfo(e) });
          callback(e, null);
        }
      },
    },
  });
  // {recovery: true}: the channels resume after every reconnect (bastion:recovery).
  if (msg.recovery) withRecovery(pusher);
  const entry = { pusher: pusher, state: state };
  clients.set(name, entry);

  pusher.connection.bind('state_change', (s) => {
    emitEvent('state', name, { previous: s.previous, current: s.current,
      socketId: pusher.connection.socket_id || null });
  });
  pusher.connection.bind('error', (err) => {
    emitEvent('conn_error', name, { error: plain(err) });
  });
  pusher.connection.bind('message', (m) => {
    // Raw decoded protocol frames as pusher-js sees them (before channel routing).
    emitEvent('message', name, { event: m.event, channel: m.channel === undefined ? null : m.channel,
      data: plain(m.data), user_id: m.user_id === undefined ? null : m.user_id });
  });
  pusher.user.bind_global((eventName, data) => {
    emitEvent('user', name, { event: eventName, data: plain(data) });
  });
  pusher.user.watchlist.bind_global((eventName, data) => {
    emitEvent('watchlist', name, { event: eventName, data: plain(data) });
  });
  // Resolve the reply once connected (pytest bounds the wait).
  return new Promise((resolve, reject) => {
    if (pusher.connection.state === 'connected') {
      resolve({ socketId: pusher.connection.socket_id });
      return;
    }
    const onChange = (s) => {
      if (s.current === 'connected') {
        pusher.connection.unbind('state_change', onChange);
        resolve({ socketId: pusher.connection.socket_id });
      } else if (s.current === 'failed') {
        pusher.connection.unbind('state_change', onChange);
        reject(new Error('pusher-js connection failed'));
      }
    };
    pusher.connection.bind('state_change', onChange);
  });
}

function subscribe(msg) {
  const c = getClient(msg.client);
  const channel = c.pusher.subscribe(msg.channel);
  if (!channel.__driverBound) {
    channel.__driverBound = true;
    channel.bind_global((eventName, data) => {
      emitEvent('channel', msg.client, { channel: msg.channel, event: eventName, data: plain(data) });
    });
  }
  return {};
}

function bind(msg) {
  const c = getClient(msg.client);
  const channel = c.pusher.channel(msg.channel);
  if (!channel) throw new Error(`client ${msg.client} has no channel ${msg.channel}`);
  channel.bind(msg.event, (data, metadata) => {
    emitEvent('bound', msg.client, { channel: msg.channel, event: msg.event, data: plain(data),
      metadata: metadata === undefined ? null : plain(metadata) });
  });
  return {};
}

function members(msg) {
  const c = getClient(msg.client);
  const channel = c.pusher.channel(msg.channel);
  if (!channel || !channel.members) throw new Error(`client ${msg.client} has no presence channel ${msg.channel}`);
  return membersSnapshot(channel.members);
}

function clientTrigger(msg) {
  const c = getClient(msg.client);
  const channel = c.pusher.channel(msg.channel);
  if (!channel) throw new Error(`client ${msg.client} has no channel ${msg.channel}`);
  return { sent: channel.trigger(msg.event, msg.data) };
}

async function sdkCall(msg) {
  const sdk = makeSdk(msg.sdk || {});
  const fn = sdk[msg.method];
  if (typeof fn !== 'function') throw new Error(`Node SDK has no method ${msg.method}`);
  const result = fn.apply(sdk, msg.args || []);
  if (result && typeof result.then === 'function') {
    return responseInfo(await result);
  }
  return plain(result);
}

async function handle(msg) {
  switch (msg.cmd) {
    case 'init':
      target = { port: msg.port, appId: msg.appId, key: msg.key, secret: msg.secret,
        masterKeyBase64: msg.masterKeyBase64 || null, timeoutMs: msg.timeoutMs || 10000 };
      return { node: process.version,
        pusherJs: require('pusher-js/package.json').version,
        pusher: require('pusher/package.json').version };
    case 'connect':
      return connectClient(msg);
    case 'subscribe':
      return subscribe(msg);
    case 'unsubscribe':
      getClient(msg.client).pusher.unsubscribe(msg.channel);
      return {};
    case 'bind':
      return bind(msg);
    case 'members':
      return members(msg);
    case 'trigger':
      return clientTrigger(msg);
    case 'signin':
      getClient(msg.client).pusher.signin();
      return {};
    case 'user_data':
      return plain(getClient(msg.client).pusher.user.user_data);
    case 'state': {
      const p = getClient(msg.client).pusher;
      return { state: p.connection.state, socketId: p.connection.socket_id || null };
    }
    case 'channel_info': {
      const ch = getClient(msg.client).pusher.channel(msg.channel);
      if (!ch) return null;
      return { subscribed: ch.subscribed, subscriptionPending: ch.subscriptionPending,
        subscriptionCount: ch.subscriptionCount === undefined ? null : ch.subscriptionCount };
    }
    case 'disconnect':
      getClient(msg.client).pusher.disconnect();
      return {};
    case 'sdk':
      return sdkCall(msg);
    case 'ping':
      return { pong: true };
    case 'quit':
      setImmediate(shutdown);
      return {};
    default:
      throw new Error(`unknown command ${JSON.stringify(msg.cmd)}`);
  }
}

function shutdown() {
  for (const c of clients.values()) {
    try {
      c.pusher.disconnect();
    } catch (e) {
      // already gone
    }
  }
  // Give the close frames a moment to leave, then go.
  setTimeout(() => process.exit(0), 100);
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    out({ type: 'reply', id: null, ok: false, error: { name: 'BadCommand', message: 'invalid JSON' } });
    return;
  }
  Promise.resolve()
    .then(() => handle(msg))
    .then(
      (result) => out({ type: 'reply', id: msg.id, ok: true, result: result === undefined ? null : result }),
      (err) => out({ type: 'reply', id: msg.id, ok: false, error: errorInfo(err) })
    );
});
rl.on('close', shutdown);
out({ type: 'ready', pid: process.pid });

// ------------------------------------------------------------------ scenario: JWT mode
// Bastion's JWT mode as a pusher-js app uses it (tests/interop/test_pusherjs_jwt.py):
//
//   {"cmd": "jwt_connect", "client": "a", "token": "<sign-in JWT>", "userData": {"id": "alice"},
//    "channelAuth": {"private-x": {"auth": "<ticket JWT>"}}}
//       a pusher-js client whose userAuthentication.customHandler answers the token
//       (as the app's back end would mint it) and whose channelAuthorization
//       customHandler answers channelAuth[channel], or {auth: ""} (a grant of the
//       sign-in token) for any other channel. `bastion:token_expiring` arrives through
//       pusher.bind() and is reported as {"kind": "global", "event", "data"}.
//   {"cmd": "jwt_renew", "client": "a", "token": "<fresh JWT>"}
//       renews the sign-in: pusher.send_event('pusher:signin', {auth, user_data}), what
//       an app does when it receives bastion:token_expiring.
//
// The client is registered like any other, so subscribe/signin/members/state work on it.

function jwtConnect(msg) {
  const t = requireTarget();
  const name = msg.client;
  if (clients.has(name)) throw new Error(`client ${name} already exists`);
  const state = { token: msg.token, userData: msg.userData, channelAuth: msg.channelAuth || {} };
  const pusher = new PusherClient(t.key, {
    cluster: 'x',
    wsHost: '127.0.0.1',
    wsPort: t.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    channelAuthorization: {
      customHandler: (params, callback) => {
        emitEvent('auth', name, { what: 'channel', channel: params.channelName, socketId: params.socketId });
        callback(null, state.channelAuth[params.channelName] || { auth: '' });
      },
    },
    userAuthentication: {
      customHandler: (params, callback) => {
        emitEvent('auth', name, { what: 'user', socketId: params.socketId });
        callback(null, { auth: state.token, user_data: JSON.stringify(state.userData) });
      },
    },
  });
  clients.set(name, { pusher: pusher, state: state });
  pusher.connection.bind('state_change', (s) => {
    emitEvent('state', name, { previous: s.previous, current: s.current,
      socketId: pusher.connection.socket_id || null });
  });
  pusher.connection.bind('error', (err) => {
    emitEvent('conn_error', name, { error: plain(err) });
  });
  pusher.connection.bind('message', (m) => {
    emitEvent('message', name, { event: m.event, channel: m.channel === undefined ? null : m.channel,
      data: plain(m.data), user_id: m.user_id === undefined ? null : m.user_id });
  });
  pusher.bind('bastion:token_expiring', (data) => {
    emitEvent('global', name, { event: 'bastion:token_expiring', data: plain(data) });
  });
  return new Promise((resolve, reject) => {
    const onChange = (s) => {
      if (s.current === 'connected') {
        pusher.connection.unbind('state_change', onChange);
        resolve({ socketId: pusher.connection.socket_id });
      } else if (s.current === 'failed') {
        pusher.connection.unbind('state_change', onChange);
        reject(new Error('pusher-js connection failed'));
      }
    };
    pusher.connection.bind('state_change', onChange);
  });
}

function jwtRenew(msg) {
  const c = getClient(msg.client);
  c.state.token = msg.token;
  c.pusher.send_event('pusher:signin', { auth: msg.token, user_data: JSON.stringify(c.state.userData) });
  return {};
}

// `handle` is a function binding: wrap it so the new commands join the existing ones.
const handleBeforeJwt = handle;
// eslint-disable-next-line no-func-assign
handle = async function handleWithJwt(msg) {
  if (msg.cmd === 'jwt_connect') return jwtConnect(msg);
  if (msg.cmd === 'jwt_renew') return jwtRenew(msg);
  return handleBeforeJwt(msg);
};

// ------------------------------------------------------------------ scenario: webhooks
// Bastion's webhooks as an app's receiver checks them with the Node SDK
// (tests/interop/test_webhooks_sdk.py):
//
//   {"cmd": "webhook", "headers": {"X-Pusher-Key": "...", ...}, "rawBody": "<body text>"}
//       → {"isValid": bool, "events": [...] | null, "timeMs": number | null}
//       pusher.webhook({headers, rawBody}) with the headers' names lower-cased (as
//       Node's http module gives them), then isValid(), getEvents(), getTime().

function webhookCheck(msg) {
  const headers = {};
  for (const [name, value] of Object.entries(msg.headers || {})) headers[name.toLowerCase()] = value;
  const webhook = makeSdk({}).webhook({ headers: headers, rawBody: msg.rawBody });
  const valid = webhook.isValid();
  return {
    isValid: valid,
    events: valid ? plain(webhook.getEvents()) : null,
    timeMs: valid ? webhook.getTime().getTime() : null,
  };
}

const handleBeforeWebhook = handle;
// eslint-disable-next-line no-func-assign
handle = async function handleWithWebhook(msg) {
  if (msg.cmd === 'webhook') return webhookCheck(msg);
  return handleBeforeWebhook(msg);
};

// ------------------------------------------------------------------ scenario: a slow consumer
// pusher-js as a client that stops reading (tests/interop/test_pusherjs_slow_consumer.py):
//
//   {"cmd": "pause_socket", "client": "a"}   stop reading the client's TCP socket
//   {"cmd": "resume_socket", "client": "a"}  read it again
//       → {"paused": bool}
//
// Under Node, pusher-js's WebSocket is the faye-websocket client bundled in its node
// build; its TCP stream (`_stream`, a net.Socket) is piped into the WebSocket parser.
// Paused, Node stops reading the socket, the kernel's receive window closes and the
// server's writes wait on the server's side: a slow link, without a clock.
// `pause_socket` also reports pusher-js's `connecting_in` notices (the delay, in
// seconds, before its next connection attempt) as {"kind": "connecting_in", "delay"}.

function tcpStream(msg) {
  const c = getClient(msg.client);
  const connection = c.pusher.connection.connection;
  const transport = connection && connection.transport;
  const socket = transport && transport.socket;
  const stream = socket && socket._stream;
  if (!stream || typeof stream.pause !== 'function') {
    throw new Error(`client ${msg.client} has no open TCP stream`);
  }
  return { client: c, stream: stream };
}

function pauseSocket(msg) {
  const found = tcpStream(msg);
  if (!found.client.connectingInBound) {
    found.client.connectingInBound = true;
    found.client.pusher.connection.bind('connecting_in', (delay) => {
      emitEvent('connecting_in', msg.client, { delay: delay });
    });
  }
  found.stream.pause();
  return { paused: found.stream.isPaused() };
}

function resumeSocket(msg) {
  const found = tcpStream(msg);
  found.stream.resume();
  return { paused: found.stream.isPaused() };
}

const handleBeforeSlowConsumer = handle;
// eslint-disable-next-line no-func-assign
handle = async function handleWithSlowConsumer(msg) {
  if (msg.cmd === 'pause_socket') return pauseSocket(msg);
  if (msg.cmd === 'resume_socket') return resumeSocket(msg);
  return handleBeforeSlowConsumer(msg);
};
