// The buyer's side of the retry story in headless Chromium: /pay/{id} and the sandbox
// checkout, against a real `payretry serve` on a throw-away SQLite file.
//
//   node --test --test-concurrency=1 tests/browser/story.spec.mjs     (or tests/browser/run.sh)
//
// Environment: PAYRETRY_BIN (default $CARGO_TARGET_DIR/debug/payretry, else target/debug/payretry),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR (default docs/screenshots).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const binary = process.env.PAYRETRY_BIN
  ? path.resolve(repoRoot, process.env.PAYRETRY_BIN)
  : path.join(path.resolve(repoRoot, process.env.CARGO_TARGET_DIR || 'target'), 'debug', 'payretry');
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = path.resolve(repoRoot, process.env.SCREENSHOT_DIR || 'docs/screenshots');
const PHONE = { width: 390, height: 844 };
const INSUFFICIENT_FUNDS =
  'Your bank declined the payment for insufficient funds. You can try again or use another card.';

let server; // { child, base, logs() }
let browser;
let token;
let dataDir;

// ---------------------------------------------------------------- server

function serverEnv() {
  return {
    ...process.env,
    PAYRETRY_DATABASE_URL: `sqlite://${path.join(dataDir, 'payretry.db')}`,
    PAYRETRY_LISTEN: '127.0.0.1:0',
    PAYRETRY_RETRY_DELAYS: '2s,2s,2s',
    PAYRETRY_PROVIDER: 'sandbox',
    PAYRETRY_QUEUE: 'embedded',
    RUST_LOG: process.env.RUST_LOG || 'info',
  };
}

const stripAnsi = (s) => s.replace(/\x1b\[[0-9;]*m/g, '');

function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(binary, ['serve'], { env: serverEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const collect = (chunk) => {
      out += chunk.toString();
      const ready = stripAnsi(out).match(/payretry ready.*?public_url=(http:\/\/\S+)/);
      if (ready && !server) {
        server = { child, base: ready[1], logs: () => stripAnsi(out) };
        resolve(server);
      }
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('error', reject);
    child.on('exit', (code) => {
      if (!server) reject(new Error(`payretry serve exited with ${code}:\n${stripAnsi(out)}`));
    });
    setTimeout(() => reject(new Error(`payretry serve not ready after 30 s:\n${stripAnsi(out)}`)), 30_000).unref();
  });
}

async function createCheckout(description) {
  const r = await fetch(`${server.base}/payments/checkout`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ amount: 2500, currency: 'usd', description }),
  });
  assert.equal(r.status, 201, await r.clone().text());
  return r.json();
}

async function apiStatus(id) {
  const r = await fetch(`${server.base}/payments/checkout/${id}/status`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  assert.equal(r.status, 200);
  return r.json();
}

before(async () => {
  dataDir = mkdtempSync(path.join(tmpdir(), 'payretry-browser-'));
  mkdirSync(shots, { recursive: true });
  const { stdout } = await promisify(execFile)(binary, ['token', '--sub', 'buyer-1', '--role', 'buyer'], {
    env: serverEnv(),
  });
  token = stdout.trim();
  assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/, 'payretry token prints a JWT');
  await startServer();
  browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  if (server) {
    const exited = new Promise((resolve) => server.child.once('exit', resolve));
    server.child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    if (server.child.exitCode === null) server.child.kill('SIGKILL');
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- browser helpers

async function phonePage() {
  const context = await browser.newContext({
    viewport: PHONE,
    deviceScaleFactor: 1,
    isMobile: true,
    hasTouch: true,
    locale: 'en-US',
    timezoneId: 'UTC',
  });
  const page = await context.newPage();
  const seen = { requests: [], consoleErrors: [] };
  page.on('request', (req) => seen.requests.push({ url: req.url(), method: req.method(), headers: req.headers() }));
  page.on('console', (msg) => msg.type() === 'error' && seen.consoleErrors.push(msg.text()));
  page.on('pageerror', (err) => seen.consoleErrors.push(String(err)));
  return { context, page, seen };
}

/** The node Chromium's accessibility tree exposes for `role` + accessible `name`. */
async function axNode(page, role, name) {
  const cdp = await page.context().newCDPSession(page);
  try {
    const { nodes } = await cdp.send('Accessibility.getFullAXTree');
    const node = nodes.find((n) => !n.ignored && n.role?.value === role && n.name?.value === name);
    if (!node) return null;
    const props = Object.fromEntries((node.properties || []).map((p) => [p.name, p.value?.value]));
    return { name: node.name?.value, description: node.description?.value || '', ...props };
  } finally {
    await cdp.detach();
  }
}

/** Fails if visible text in the page is under WCAG AA contrast (4.5:1, 3:1 for large text). */
async function assertContrast(page, label) {
  const problems = await page.evaluate(() => {
    const parse = (c) => {
      const m = c.match(/rgba?\(([^)]+)\)/);
      if (!m) return null;
      const [r, g, b, a = 1] = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
      return { r, g, b, a };
    };
    const lum = ({ r, g, b }) => {
      const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = parse(getComputedStyle(e).backgroundColor);
        if (c && c.a > 0.5) return c;
      }
      return { r: 255, g: 255, b: 255, a: 1 };
    };
    const out = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      const el = n.parentElement;
      if (!n.textContent.trim() || !el || !el.checkVisibility?.() || el.closest('.sr-only')) continue;
      const style = getComputedStyle(el);
      const fg = parse(style.color), bg = background(el);
      const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
      const ratio = (hi + 0.05) / (lo + 0.05);
      const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
      const need = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
      if (ratio < need) out.push(`${ratio.toFixed(2)} < ${need}: "${n.textContent.trim().slice(0, 40)}"`);
    }
    return out;
  });
  assert.deepEqual(problems, [], `${label}: low-contrast text`);
}

