#!/usr/bin/env node
// Drives Bastion's /dashboard in headless Debian Chromium (playwright-core), for
// tests/interop/test_dashboard_chromium.py.
//
// Input: one JSON object on stdin:
//   {base, port, token, apps: [{id, key, secret}], chromium, timeoutMs,
//    screenshot (a PNG path, or null), blockIp}
// The token arrives on stdin so it is in no argv or environment, and it is never
// printed. Output: one JSON line on stdout, {ok: true, steps, checks} or
// {ok: false, step, error, page}; the exit status is 0 only when ok.
//
// Every wait is a condition with a time-out (timeoutMs); nothing sleeps to
// synchronise. In screenshot mode a background generator keeps some traffic going
// while the page collects enough samples for its chart.
'use strict';

const { chromium } = require('playwright-core');
const PusherClient = require('pusher-js');
const PusherServer = require('pusher');

const steps = [];
let step = 'start';

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on('data', (chunk) => chunks.push(chunk));
    process.stdin.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch (e) {
        reject(e);
      }
    });
    process.stdin.on('error', reject);
  });
}

function begin(name) {
  step = name;
  steps.push(name);
}

// --- Pusher clients (Node side) ------------------------------------------------------

function openClient(config, app, timeoutMs) {
  const client = new PusherClient(app.key, {
    cluster: 'x',
    wsHost: '127.0.0.1',
    wsPort: config.port,
    forceTLS: false,
    enabledTransports: ['ws'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('pusher-js did not connect in time')), timeoutMs);
    client.connection.bind('connected', () => {
      clearTimeout(timer);
      resolve(client);
    });
  });
}

