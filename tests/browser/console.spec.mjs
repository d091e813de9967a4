// The operator console (/admin) in headless Chromium, against a real `payretry serve` on a
// throw-away SQLite file, with local stand-ins for Stripe's API and the merchant's webhook
// endpoint. Support reads, admins act: a dead letter is redriven and watched back to
// `retry_scheduled`, a failed webhook is redelivered, the funnel shows what the test did,
// every view passes axe-core (no serious or critical violations) and works by keyboard.
//
//   node --test --test-concurrency=1 tests/browser/console.spec.mjs     (or tests/browser/run.sh)
//
// Environment: PAYRETRY_BIN, CHROMIUM, SCREENSHOT_DIR as for story.spec.mjs.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
const binary = process.env.PAYRETRY_BIN
  ? path.resolve(repoRoot, process.env.PAYRETRY_BIN)
  : path.join(path.resolve(repoRoot, process.env.CARGO_TARGET_DIR || 'target'), 'debug', 'payretry');
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = path.resolve(repoRoot, process.env.SCREENSHOT_DIR || 'docs/screenshots');
const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
const DESKTOP = { width: 1280, height: 900 };
const STRIPE_WEBHOOK_SECRET = 'whsec_console_browser_test';
const MERCHANT_SECRET = 'whsec_' + Buffer.alloc(32, 7).toString('base64');
const BUYER = 'buyer-console';

let dataDir, server, browser, stripe, receiver;
let adminToken, supportToken, buyerToken;
const sessions = {}; // name → session id

// ---------------------------------------------------------------- local stand-ins

function listen(handler) {
  return new Promise((resolve) => {
    const s = createServer(handler);
    s.listen(0, '127.0.0.1', () => resolve(s));
  });
}

const readBody = (req) => new Promise((resolve) => {
  let data = '';
  req.on('data', (c) => { data += c; });
  req.on('end', () => resolve(data));
});