/** Fails if the page scrolls sideways on a 360 px-wide phone. */
async function assertFitsNarrowPhone(page, label) {
  const viewport = page.viewportSize();
  await page.setViewportSize({ width: 360, height: 740 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  await page.setViewportSize(viewport);
  assert.ok(overflow <= 0, `${label}: ${overflow}px horizontal overflow at 360 px`);
}

const liveRegion = (page) => page.getByRole('status');

async function declineAtSandbox(page, reason) {
  await page.getByRole('heading', { name: 'Sandbox checkout' }).waitFor();
  await page.getByLabel('Decline reason').selectOption(reason);
  await Promise.all([
    page.waitForURL((url) => url.pathname.startsWith('/pay/')),
    page.getByRole('button', { name: 'Decline', exact: true }).click(),
  ]);
}

// ---------------------------------------------------------------- scenarios

test('decline, retry with a countdown, decline again until no retries are left', { timeout: 180_000 }, async () => {
  const created = await createCheckout('Order 123');
  const id = created.sessionId;
  const { context, page, seen } = await phonePage();

  // Per press: every POST /payments/retry and its Idempotency-Key, and the replay flag.
  const presses = [];
  page.on('response', async (res) => {
    if (res.request().method() === 'POST' && res.url().includes('/payments/retry/')) {
      presses.push({ key: res.request().headers()['idempotency-key'], status: res.status(), replayed: res.headers()['idempotent-replayed'] });
    }
  });
  // The first press's first POST reaches the server, but its answer is "lost": the page must
  // re-send the SAME Idempotency-Key and get the stored answer back, with no second retry.
  let dropNext = false;
  const lost = [];
  await page.route('**/payments/retry/**', async (route) => {
    if (!dropNext) return route.continue();
    dropNext = false;
    const res = await route.fetch();
    lost.push({ key: route.request().headers()['idempotency-key'], status: res.status() });
    await route.abort('connectionreset');
  });

  await page.goto(`${server.base}/pay/${id}#token=${token}`);
  await liveRegion(page).getByText('Your checkout is ready.').waitFor();
  assert.equal(new URL(page.url()).hash, '', 'the token is cleared from the address bar');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('payretry.token')), token);
  assert.equal(await page.locator('meta[name="referrer"]').getAttribute('content'), 'no-referrer');
  await page.getByText('Amount: $25.00').waitFor();
  assert.equal(await page.getByRole('button', { name: 'Retry payment' }).count(), 0, 'no Retry while the checkout is open');

  // Keyboard: the checkout link is reachable and its focus ring is visible.
  const checkoutLink = page.getByRole('link', { name: 'Continue to checkout' });
  await page.keyboard.press('Tab');
  assert.equal(await checkoutLink.evaluate((el) => el === document.activeElement), true, 'first Tab stop is the checkout link');
  const outline = await checkoutLink.evaluate((el) => { const s = getComputedStyle(el); return `${s.outlineStyle} ${s.outlineWidth}`; });
  assert.match(outline, /^solid [3-9]/, 'visible focus ring');

  // Attempt 0: follow the link to the sandbox and decline.
  await Promise.all([page.waitForURL(/\/sandbox\/checkout\//), checkoutLink.click()]);
  await page.getByText('First checkout for this payment.').waitFor();
  await assertContrast(page, 'sandbox checkout');
  await assertFitsNarrowPhone(page, 'sandbox checkout');
  assert.ok(await page.getByRole('button', { name: 'Pay 25.00 USD' }).isVisible());
  await page.screenshot({ path: path.join(shots, 'sandbox-checkout.png') });
  await declineAtSandbox(page, 'insufficient_funds');

  await liveRegion(page).getByText(INSUFFICIENT_FUNDS).waitFor();
  assert.match(await liveRegion(page).innerText(), /Your payment did not go through\./);
  assert.equal(new URL(page.url()).search, '', 'the ?result= is tidied away');
  await page.getByText('3 retries left of 3.').waitFor();
  const retry = page.getByRole('button', { name: 'Retry payment' });
  assert.equal(await retry.isEnabled(), true);
  await assertContrast(page, 'status failed');
  await assertFitsNarrowPhone(page, 'status failed');
  await page.screenshot({ path: path.join(shots, 'status-failed.png') });

  // Three retries, each declined.
  for (let n = 1; n <= 3; n++) {
    dropNext = n === 2;
    await retry.click();
    if (n !== 2) {
      // (Press 2 loses its first answer, so its countdown may already be over when shown.)
      const countdown = page.getByRole('timer');
      await countdown.getByText(/Your new checkout will be ready in \d+ seconds?\./).waitFor({ timeout: 5000 });
      if (n === 1) await page.screenshot({ path: path.join(shots, 'retry-countdown.png') });
      const during = await axNode(page, 'button', 'Retry payment');
      assert.equal(during.disabled, true, 'Retry is disabled while a retry is scheduled');
      assert.match(during.description, /A retry is already on its way\./);
      if (n === 1) await assertContrast(page, 'retry countdown');
    }

    // After the countdown the page fetches until the new checkout is ready.
    const newCheckout = page.getByRole('link', { name: 'Continue to your new checkout' });
    await newCheckout.waitFor({ timeout: 20_000 });
    await liveRegion(page).getByText('Your new checkout is ready.').waitFor();
    assert.equal(await newCheckout.evaluate((el) => el === document.activeElement), true, 'focus follows to the new checkout');
    const status = await apiStatus(id);
    assert.equal(status.status, 'open');
    assert.equal(status.retryAttempts, n, `exactly ${n} retries so far`);
    assert.equal(await newCheckout.getAttribute('href'), status.checkoutUrl);

    await Promise.all([page.waitForURL(/\/sandbox\/checkout\//), newCheckout.click()]);
    await page.getByText(`Retry ${n} for this payment.`).waitFor();
    await declineAtSandbox(page, 'insufficient_funds');
    await liveRegion(page).getByText(INSUFFICIENT_FUNDS).waitFor();
  }

  // No retries left: the button stays, disabled, and says why.
  await page.getByText('All 3 retries have been used.').waitFor();
  const disabled = page.getByRole('button', { name: 'Retry payment', disabled: true });
  await disabled.waitFor();
  const ax = await axNode(page, 'button', 'Retry payment');
  assert.equal(ax.disabled, true);
  assert.equal(ax.focusable, true, 'aria-disabled keeps it in the focus order so the reason can be found');
  assert.match(ax.description, /no retries left/i);
  await assertContrast(page, 'no retries left');
  await page.screenshot({ path: path.join(shots, 'no-retries-left.png') });
  const before = presses.length;
  await disabled.focus(); // still in the focus order; pressing it does nothing
  await page.keyboard.press('Enter');
  await disabled.click({ force: true });
  await page.waitForTimeout(500);
  assert.equal(presses.length, before, 'a disabled Retry sends nothing');
  const final = await apiStatus(id);
  assert.equal(final.retryUnavailableReason, 'limit_reached');
  assert.equal(final.retryAttempts, 3);
  await page.mouse.move(0, 0);
  await assertContrast(page, 'no retries left, focused');

  // One Idempotency-Key per press; the lost answer was re-sent with the same key and replayed.
  assert.equal(lost.length, 1);
  assert.equal(lost[0].status, 202, 'the first POST did reach the server');
  const keys = presses.map((p) => p.key);
  assert.equal(presses.length, 3, `three answered POSTs: ${JSON.stringify(presses)}`);
  assert.equal(keys[1], lost[0].key, 'the re-sent POST reused the press\u2019s key');
  assert.equal(presses[1].replayed, 'true');
  assert.equal(presses[0].replayed, undefined);
  assert.equal(new Set(keys).size, 3, 'a new key for every press');
  for (const key of keys) assert.match(key, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);

  // The token never went anywhere but the Authorization header of same-origin API calls.
  for (const req of seen.requests) {
    assert.ok(!req.url.includes(token), `token in a request URL: ${req.method} ${req.url}`);
    assert.ok(!(req.headers.referer || '').includes(token), `token in a Referer: ${req.url}`);
    if (req.headers.authorization) assert.ok(new URL(req.url).pathname.startsWith('/payments/'), req.url);
  }
  assert.ok(seen.requests.some((r) => r.url.includes('/sandbox/checkout/') && !r.headers.referer), 'no Referer to the checkout');
  assert.deepEqual(seen.consoleErrors.filter((e) => !/Failed to load resource|ERR_CONNECTION_RESET/.test(e)), []);
  await context.close();
});

test('paying ends on the paid page', { timeout: 60_000 }, async () => {
  const { sessionId: id } = await createCheckout('Order 456');
  const { context, page, seen } = await phonePage();
  await page.goto(`${server.base}/pay/${id}#token=${token}`);
  const link = page.getByRole('link', { name: 'Continue to checkout' });
  await Promise.all([page.waitForURL(/\/sandbox\/checkout\//), link.click()]);
  await Promise.all([
    page.waitForURL((url) => url.pathname === `/pay/${id}`),
    page.getByRole('button', { name: 'Pay 25.00 USD' }).click(),
  ]);
  await page.getByRole('heading', { name: 'Payment received' }).waitFor();
  await liveRegion(page).getByText('Payment received. Thank you!').waitFor();
  await page.getByText('We received your payment of $25.00.').waitFor();
  assert.equal(await page.getByRole('button', { name: 'Retry payment' }).count(), 0);
  assert.equal(await page.getByRole('link', { name: /checkout/ }).count(), 0);
  assert.equal(await page.title(), 'Payment received – Your payment');
  assert.equal((await apiStatus(id)).status, 'succeeded');
  await assertContrast(page, 'paid');
  await assertFitsNarrowPhone(page, 'paid');
  await page.screenshot({ path: path.join(shots, 'paid.png') });

  // The sandbox checkout is now closed.
  await page.goBack();
  await page.getByText('This checkout is paid.').waitFor();
  assert.deepEqual(seen.consoleErrors, []);
  await context.close();
});

test('a link without a token explains itself and calls nothing', async () => {
  const { sessionId: id } = await createCheckout('Order 789');
  const { context, page, seen } = await phonePage();
  await page.goto(`${server.base}/pay/${id}`);
  await liveRegion(page).getByText('This payment link is incomplete.', { exact: false }).waitFor();
  assert.equal(seen.requests.filter((r) => r.url.includes('/payments/')).length, 0);

  // A wrong token: the API says 401 and the page says the link has expired.
  await page.goto('about:blank');
  await page.goto(`${server.base}/pay/${id}#token=not-a-jwt`);
  await liveRegion(page).getByText('Your payment link has expired.', { exact: false }).waitFor();
  await context.close();
});

test('the server logs never contain the token', async () => {
  const logs = server.logs();
  assert.ok(logs.includes('/pay/{session_id}'), 'the page requests were logged');
  assert.ok(!logs.includes(token), 'the bearer token leaked into the logs');
  const signature = token.split('.')[2];
  assert.ok(!logs.includes(signature), 'the token signature leaked into the logs');
});