// A client whose key no app has: Bastion answers 4001 (unknown_app), a refusal.
function refusedClient(config, timeoutMs) {
  const client = new PusherClient('no-such-key', {
    cluster: 'x',
    wsHost: '127.0.0.1',
    wsPort: config.port,
    forceTLS: false,
    enabledTransports: ['ws'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no refusal for an unknown key')), timeoutMs);
    client.connection.bind('error', () => {
      clearTimeout(timer);
      client.disconnect();
      resolve();
    });
  });
}

function sdk(config, app, secret) {
  return new PusherServer({
    appId: app.id,
    key: app.key,
    secret: secret || app.secret,
    host: '127.0.0.1',
    port: config.port,
    useTLS: false,
    timeout: config.timeoutMs,
  });
}

// --- the page ------------------------------------------------------------------------

async function loggedOut(page, timeout) {
  await page.locator('#login-view').waitFor({ state: 'visible', timeout });
  if (await page.locator('#dashboard-view').isVisible()) throw new Error('dashboard visible while logged out');
}

async function logIn(page, token, timeout) {
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
}

async function connectionsShown(page, appId, count, timeout) {
  const cell = page.locator(`#apps-table tr[data-app="${appId}"] td.connections`, {
    hasText: new RegExp('^' + count + '$'),
  });
  await cell.waitFor({ state: 'visible', timeout });
}

async function blockThroughForm(page, ip, ttl, reason, timeout) {
  await page.fill('#block-ip', ip);
  await page.fill('#block-ttl', String(ttl));
  await page.fill('#block-reason', reason);
  await page.click('#block-form button[type=submit]');
  await page.locator(`#blocks-table tr[data-ip="${ip}"]`).waitFor({ state: 'visible', timeout });
}

async function auditRowShown(page, type, ip, timeout) {
  await page
    .locator(`#audit-table tr[data-type="${type}"]`, { has: page.locator('td.ip', { hasText: ip }) })
    .first()
    .waitFor({ state: 'visible', timeout });
}

async function chartSamples(page) {
  return page.evaluate(() => {
    const line = document.querySelector('#chart-connections polyline');
    return line ? line.getAttribute('points').trim().split(/\s+/).length : 0;
  });
}

// --- screenshot mode: a few minutes of a plausible node, compressed ----------------

async function realisticData(config, page, clients, timeout) {
  const [first, second] = config.apps;
  // A second block, as if reputation had caught a noisy address.
  await blockThroughForm(page, '198.51.100.23', 86400, 'credential stuffing on /apps/12345', timeout);
  // Refusals of a few kinds: unknown app key, bad REST signatures.
  await refusedClient(config, timeout);
  await refusedClient(config, timeout);
  const forged = sdk(config, first, 'not-the-secret');
  for (let i = 0; i < 3; i += 1) {
    await forged.trigger('news', 'forged', {}).catch(() => undefined);
  }
  // Traffic: REST publishes and client pings on both apps, while more clients join.
  const publishers = [sdk(config, first), sdk(config, second)];
  let running = true;
  let publishes = 0;
  const traffic = setInterval(() => {
    if (!running) return;
    publishes += 1;
    publishers[0].trigger('news', 'tick', { n: publishes }).catch(() => undefined);
    if (publishes % 3 === 0) publishers[1].trigger('alerts', 'tick', { n: publishes }).catch(() => undefined);
    for (const client of clients) client.send_event('pusher:ping', {});
  }, 150);
  try {
    const joiners = [first, first, second, first, second, first, first, second];
    let samples = await chartSamples(page);
    const target = samples + 28;
    const deadline = Date.now() + timeout * 6;
    while (samples < target) {
      if (Date.now() > deadline) throw new Error('the chart did not collect its samples in time');
      if (joiners.length && samples % 3 === 0) clients.push(await openClient(config, joiners.shift(), timeout));
      // Wait for the next poll's sample (a condition, not a fixed delay).
      await page.waitForFunction(
        (n) => {
          const line = document.querySelector('#chart-connections polyline');
          return line && line.getAttribute('points').trim().split(/\s+/).length > n;
        },
        samples,
        { timeout },
      );
      samples = await chartSamples(page);
    }
  } finally {
    running = false;
    clearInterval(traffic);
  }
}

// --- the flow -----------------------------------------------------------------------

async function main() {
  const config = await readStdin();
  const timeout = config.timeoutMs;
  const app = config.apps[0];
  const browser = await chromium.launch({
    executablePath: config.chromium,
    args: ['--no-sandbox'],
    timeout,
  });
  const cspViolations = [];
  const pageErrors = [];
  const clients = [];
  let page = null;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.setDefaultTimeout(timeout);
    page.on('console', (message) => {
      if (message.type() === 'error' && /Content Security Policy/i.test(message.text())) {
        cspViolations.push(message.text());
      }
    });
    page.on('pageerror', (error) => pageErrors.push(String(error && error.message)));

    begin('open the page');
    const response = await page.goto(config.base + '/dashboard', { timeout });
    if (!response || response.status() !== 200) throw new Error('GET /dashboard answered ' + (response && response.status()));
    await loggedOut(page, timeout);

    begin('a wrong token is refused');
    await logIn(page, 'not-the-admin-token-0123456789abcdefgh', timeout);
    await page.locator('#login-error', { hasText: '401' }).waitFor({ state: 'visible', timeout });
    await loggedOut(page, timeout);
    const afterWrong = await page.evaluate(() => sessionStorage.length);
    if (afterWrong !== 0) throw new Error('a refused token stayed in sessionStorage');

    begin('log in');
    await logIn(page, config.token, timeout);
    await page.locator('#dashboard-view').waitFor({ state: 'visible', timeout });
    await connectionsShown(page, app.id, 0, timeout);

    begin('the wrong token raised an alert, shown open');
    // [alerts.auth_failures] threshold = 1 in this test: the refused token was one.
    const alertRow = page.locator('#alerts-table tr[data-alert="auth_failures"]');
    await alertRow.waitFor({ state: 'visible', timeout });
    const alertText = await alertRow.textContent();
    if (!alertText.includes('127.0.0.1') || !alertText.includes('admin_unauthorized')) {
      throw new Error('the alert row does not name its address and reason: ' + alertText);
    }
    if ((await page.textContent('#total-alerts')).trim() !== '1') throw new Error('open alerts tile');
    if (await page.locator('#alerts-empty').isVisible()) throw new Error('"no alert" shown with one open');

    begin('a connection appears');
    clients.push(await openClient(config, app, timeout));
    await connectionsShown(page, app.id, 1, timeout);
    const total = await page.textContent('#total-connections');
    if (total.trim() !== '1') throw new Error('total connections tile shows ' + total);

    begin('block an address through the form');
    await blockThroughForm(page, config.blockIp, 600, 'dashboard interop test', timeout);
    const row = page.locator(`#blocks-table tr[data-ip="${config.blockIp}"]`);
    const rowText = await row.textContent();
    if (!rowText.includes('manual') || !rowText.includes('dashboard interop test')) {
      throw new Error('the block row does not show its source and reason');
    }

    begin('the block is in the audit tail');
    await auditRowShown(page, 'ip_blocked_manual', config.blockIp, timeout);

    begin('the charts are drawn');
    await page.locator('#chart-connections svg polyline').first().waitFor({ state: 'attached', timeout });
    await page.locator('#chart-refusals svg rect.bar').first().waitFor({ state: 'attached', timeout });

    if (config.screenshot) {
      begin('realistic data for the screenshot');
      await realisticData(config, page, clients, timeout);
      await page.locator('#blocks-table tr[data-ip="198.51.100.23"]').waitFor({ state: 'visible', timeout });
      await page.evaluate(() => {
        // The newest rows' highlight fades over 2 s; the picture shows the settled page.
        for (const row of document.querySelectorAll('tr.fresh')) row.classList.remove('fresh');
        const message = document.getElementById('block-message');
        if (message) message.hidden = true;
      });
      begin('screenshot');
      await page.screenshot({ path: config.screenshot, fullPage: false });
    }

    begin('unblock it with its button');
    await row.locator('button.unblock').click();
    await row.waitFor({ state: 'detached', timeout });
    await auditRowShown(page, 'ip_unblocked', config.blockIp, timeout);

    begin('the token stays in this tab only');
    const storage = await page.evaluate(() => ({
      session: sessionStorage.length,
      local: localStorage.length,
      cookies: document.cookie.length,
    }));
    if (storage.session !== 1 || storage.local !== 0 || storage.cookies !== 0) {
      throw new Error('unexpected storage: ' + JSON.stringify(storage));
    }
    if (page.url().includes(config.token)) throw new Error('the token is in the URL');

    begin('log out');
    await page.click('#logout');
    await loggedOut(page, timeout);
    const afterLogout = await page.evaluate(() => sessionStorage.length);
    if (afterLogout !== 0) throw new Error('the token survived the log-out');

    if (cspViolations.length) throw new Error('Content-Security-Policy violations: ' + cspViolations.join(' | '));
    if (pageErrors.length) throw new Error('page errors: ' + pageErrors.join(' | '));
    process.stdout.write(JSON.stringify({ ok: true, steps, checks: { storage } }) + '\n');
  } catch (error) {
    let snapshot = null;
    if (page) {
      snapshot = await page
        .evaluate(() => ({
          status: document.getElementById('status').textContent,
          loginError: document.getElementById('login-error').textContent,
          blockMessage: document.getElementById('block-message').textContent,
          dashboardHidden: document.getElementById('dashboard-view').hidden,
          apps: document.querySelector('#apps-table tbody').textContent,
          blocks: document.querySelector('#blocks-table tbody').textContent,
          audit: document.querySelector('#audit-table tbody').textContent.slice(0, 2000),
        }))
        .catch((e) => String(e));
    }
    const message = String((error && error.stack) || error).split(config.token).join('[redacted]');
    process.stdout.write(
      JSON.stringify({ ok: false, step, steps, error: message, page: snapshot, cspViolations, pageErrors }) + '\n',
    );
    process.exitCode = 1;
  } finally {
    for (const client of clients) client.disconnect();
    await browser.close();
  }
}

main().catch((error) => {
  process.stdout.write(JSON.stringify({ ok: false, step, error: String((error && error.stack) || error) }) + '\n');
  process.exitCode = 1;
});
