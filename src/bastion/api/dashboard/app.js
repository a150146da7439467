// Bastion operator dashboard (vanilla JS, no build step, nothing loaded from elsewhere).
//
// The admin token lives in sessionStorage only (this tab, gone when it closes) and
// travels as `Authorization: Bearer` to /api/security/*; it is never put in a URL,
// a cookie or local storage. Every value from the server reaches the page through
// textContent or DOM attributes, never as markup.
'use strict';

(function () {
  const TOKEN_KEY = 'bastion.admin.token';
  const POLL_MS = 2000;
  const HISTORY = 150; // samples in the connections chart: five minutes
  const AUDIT_ROWS = 100; // rows kept in the tail (one page of audit-logs)
  const AUDIT_OVERLAP_S = 5; // re-read this much of the tail: late writes are not missed
  const SERIES = 6; // colour classes s0..s5 in app.css
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const state = {
    generation: 0, // bumped on log-in and log-out: stale answers are dropped
    timer: null,
    inflight: false,
    again: false,
    previous: null, // {t, apps}: the last sample, for rates
    history: [], // [{t, total, apps: {id: connections}}]
    auditIds: new Set(),
    auditNewest: null,
    blocksKey: null,
  };

  class Unauthorized extends Error {}

  class ApiError extends Error {
    constructor(message, status, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      node.setAttribute(name, String(value));
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null;
    }
  }

  // --- the admin API ---------------------------------------------------------------

  async function api(method, route, body) {
    const token = storedToken();
    if (!token) throw new Unauthorized('no token');
    const headers = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    const init = {
      method: method,
      headers: headers,
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
    };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch('/api/security/' + route, init);
    if (response.status === 401) throw new Unauthorized('refused');
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const message = data && typeof data.error === 'string' ? data.error : 'HTTP ' + response.status;
      throw new ApiError(message, response.status, response.headers.get('Retry-After'));
    }
    return data;
  }

  // --- log-in and log-out ----------------------------------------------------------

  function stop() {
    state.generation += 1;
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    state.inflight = false;
    state.again = false;
  }

  function clearData() {
    state.previous = null;
    state.history = [];
    state.auditIds = new Set();
    state.auditNewest = null;
    state.blocksKey = null;
    for (const id of ['apps-table', 'blocks-table', 'alerts-table', 'audit-table']) {
      $(id).tBodies[0].replaceChildren();
    }
    $('chart-connections').replaceChildren();
    $('chart-connections-legend').replaceChildren();
    $('chart-refusals').replaceChildren();
    for (const id of ['total-connections', 'total-rate', 'total-refusals', 'total-auth-failures',
      'total-rate-limits', 'total-blocks', 'total-alerts']) {
      $(id).textContent = '–';
    }
    showMessage('');
  }

  function showLogin(error) {
    stop();
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      // nothing stored
    }
    clearData();
    $('dashboard-view').hidden = true;
    $('logout').hidden = true;
    $('login-view').hidden = false;
    setStatus('');
    const box = $('login-error');
    box.textContent = error || '';
    box.hidden = !error;
    $('token').focus();
  }

  function showDashboard() {
    $('login-view').hidden = true;
    $('login-error').hidden = true;
    $('dashboard-view').hidden = false;
    $('logout').hidden = false;
  }

  function refusedMessage(error) {
    if (error instanceof Unauthorized) {
      return 'The admin token was refused (401 admin_unauthorized). Check it and log in again.';
    }
    if (error instanceof ApiError && error.status === 429) {
      const wait = error.retryAfter ? ' Try again in ' + error.retryAfter + ' s.' : '';
      return 'Too many refused requests from this address (429).' + wait;
    }
    return 'Could not reach the admin API: ' + (error && error.message ? error.message : error);
  }

  async function logIn(event) {
    event.preventDefault();
    const input = $('token');
    const token = input.value.trim();
    input.value = '';
    if (!token) return;
    stop();
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (e) {
      showLogin('This browser refuses session storage: the dashboard cannot keep the token.');
      return;
    }
    await begin();
  }

  async function begin() {
    const generation = state.generation;
    let data;
    try {
      data = await api('GET', 'dashboard');
    } catch (error) {
      if (generation === state.generation) showLogin(refusedMessage(error));
      return;
    }
    if (generation !== state.generation) return;
    showDashboard();
    await update(generation, data);
  }

  function logOut() {
    showLogin('');
  }

  // --- polling -----------------------------------------------------------------------

  function schedule(generation) {
    if (generation !== state.generation) return;
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = setTimeout(function () {
      state.timer = null;
      poll(generation);
    }, POLL_MS);
  }

  async function poll(generation) {
    if (generation !== state.generation) return;
    if (state.inflight) {
      state.again = true;
      return;
    }
    let data;
    state.inflight = true;
    try {
      data = await api('GET', 'dashboard');
    } catch (error) {
      if (generation !== state.generation) return;
      state.inflight = false;
      if (error instanceof Unauthorized) {
        showLogin(refusedMessage(error));
        return;
      }
      setStatus('Update failed: ' + error.message, true);
      schedule(generation);
      return;
    }
    state.inflight = false;
    await update(generation, data);
  }

  function refreshNow() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    poll(state.generation);
  }

  async function update(generation, data) {
    if (generation !== state.generation) return;
    state.inflight = true;
    try {
      render(data);
      if (data.audit) {
        $('audit-off').hidden = true;
        await pollAudit(generation);
      } else {
        $('audit-off').hidden = false;
      }
      if (generation !== state.generation) return;
      setStatus('Live · updated ' + clock(new Date()) + (data.ready ? '' : ' · node not ready'), !data.ready);
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof Unauthorized) {
        state.inflight = false;
        showLogin(refusedMessage(error));
        return;
      }
      setStatus('Update failed: ' + error.message, true);
    }
    state.inflight = false;
    if (state.again) {
      state.again = false;
      poll(generation);
    } else {
      schedule(generation);
    }
  }

  function setStatus(text, bad) {
    const status = $('status');
    status.textContent = text;
    status.classList.toggle('stale', Boolean(bad));
  }

  // --- rendering ---------------------------------------------------------------------

  function pad(n) {
    return String(n).padStart(2, '0');
  }

  function clock(date) {
    return pad(date.getHours()) + ':' + pad(date.getMinutes()) + ':' + pad(date.getSeconds());
  }

  function dateTime(seconds) {
    const date = new Date(seconds * 1000);
    return date.getFullYear() + '-' + pad(date.getMonth() + 1) + '-' + pad(date.getDate()) + ' ' + clock(date);
  }

  function rate(value) {
    if (value === null) return '–';
    return value >= 100 ? value.toFixed(0) : value.toFixed(1);
  }

  function number(value) {
    return typeof value === 'number' ? value.toLocaleString('en-US') : '–';
  }

  function render(data) {
    const now = performance.now() / 1000;
    const apps = data.apps || {};
    const ids = Object.keys(apps).sort();
    const previous = state.previous;
    const dt = previous ? now - previous.t : 0;
    const rates = {};
    let totalRate = previous && dt > 0 ? 0 : null;
    for (const id of ids) {
      const was = previous && previous.apps[id];
      if (was && dt > 0) {
        const messages = Math.max(0, apps[id].messages_in - was.messages_in) / dt;
        const published = Math.max(0, apps[id].events_published - was.events_published) / dt;
        rates[id] = { messages: messages, published: published };
        totalRate += messages;
      } else {
        rates[id] = { messages: null, published: null };
      }
    }
    state.previous = { t: now, apps: apps };

    let total = 0;
    const sample = { t: Date.now(), total: 0, apps: {} };
    for (const id of ids) {
      sample.apps[id] = apps[id].connections;
      total += apps[id].connections;
    }
    sample.total = total;
    state.history.push(sample);
    if (state.history.length > HISTORY) state.history.splice(0, state.history.length - HISTORY);

    const counters = data.counters || {};
    $('total-connections').textContent = number(total);
    $('total-rate').textContent = rate(totalRate);
    $('total-refusals').textContent = number(counters.refusals);
    $('total-auth-failures').textContent = number(counters.auth_failures);
    $('total-rate-limits').textContent = number(counters.rate_limit_hits);
    $('total-blocks').textContent = number((data.blocks || []).length);

    renderApps(ids, apps, rates);
    renderConnectionsChart(ids);
    renderRefusalsChart(data.top_refusals || []);
    renderBlocks(data.blocks || []);
    renderAlerts(data.alerts || []);
  }

  function pairs(items, name) {
    return items.map(function (item) { return item[name] + ' (' + item.count + ')'; }).join(', ');
  }

  function renderAlerts(alerts) {
    $('alerts-empty').hidden = alerts.length > 0;
    $('total-alerts').textContent = number(alerts.length);
    const rows = alerts.map(function (alert) {
      const row = el('tr', null, 'alert-' + alert.severity);
      row.dataset.alert = alert.alert;
      row.append(
        el('td', alert.alert, 'mono'),
        el('td', alert.severity),
        el('td', number(alert.count) + ' / ' + number(alert.threshold) + ' in ' + alert.window_seconds + ' s', 'num'),
        el('td', dateTime(alert.raised_at)),
        el('td', pairs(alert.top_addresses || [], 'ip'), 'mono'),
        el('td', pairs(alert.top_reasons || [], 'reason')),
      );
      return row;
    });
    $('alerts-table').tBodies[0].replaceChildren(...rows);
  }

  function renderApps(ids, apps, rates) {
    const body = $('apps-table').tBodies[0];
    const rows = [];
    for (const id of ids) {
      const app = apps[id];
      const row = el('tr');
      row.dataset.app = id;
      row.append(
        el('td', id, 'mono'),
        el('td', number(app.connections), 'num connections'),
        el('td', rate(rates[id].messages), 'num'),
        el('td', rate(rates[id].published), 'num'),
        el('td', number(app.connections_opened), 'num'),
        el('td', number(app.refusals), 'num'),
      );
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  function niceMax(value) {
    if (value <= 4) return 4;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= value) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function ago(ms) {
    const seconds = Math.round(ms / 1000);
    if (seconds < 120) return '−' + seconds + ' s';
    return '−' + (Math.round(seconds / 6) / 10) + ' min';
  }

  function renderConnectionsChart(ids) {
    const width = 560;
    const height = 170;
    const left = 40;
    const right = 10;
    const top = 10;
    const bottom = 24;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const history = state.history;
    // The last five minutes once there are; until then the minute (or so) collected.
    const span = history.length > 1 ? history[history.length - 1].t - history[0].t : 0;
    const windowMs = Math.min(HISTORY * POLL_MS, Math.max(60000, span));
    const end = history.length ? history[history.length - 1].t : Date.now();
    const start = end - windowMs;
    let peak = 0;
    for (const sample of history) peak = Math.max(peak, sample.total);
    const yMax = niceMax(peak);
    const x = function (t) {
      return left + ((t - start) / windowMs) * plotW;
    };
    const y = function (v) {
      return top + plotH - (v / yMax) * plotH;
    };

    const chart = svg('svg', {
      viewBox: '0 0 ' + width + ' ' + height,
      role: 'img',
      'aria-label': 'Open connections over the last ' + ago(windowMs).slice(1),
    });
    for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
      const value = yMax * fraction;
      chart.append(
        svg('line', { x1: left, x2: width - right, y1: y(value), y2: y(value), class: 'grid-line' }),
        svg('text', { x: left - 6, y: y(value) + 4, 'text-anchor': 'end', class: 'tick' },
          Number.isInteger(value) ? value : value.toFixed(1)),
      );
    }
    chart.append(
      svg('line', { x1: left, x2: left, y1: top, y2: top + plotH, class: 'axis' }),
      svg('line', { x1: left, x2: width - right, y1: top + plotH, y2: top + plotH, class: 'axis' }),
      svg('text', { x: left, y: height - 6, class: 'tick' }, ago(windowMs)),
      svg('text', { x: left + plotW / 2, y: height - 6, 'text-anchor': 'middle', class: 'tick' }, ago(windowMs / 2)),
      svg('text', { x: width - right, y: height - 6, 'text-anchor': 'end', class: 'tick' }, 'now'),
    );

    // One line per app (at most five), plus the total when there are several apps.
    const series = ids.slice(0, SERIES - 1).map(function (id, index) {
      return { name: 'app ' + id, value: function (s) { return s.apps[id] || 0; }, className: 's' + index };
    });
    if (ids.length > 1) {
      series.push({ name: 'all apps', value: function (s) { return s.total; }, className: 's' + (SERIES - 1) });
    }
    const legend = [];
    for (const line of series) {
      const points = history.map(function (s) {
        return x(s.t).toFixed(1) + ',' + y(line.value(s)).toFixed(1);
      });
      if (points.length === 1) points.push((width - right) + ',' + points[0].split(',')[1]);
      chart.append(svg('polyline', { points: points.join(' '), class: 'series ' + line.className }));
      const item = el('span');
      item.append(el('span', null, 'swatch ' + line.className), document.createTextNode(line.name));
      legend.push(item);
    }
    $('chart-connections').replaceChildren(chart);
    $('chart-connections-legend').replaceChildren(...legend);
  }

  function renderRefusalsChart(refusals) {
    const width = 560;
    const labelW = 190;
    const valueW = 60;
    const rowH = 24;
    const top = 6;
    const rows = refusals.slice(0, 10);
    const height = Math.max(1, rows.length) * rowH + top * 2;
    const chart = svg('svg', {
      viewBox: '0 0 ' + width + ' ' + height,
      role: 'img',
      'aria-label': 'Refusals by reason since start',
    });
    if (!rows.length) {
      chart.append(svg('text', { x: 0, y: top + 16, class: 'none' }, 'No refusal since start.'));
    }
    let peak = 1;
    for (const row of rows) peak = Math.max(peak, row.count);
    const barMax = width - labelW - valueW;
    rows.forEach(function (row, index) {
      const yTop = top + index * rowH;
      const barW = Math.max(2, (row.count / peak) * barMax);
      const bar = svg('rect', { x: labelW, y: yTop + 4, width: barW.toFixed(1), height: rowH - 8, rx: 3, class: 'bar' });
      bar.append(svg('title', {}, row.reason + ': ' + row.count));
      chart.append(
        svg('text', { x: labelW - 8, y: yTop + rowH / 2 + 4, 'text-anchor': 'end', class: 'bar-label' }, row.reason),
        bar,
        svg('text', { x: labelW + barW + 6, y: yTop + rowH / 2 + 4, class: 'bar-value' }, number(row.count)),
      );
    });
    $('chart-refusals').replaceChildren(chart);
  }

  function renderBlocks(blocks) {
    // Rebuilt only when the blocks change, so a button is not replaced under a click.
    const key = JSON.stringify(blocks.map(function (b) {
      return [b.ip, b.until, b.reason, b.source];
    }));
    $('blocks-empty').hidden = blocks.length > 0;
    if (key === state.blocksKey) return;
    state.blocksKey = key;
    const rows = [];
    for (const block of blocks) {
      const row = el('tr');
      row.dataset.ip = block.ip;
      const button = el('button', 'Unblock', 'small unblock');
      button.type = 'button';
      button.setAttribute('aria-label', 'Unblock ' + block.ip);
      button.addEventListener('click', function () {
        unblock(block.ip, button);
      });
      const action = el('td');
      action.append(button);
      row.append(
        el('td', block.ip, 'mono ip'),
        el('td', block.source),
        el('td', block.reason),
        el('td', dateTime(block.until)),
        action,
      );
      rows.push(row);
    }
    $('blocks-table').tBodies[0].replaceChildren(...rows);
  }

  async function pollAudit(generation) {
    let route = 'audit-logs?limit=100';
    if (state.auditNewest !== null) {
      route += '&since=' + encodeURIComponent(String(state.auditNewest - AUDIT_OVERLAP_S));
    }
    let page;
    try {
      page = await api('GET', route);
    } catch (error) {
      if (error instanceof ApiError && error.status === 503) {
        $('audit-off').hidden = false;
        return;
      }
      throw error;
    }
    if (generation !== state.generation) return;
    const body = $('audit-table').tBodies[0];
    const events = (page.events || []).filter(function (event) {
      return !state.auditIds.has(event.id);
    });
    const first = state.auditNewest === null;
    // The page is newest first: insert the oldest first, each at the top.
    for (const event of events.slice().reverse()) {
      state.auditIds.add(event.id);
      if (state.auditNewest === null || event.time > state.auditNewest) state.auditNewest = event.time;
      body.insertBefore(auditRow(event, !first), body.firstChild);
    }
    while (body.rows.length > AUDIT_ROWS) {
      const last = body.rows[body.rows.length - 1];
      state.auditIds.delete(last.dataset.id);
      last.remove();
    }
  }

  function auditRow(event, fresh) {
    const row = el('tr');
    row.dataset.id = event.id;
    row.dataset.type = event.type;
    if (event.severity === 'warning') row.classList.add('warning');
    if (fresh) row.classList.add('fresh');
    const time = el('td', dateTime(event.time), 'mono');
    row.append(
      time,
      el('td', event.severity, 'sev'),
      el('td', event.type, 'mono type'),
      el('td', event.ip || '', 'mono ip'),
      el('td', event.app_id || '', 'mono'),
      el('td', event.message),
    );
    return row;
  }

  // --- changes -----------------------------------------------------------------------

  function showMessage(text, good) {
    const box = $('block-message');
    box.textContent = text;
    box.hidden = !text;
    box.classList.toggle('good', Boolean(good));
    box.classList.toggle('bad', !good);
  }

  function changeFailed(error) {
    if (error instanceof Unauthorized) {
      showLogin(refusedMessage(error));
      return;
    }
    showMessage(refusedMessage(error).replace('Could not reach the admin API: ', ''), false);
  }

  async function block(event) {
    event.preventDefault();
    const ip = $('block-ip').value.trim();
    const ttl = Number($('block-ttl').value);
    const reason = $('block-reason').value.trim();
    const body = { ip: ip, ttl_seconds: ttl };
    if (reason) body.reason = reason;
    const button = event.submitter || null;
    if (button) button.disabled = true;
    try {
      const answer = await api('POST', 'block-ip', body);
      showMessage('Blocked ' + answer.block.ip + ' until ' + dateTime(answer.block.until) + '.', true);
      $('block-ip').value = '';
      $('block-reason').value = '';
      refreshNow();
    } catch (error) {
      changeFailed(error);
    } finally {
      if (button) button.disabled = false;
    }
  }

  async function unblock(ip, button) {
    button.disabled = true;
    try {
      const answer = await api('POST', 'unblock-ip', { ip: ip });
      showMessage(answer.unblocked ? 'Unblocked ' + answer.ip + '.' : answer.ip + ' was not blocked.', true);
      refreshNow();
    } catch (error) {
      button.disabled = false;
      changeFailed(error);
    }
  }

  // --- start -------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', function () {
    $('login-form').addEventListener('submit', logIn);
    $('logout').addEventListener('click', logOut);
    $('block-form').addEventListener('submit', block);
    if (storedToken()) {
      begin();
    } else {
      showLogin('');
    }
  });
})();