function json(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

/** Stripe's checkout-session endpoints as payretry uses them; `failing` refuses retries' creates. */
async function startStripe() {
  const state = { failing: false, delayMs: 0, byKey: new Map(), byId: new Map(), n: 0 };
  const s = await listen(async (req, res) => {
    const body = new URLSearchParams(await readBody(req));
    const url = new URL(req.url, 'http://stripe');
    const parts = url.pathname.split('/').filter(Boolean); // v1 checkout sessions [id] [expire]
    if (req.method === 'POST' && url.pathname === '/v1/checkout/sessions') {
      if (state.delayMs) await new Promise((r) => setTimeout(r, state.delayMs));
      const key = req.headers['idempotency-key'];
      if (key && state.byKey.has(key)) return json(res, 200, state.byKey.get(key));
      if (state.failing && body.get('metadata[retry_attempt]') !== '0') {
        return json(res, 400, { error: { type: 'invalid_request_error', code: 'parameter_invalid_empty', message: 'Refused by the test.' } });
      }
      const id = `cs_test_console_${++state.n}`;
      const session = {
        id, object: 'checkout.session', status: 'open', payment_status: 'unpaid',
        url: `https://checkout.stripe.test/c/pay/${id}`, expires_at: Number(body.get('expires_at')),
        client_reference_id: body.get('client_reference_id'),
        metadata: { payment_session_id: body.get('metadata[payment_session_id]'), retry_attempt: body.get('metadata[retry_attempt]') },
      };
      if (key) state.byKey.set(key, session);
      state.byId.set(id, session);
      return json(res, 200, session);
    }
    const session = state.byId.get(parts[3]);
    if (!session) return json(res, 404, { error: { type: 'invalid_request_error', code: 'resource_missing', message: 'No such checkout session.' } });
    if (req.method === 'GET' && parts.length === 4) return json(res, 200, session);
    if (req.method === 'POST' && parts[4] === 'expire') {
      session.status = 'expired';
      return json(res, 200, session);
    }
    return json(res, 404, { error: { type: 'invalid_request_error', message: 'Unrecognized request URL.' } });
  });
  return { server: s, state, base: `http://127.0.0.1:${s.address().port}` };
}

/** The merchant's webhook endpoint: answers `status`, records every request. */
async function startReceiver() {
  const state = { status: 500, received: [] };
  const s = await listen(async (req, res) => {
    const body = await readBody(req);
    state.received.push({ id: req.headers['webhook-id'], status: state.status, body });
    res.writeHead(state.status);
    res.end();
  });
  return { server: s, state, url: `http://127.0.0.1:${s.address().port}/hooks` };
}

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

// ---------------------------------------------------------------- payretry

function serverEnv(port) {
  return {
    ...process.env,
    PAYRETRY_DATABASE_URL: `sqlite://${path.join(dataDir, 'payretry.db')}`,
    PAYRETRY_LISTEN: `127.0.0.1:${port}`,
    PAYRETRY_PUBLIC_URL: `http://127.0.0.1:${port}`,
    PAYRETRY_PROVIDER: 'stripe',
    STRIPE_API_BASE: stripe.base,
    STRIPE_SECRET_KEY: 'sk_test_console_browser',
    STRIPE_WEBHOOK_SECRET,
    PAYRETRY_RETRY_DELAYS: '1s',
    PAYRETRY_MAX_RECEIVES: '1',
    PAYRETRY_MERCHANT_WEBHOOK_URL: receiver.url,
    PAYRETRY_MERCHANT_WEBHOOK_SECRET: MERCHANT_SECRET,
    PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS: '1s',
    PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT: '2s',
    PAYRETRY_QUEUE: 'embedded',
  };
}

const stripAnsi = (s) => s.replace(/\x1b\[[0-9;]*m/g, '');

async function startServer() {
  const port = await freePort();
  const env = serverEnv(port);
  const token = async (sub, role) => (await promisify(execFile)(binary, ['token', '--sub', sub, '--role', role], { env })).stdout.trim();
  adminToken = await token('admin-console', 'admin');
  supportToken = await token('support-console', 'support');
  buyerToken = await token(BUYER, 'buyer');
  return new Promise((resolve, reject) => {
    const child = spawn(binary, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const collect = (chunk) => {
      out += chunk.toString();
      if (!server && /payretry ready/.test(stripAnsi(out))) {
        server = { child, base: `http://127.0.0.1:${port}`, logs: () => stripAnsi(out) };
        resolve(server);
      }
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('exit', (code) => { if (!server) reject(new Error(`payretry serve exited with ${code}:\n${stripAnsi(out)}`)); });
    setTimeout(() => reject(new Error(`payretry serve not ready after 30 s:\n${stripAnsi(out)}`)), 30_000).unref();
  });
}

async function api(method, p, token, headers = {}) {
  const r = await fetch(server.base + p, { method, headers: { Authorization: `Bearer ${token}`, ...headers } });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function until(what, check, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms\n${server.logs().slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function sendEvent(event) {
  const body = JSON.stringify(event);
  const t = Math.floor(Date.now() / 1000);
  const v1 = createHmac('sha256', STRIPE_WEBHOOK_SECRET).update(`${t}.${body}`).digest('hex');
  const r = await fetch(server.base + '/webhooks/stripe', {
    method: 'POST', body, headers: { 'Content-Type': 'application/json', 'Stripe-Signature': `t=${t},v1=${v1}` },
  });
  assert.equal(r.status, 200, await r.text());
}

let eventN = 0;
const metadata = (id, attempt) => ({ payment_session_id: id, retry_attempt: String(attempt) });
const decline = (id, attempt) => sendEvent({
  id: `evt_console_${++eventN}`, object: 'event', type: 'payment_intent.payment_failed',
  data: { object: { id: `pi_console_${eventN}`, object: 'payment_intent', metadata: metadata(id, attempt),
    last_payment_error: { code: 'card_declined', decline_code: 'insufficient_funds' } } },
});
const pay = (id, attempt, checkout) => sendEvent({
  id: `evt_console_${++eventN}`, object: 'event', type: 'checkout.session.completed',
  data: { object: { id: checkout, object: 'checkout.session', status: 'complete', payment_status: 'paid',
    client_reference_id: id, payment_intent: `pi_console_paid_${eventN}`, metadata: metadata(id, attempt) } },
});

const status = async (id) => (await api('GET', `/payments/checkout/${id}/status`, adminToken)).body;
const waitStatus = (id, wanted) => until(`${id} ${wanted}`, async () => ((await status(id)).status === wanted ? status(id) : null));

async function declinedSession() {
  const created = await fetch(server.base + '/payments/checkout', {
    method: 'POST', headers: { Authorization: `Bearer ${buyerToken}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ amount: 2500, currency: 'usd', description: 'Order from the console test' }),
  });
  assert.equal(created.status, 201);
  const { sessionId } = await created.json();
  await decline(sessionId, 0);
  await waitStatus(sessionId, 'failed');
  return sessionId;
}

async function retry(id, key) {
  const r = await api('POST', `/payments/retry/${id}`, buyerToken, { 'Idempotency-Key': key });
  assert.equal(r.status, 202, JSON.stringify(r.body));
}

// ---------------------------------------------------------------- browser helpers

async function consolePage({ axe = true } = {}) {
  // axe-core is injected as a script: for that the page's CSP (nonce-only scripts) is
  // bypassed; the keyboard test runs under the page's own CSP.
  const context = await browser.newContext({ viewport: DESKTOP, locale: 'en-US', timezoneId: 'UTC', bypassCSP: axe });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  page.on('console', (msg) => msg.type() === 'error' && !/40[13]/.test(msg.text()) && errors.push(msg.text()));
  await page.goto(server.base + '/admin');
  return { context, page, errors };
}

async function signIn(page, token) {
  await page.getByLabel('Access token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText(/^Signed in as/).waitFor();
}

async function view(page, name, heading = name) {
  await page.getByRole('navigation').getByRole('button', { name, exact: true }).click();
  await page.getByRole('heading', { level: 2, name: heading }).waitFor();
  await loaded(page);
}

/** Waits until the view on screen has loaded since it was shown. */
async function loaded(page) {
  try {
    await page.locator('section.view:not([hidden])[data-loaded]').waitFor({ timeout: 20_000 });
  } catch (e) {
    const state = await page.evaluate(() => ({
      freshness: document.getElementById('freshness').textContent,
      problem: document.getElementById('problem').textContent,
      views: [...document.querySelectorAll('section.view')].map((s) => `${s.id} hidden=${s.hidden} loaded=${s.dataset.loaded}`),
    }));
    throw new Error(`the view never finished loading: ${JSON.stringify(state)}`, { cause: e });
  }
}

/** axe-core's serious and critical violations on the page as it is now. */
async function assertAccessible(page, label) {
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) await page.addScriptTag({ content: axeSource });
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ['violations'] });
    return result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`);
  });
  assert.deepEqual(violations, [], `${label}: axe-core`);
}

const shot = (page, name) => page.screenshot({ path: path.join(shots, `console-${name}.png`), fullPage: true });

// ---------------------------------------------------------------- the data the views show

before(async () => {
  dataDir = mkdtempSync(path.join(tmpdir(), 'payretry-console-'));
  mkdirSync(shots, { recursive: true });
  stripe = await startStripe();
  receiver = await startReceiver();
  await startServer();
  browser = await chromium.launch({
    executablePath: chromiumPath, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
  });

  // "stuck": the provider refuses the retry's checkout for good, so its job is dead-lettered.
  stripe.state.failing = true;
  sessions.stuck = await declinedSession();
  await retry(sessions.stuck, 'stuck-1');
  await until('a dead letter', async () => (await api('GET', '/admin/dead-letters', adminToken)).body.deadLetters.length === 1);
  await waitStatus(sessions.stuck, 'failed');
  stripe.state.failing = false;

  // "paid": retried and paid, then paid again through the first checkout (a double payment).
  sessions.paid = await declinedSession();
  const first = await status(sessions.paid);
  await retry(sessions.paid, 'paid-1');
  const open = await waitStatus(sessions.paid, 'open');
  await pay(sessions.paid, 1, open.providerSessionId);
  await waitStatus(sessions.paid, 'succeeded');
  await pay(sessions.paid, 0, first.providerSessionId);
  await until('the double payment', async () => (await api('GET', '/admin/duplicate-payments', adminToken)).body.duplicatePayments.length === 1);

  // "waiting": retried, its checkout open, not paid yet.
  sessions.waiting = await declinedSession();
  await retry(sessions.waiting, 'waiting-1');
  await waitStatus(sessions.waiting, 'open');

  // Every merchant event so far met a receiver answering 500 and ran out of tries.
  await until('failed webhook deliveries', async () => {
    const { body } = await api('GET', '/admin/webhook-deliveries?status=pending', adminToken);
    return body.deliveries.length === 0;
  }, 30_000);
});

after(async () => {
  await browser?.close();
  if (server) {
    const exited = new Promise((resolve) => server.child.once('exit', resolve));
    server.child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    if (server.child.exitCode === null) server.child.kill('SIGKILL');
  }
  stripe?.server.close();
  receiver?.server.close();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- scenarios

test('support signs in, finds a session by id and by buyer, and reads everything without admin buttons', { timeout: 120_000 }, async () => {
  const { context, page, errors } = await consolePage();
  await assertAccessible(page, 'sign-in');
  await shot(page, 'sign-in');
  await signIn(page, supportToken);
  assert.match(await page.getByText(/^Signed in as/).textContent(), /support-console \(support, read only\)/);

  await view(page, 'Sessions');
  const rows = page.locator('#sessions-table tbody tr');
  assert.equal(await rows.count(), 3, 'three sessions, newest first');
  assert.match(await rows.first().textContent(), new RegExp(sessions.waiting));
  await assertAccessible(page, 'sessions');
  await shot(page, 'sessions');

  // By buyer: the same three; by id: the session's page with its timeline.
  await page.getByLabel('Session id or buyer id').fill(BUYER);
  await page.getByRole('button', { name: 'Find' }).click();
  await page.getByText(`Sessions of buyer ${BUYER}, newest first`).waitFor();
  await page.getByLabel('Session id or buyer id').fill(sessions.paid);
  await page.getByRole('button', { name: 'Find' }).click();
  await page.getByRole('heading', { name: `Session ${sessions.paid}` }).waitFor();
  const timeline = await page.locator('#timeline-table tbody').textContent();
  for (const action of ['checkout_created', 'payment_failed', 'retry_requested', 'retry_initiated', 'payment_succeeded', 'double_payment_detected']) {
    assert.ok(timeline.includes(action), `timeline shows ${action}`);
  }
  assert.match(await page.locator('#session-facts').textContent(), /Statussucceeded/);
  await page.getByText('Merchant webhook deliveries are shown to admins.').waitFor();
  await assertAccessible(page, 'session');
  await shot(page, 'session');

  // Dead letters and webhook deliveries are admin routes (DESIGN.md §3): support is told so.
  await view(page, 'Dead letters');
  await page.getByText('Dead letters are shown to admins only.').waitFor();
  assert.equal(await page.getByRole('button', { name: /^Redrive/ }).count(), 0, 'support gets no Redrive');
  await assertAccessible(page, 'dead letters (support)');

  await view(page, 'Failed webhooks');
  await page.getByText('Webhook deliveries are shown to admins only.').waitFor();
  await assertAccessible(page, 'failed webhooks (support)');

  await view(page, 'Double payments');
  assert.match(await page.locator('#duplicates-table tbody').textContent(), /detected/);
  await assertAccessible(page, 'double payments');
  await shot(page, 'double-payments');
  assert.deepEqual(errors, []);
  await context.close();
});

test('an admin redrives a dead letter and watches the session go back to retry_scheduled, then open', { timeout: 120_000 }, async () => {
  const { context, page, errors } = await consolePage();
  await signIn(page, adminToken);
  await view(page, 'Dead letters');
  await assertAccessible(page, 'dead letters (admin)');
  await shot(page, 'dead-letters');
  // The provider is slow to create the redriven retry's checkout: long enough to see the
  // session scheduled, and for the page's own refresh to show it open afterwards.
  stripe.state.delayMs = 8000;
  await page.getByRole('button', { name: `Redrive dead letter 1 of session ${sessions.stuck}` }).click();
  await page.getByText(`Dead letter 1 redriven: session ${sessions.stuck} is scheduled again.`).waitFor();
  await page.getByRole('button', { name: `Open session ${sessions.stuck}` }).waitFor({ state: 'detached' });

  await view(page, 'Sessions');
  await page.getByRole('button', { name: `Open session ${sessions.stuck}` }).click();
  await page.getByRole('heading', { name: `Session ${sessions.stuck}` }).waitFor();
  assert.match(await page.locator('#session-facts').textContent(), /Statusretry_scheduled/);
  assert.ok((await page.locator('#timeline-table tbody').textContent()).includes('retry_redriven'));
  // No reload: the page refreshes itself.
  await page.locator('#session-facts').getByText('open', { exact: true }).waitFor({ timeout: 30_000 });
  stripe.state.delayMs = 0;
  assert.deepEqual(errors, []);
  await context.close();
});

test('an admin redelivers a failed webhook with the same webhook-id', { timeout: 120_000 }, async () => {
  const { context, page, errors } = await consolePage();
  await signIn(page, adminToken);
  await view(page, 'Failed webhooks');
  const failed = (await api('GET', '/admin/webhook-deliveries?status=failed&limit=100', adminToken)).body.deliveries;
  assert.ok(failed.length >= 8, `${failed.length} failed deliveries`);
  assert.equal(await page.locator('#deliveries-table tbody tr').count(), failed.length);
  await assertAccessible(page, 'failed webhooks (admin)');
  await shot(page, 'failed-webhooks');

  receiver.state.status = 204;
  const target = failed[0];
  await page.getByRole('button', { name: `Redeliver ${target.type} event ${target.eventId}` }).click();
  await page.getByText(`Delivery ${target.id} (${target.type}) queued again.`).waitFor();
  await until('the redelivery accepted', async () => receiver.state.received.some((r) => r.id === target.eventId && r.status === 204));
  const bodies = receiver.state.received.filter((r) => r.id === target.eventId).map((r) => r.body);
  assert.ok(bodies.length >= 3 && bodies.every((b) => b === bodies[0]), 'the same body every time');
  await page.getByRole('button', { name: `Redeliver ${target.type} event ${target.eventId}` }).waitFor({ state: 'detached', timeout: 30_000 });

  // The session's own view lists its merchant events with where each stands.
  await page.getByRole('button', { name: `Open session ${target.paymentSessionId}` }).first().click();
  await page.getByRole('heading', { name: `Session ${target.paymentSessionId}` }).waitFor();
  await loaded(page);
  await page.locator('#events-table tbody').getByText('delivered').first().waitFor();
  assert.deepEqual(errors, []);
  await context.close();
});

test('the funnel shows the retries this test made', { timeout: 60_000 }, async () => {
  const { context, page, errors } = await consolePage();
  await signIn(page, supportToken);
  await view(page, 'Retry funnel');
  const stats = (await api('GET', '/admin/stats/retries?since=24h', supportToken)).body;
  const row = page.locator('#funnel-table tbody tr').first();
  const cells = (await row.locator('td').allTextContents()).map((t) => t.trim());
  assert.equal(await row.locator('th').textContent(), 'Retry 1');
  // Three retries asked for; one paid ($25.00 recovered); the other two hold live checkouts.
  assert.equal(cells[0], '3');
  assert.equal(cells[2], '1');
  assert.equal(cells[7], '$25.00');
  const a = stats.attempts[0];
  assert.deepEqual(cells.slice(0, 7), [a.scheduled, a.checkoutCreated, a.paid, a.failedAgain, a.abandoned, a.deadLettered, a.inProgress].map(String));
  await assertAccessible(page, 'funnel');
  await shot(page, 'funnel');
  await page.getByLabel('Last 7 days').check();
  await page.getByText('Retries requested in the last 7 days, by attempt').waitFor();
  assert.deepEqual(errors, []);
  await context.close();
});

test('keyboard only: sign in, move between views, open a session', { timeout: 60_000 }, async () => {
  const { context, page, errors } = await consolePage({ axe: false });
  const tabTo = async (matches, key = 'Tab', limit = 40) => {
    for (let i = 0; i < limit; i++) {
      await page.keyboard.press(key);
      if (await page.evaluate(matches)) return;
    }
    throw new Error('never reached by Tab: ' + matches);
  };
  await tabTo(() => document.activeElement?.id === 'token');
  await page.keyboard.insertText(adminToken);
  await page.keyboard.press('Tab');
  await page.keyboard.press('Enter');
  await page.getByText(/^Signed in as admin-console/).waitFor();
  await tabTo(() => document.activeElement?.textContent === 'Retry funnel');
  await page.keyboard.press('Enter');
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), 'Retry funnel', 'focus moves to the view heading');
  await tabTo(() => document.activeElement?.dataset?.view === 'sessions', 'Shift+Tab');
  await page.keyboard.press('Enter');
  await page.getByRole('button', { name: `Open session ${sessions.waiting}` }).waitFor();
  await tabTo(() => document.activeElement?.getAttribute('aria-label')?.startsWith('Open session '));
  const opened = await page.evaluate(() => document.activeElement.textContent);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: `Session ${opened}` }).waitFor();
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), `Session ${opened}`);
  assert.deepEqual(errors, []);
  await context.close();
});

test('an expired token sends the operator back to sign in, saying why', { timeout: 60_000 }, async () => {
  const { context, page } = await consolePage();
  await signIn(page, adminToken);
  await view(page, 'Dead letters');
  // A token the server no longer accepts (its signature broken): the next refresh says so.
  await page.evaluate(() => {
    const key = 'payretry.console.token';
    sessionStorage.setItem(key, sessionStorage.getItem(key).slice(0, -2) + 'xx');
  });
  await page.reload();
  await page.getByText('Your token has expired or is no longer valid. Paste a new one.').waitFor();
  assert.ok(await page.getByLabel('Access token').isVisible());
  assert.equal(await page.evaluate(() => sessionStorage.getItem('payretry.console.token')), null);
  await context.close();
});
