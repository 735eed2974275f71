// The web console and the Setup UI, as an operator uses them. Started by run.sh, which passes
// N1, N2 (admin API addresses of a running two-node cluster), ADMIN_PW (SuperAdmin `admin`),
// OPS_PW (Admin `ops`), N3_SETUP (a third node's Setup UI URL), N3_TOKEN (a join token),
// N1_IPC, N3_IPC, UNREACHABLE (addresses), PEERCONF_BIN and PEERCONF_TOKEN (for the CLI).
// Group `g` holds a conflict on home_dir (n1 wrote /srv/from-n1, n2 /srv/from-n2).
import { test, expect } from '@playwright/test';
import { execFileSync, spawn } from 'node:child_process';
import { openSync, readFileSync } from 'node:fs';

const env = (k) => { const v = process.env[k]; if (!v) throw new Error(`${k} is not set`); return v; };
const cli = (at, ...args) => execFileSync(env('PEERCONF_BIN'), ['--api', `http://${at}`, ...args], { encoding: 'utf8' });

// Every page must run under the Content-Security-Policy without errors.
let problems = [];
test.beforeEach(({ page }) => {
  problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/401|503|Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`); });
});
test.afterEach(() => { expect(problems).toEqual([]); });

// A screenshot of each page, kept in the folder run.sh names (target/web-screenshots by default).
const shot = (page, name) => page.screenshot({ path: `${env('SHOTS')}/${name}.png`, fullPage: true });

async function signIn(page, at, name, password) {
  await page.goto(`http://${at}/`);
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByLabel('Password', { exact: true }).fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await expect(page.getByRole('link', { name: 'Cluster', exact: true })).toBeVisible();
}

test('a wrong password is refused on the form', async ({ page }) => {
  await page.goto(`http://${env('N1')}/ui/`);
  await page.getByLabel('Name', { exact: true }).fill('admin');
  await page.getByLabel('Password', { exact: true }).fill('not-the-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await expect(page.getByRole('alert').filter({ hasText: /credentials|password|refused/i })).toBeVisible();
  await shot(page, 'sign-in-refused');
  await expect(page.getByRole('link', { name: 'Cluster', exact: true })).toHaveCount(0);
});

test('the cluster page lists both nodes live, with drain and undrain', async ({ page }) => {
  await signIn(page, env('N1'), 'admin', env('ADMIN_PW'));
  const row = (n) => page.getByRole('row').filter({ has: page.getByRole('cell', { name: new RegExp(`^${n}\\b`) }) });
  await expect(row('n1')).toContainText('ONLINE');
  await expect(row('n2')).toContainText('ONLINE');
  await shot(page, 'cluster');
  await page.getByLabel('Drain deadline (seconds)').fill('30');
  await page.getByRole('button', { name: 'Drain this node', exact: true }).click();
  await expect(page.getByText(/^Draining: new client connections are refused/)).toBeVisible();
  await expect(row('n1')).toContainText('DRAINING', { timeout: 5_000 });
  await page.getByRole('button', { name: 'Undrain this node' }).click();
  await expect(row('n1')).toContainText('ONLINE', { timeout: 5_000 });
});

test('lists follow the watch stream: a change made on another node shows without a reload', async ({ page }) => {
  await signIn(page, env('N2'), 'admin', env('ADMIN_PW'));
  await page.getByRole('link', { name: 'Users', exact: true }).click();
  // The page says when it follows the stream; from then on no change is missed.
  await expect(page.getByText(/^Live: changes made on any node/)).toBeVisible();
  cli(env('N1'), 'put', 'user', 'live-bob', '--json', '{"home_dir":"/srv/bob","site":"main"}');
  await expect(page.getByRole('cell', { name: 'live-bob', exact: true })).toBeVisible({ timeout: 5_000 });
  await shot(page, 'users-live');
  cli(env('N1'), 'delete', 'user', 'live-bob');
  await expect(page.getByRole('cell', { name: 'live-bob', exact: true })).toHaveCount(0, { timeout: 5_000 });
});

test('forms come from the schema: pickers, write-only secrets, lists, validation next to the field', async ({ page }) => {
  await signIn(page, env('N1'), 'admin', env('ADMIN_PW'));
  await page.getByRole('link', { name: 'Users', exact: true }).click();
  await page.getByRole('button', { name: 'New user' }).click();
  await page.getByLabel('Name', { exact: true }).fill('carol');
  // A reference is a picker of the sites that exist; an enum set is a group of checkboxes.
  await expect(page.getByLabel('Site', { exact: true }).locator('option')).toContainText(['(none)', 'main']);
  await page.getByLabel('Site', { exact: true }).selectOption('main');
  await page.getByLabel('read', { exact: true }).check();
  // A string set is an editable list.
  await page.getByRole('button', { name: 'Add to allowed ips' }).click();
  await page.getByLabel('Allowed IPs item 1').fill('not-an-address');
  await page.getByLabel('Password', { exact: true }).fill('Carol-password-1');
  await page.getByLabel('Home directory').fill('/srv/carol');
  await page.getByRole('button', { name: 'Save' }).click();
  // Refused next to the list, in the schema's words; nothing else is lost from the form.
  const listError = page.locator('[data-field="allowed_ips"] .error');
  await expect(listError).toBeVisible();
  await expect(listError).toContainText(/allowed_ips/);
  await page.getByLabel('Allowed IPs item 1').fill('10.0.0.0/8');
  await page.getByRole('button', { name: 'Save' }).click();
  await expect(page.getByRole('cell', { name: 'carol', exact: true })).toBeVisible();
  const user = JSON.parse(cli(env('N1'), 'get', 'user', 'carol'));
  expect(user.fields.site).toBe('main');
  expect(user.fields.allowed_ips).toEqual(['10.0.0.0/8']);
  expect(user.fields.permissions).toEqual(['read']);
  expect(JSON.stringify(user)).not.toContain('Carol-password-1');
  // The secret is write-only: the edit form says it is set and shows nothing of it.
  await page.getByRole('link', { name: 'Edit carol' }).click();
  const pw = page.getByLabel('Password', { exact: true });
  await expect(pw).toHaveValue('');
  await expect(pw).toHaveAttribute('type', 'password');
  await expect(page.getByText(/a value is set/)).toBeVisible();
  // Scripts are edited in a code area.
  await page.getByRole('link', { name: 'Scripts', exact: true }).click();
  await page.getByRole('button', { name: 'New script' }).click();
  await expect(page.getByLabel('Source', { exact: true })).toHaveClass(/code/);
  // Delete asks first.
  await page.getByRole('link', { name: 'Users', exact: true }).click();
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Delete carol' }).click();
  await expect(page.getByRole('cell', { name: 'carol', exact: true })).toHaveCount(0);
});

// Every kind's page: a value the schema refuses is shown next to its field (the form keeps what
// was typed), then the corrected form saves, and the node holds what the form sent. Fields are
// found by their data-field, and every control of the form must have an accessible name.
const PEM = () => ({ cert: readFileSync(env('CERT_PEM'), 'utf8'), key: readFileSync(env('KEY_PEM'), 'utf8') });
const FORMS = [
  { kind: 'site', title: 'Sites', name: 'ui-site', fill: { root_dir: '/srv/ui' }, check: ['protocols-sftp'],
    bad: ['bindings', 'not-an-address', '0.0.0.0:2224'], expect: { bindings: ['0.0.0.0:2224'], root_dir: '/srv/ui', protocols: ['sftp'] } },
  { kind: 'user', title: 'Users', name: 'ui-user', fill: { home_dir: '/srv/ui-user', password: 'Ui-user-password-1' },
    bad: ['email', 'not-an-email', 'ui@example.com'], expect: { email: 'ui@example.com', home_dir: '/srv/ui-user' }, secrets: ['password'] },
  { kind: 'group', title: 'Groups', name: 'ui-group', fill: { description: 'made in the browser' },
    bad: ['home_dir', 'relative/dir', '/srv/ui-group'], expect: { home_dir: '/srv/ui-group', description: 'made in the browser' } },
  { kind: 'admin', title: 'Admins', name: 'ui-admin', select: { role: 'admin' },
    bad: ['password', 'short', 'Ui-admin-password-1'], expect: { role: 'admin' }, secrets: ['password'] },
  { kind: 'settings', title: 'Settings', name: 'global', singleton: true,
    bad: ['replication_interval_ms', '5', '5000'], expect: { replication_interval_ms: 5000 } },
  { kind: 'certificate', title: 'Certificates', name: 'ui-cert', fill: () => ({ key_pem: PEM().key }),
    bad: ['cert_pem', 'not a certificate', () => PEM().cert], expect: { subject: 'CN=ui.example' }, secrets: ['key_pem'] },
  { kind: 'security', title: 'Security', name: 'global', singleton: true,
    bad: ['max_login_attempts', '-1', '6'], expect: { max_login_attempts: 6 } },
  { kind: 'script', title: 'Scripts', name: 'ui-script', select: { language: 'shell' }, fill: { source: 'echo "$1"\n' },
    bad: ['name', 'bad name!', 'ui-script'], expect: { source: 'echo "$1"\n' } },
  { kind: 'rule', title: 'Rules', name: 'ui-rule', select: { event: 'after_upload', script: 'ui-script' },
    bad: ['priority', '5000', '5'], expect: { priority: 5, script: 'ui-script', event: 'after_upload' } },
];

test('every kind\'s form: a refused value is shown next to its field, the corrected form saves', async ({ page }) => {
  await signIn(page, env('N1'), 'admin', env('ADMIN_PW'));
  for (const c of FORMS) {
    await page.getByRole('link', { name: c.title, exact: true }).click();
    if (!c.singleton) {
      await shot(page, `${c.kind}-list`);
      await page.getByRole('button', { name: `New ${c.kind}` }).click();
    }
    const form = page.locator('#main form');
    await expect(form.getByRole('button', { name: 'Save' })).toBeVisible();
    // No part of the page is a stray "null".
    expect(await page.locator('#main').evaluate((m) => [...m.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim()))).not.toContain('null');
    for (const control of await form.locator('input, select, textarea').all()) await expect(control).toHaveAccessibleName(/\S/);
    const at = (field) => form.locator(`[data-field="${field}"]`);
    const set = async (field, value) => {
      const box = at(field);
      if (await box.locator('ul.items').count()) {
        if (!(await box.locator('ul.items input').count())) await box.getByRole('button', { name: /^Add to / }).click();
        await box.locator('ul.items input').first().fill(value);
      } else {
        await box.locator('input, textarea').first().fill(value);
      }
    };
    const [badField, badValue, fixed] = c.bad;
    if (!c.singleton && badField !== 'name') await set('name', c.name);
    for (const [f, v] of Object.entries(typeof c.fill === 'function' ? c.fill() : c.fill || {})) await set(f, v);
    for (const [f, v] of Object.entries(c.select || {})) await at(f).locator('select').selectOption(v);
    for (const id of c.check || []) await form.locator(`#${id}`).check();
    await set(badField, badValue);
    await form.getByRole('button', { name: 'Save' }).click();
    const error = at(badField).locator('.error');
    await expect(error, `${c.kind}: the refusal of ${badField}`).toBeVisible();
    await expect(error).not.toBeEmpty();
    await shot(page, `${c.kind}-refused`);
    await set(badField, typeof fixed === 'function' ? fixed() : fixed);
    await form.getByRole('button', { name: 'Save' }).click();
    if (c.singleton) {
      await expect(page.getByText(`Saved ${c.kind} ${c.name}.`)).toBeVisible();
      await expect(at(badField).locator('.error')).toBeHidden();
    } else {
      await expect(page.getByRole('cell', { name: c.name, exact: true })).toBeVisible();
    }
    const saved = JSON.parse(cli(env('N1'), 'get', c.kind, c.name));
    for (const [f, v] of Object.entries(c.expect)) expect(saved.fields[f], `${c.kind}.${f}`).toEqual(v);
    for (const f of c.secrets || []) expect(saved.secrets_set, `${c.kind}: ${f} is set`).toContain(f);
    expect(JSON.stringify(saved)).not.toMatch(/PRIVATE KEY|Ui-user-password-1|Ui-admin-password-1/);
  }
});

// A node killed without warning turns OFFLINE in the table without a reload, and ONLINE again
// when it runs again.
test('a killed node shows OFFLINE live, and ONLINE once it runs again', async ({ page }) => {
  await signIn(page, env('N1'), 'admin', env('ADMIN_PW'));
  const row = (n) => page.getByRole('row').filter({ has: page.getByRole('cell', { name: new RegExp(`^${n}\\b`) }) });
  await expect(row('n2')).toContainText('ONLINE');
  process.kill(Number(env('N2_PID')), 'SIGKILL');
  await expect(row('n2')).toContainText('OFFLINE', { timeout: 10_000 });
  await expect(page.getByText(/n2/).first()).toBeVisible();
  await shot(page, 'cluster-node-offline');
  const log = openSync(`${env('WORK')}/n2.log`, 'a');
  spawn(env('PEERCONF_BIN'), ['run', '--data-dir', `${env('WORK')}/n2`], { detached: true, stdio: ['ignore', log, log] }).unref();
  await expect(row('n2')).toContainText('ONLINE', { timeout: 20_000 });
});

test('a conflict shows both values and where they came from; one click resolves it', async ({ page }) => {
  await signIn(page, env('N1'), 'admin', env('ADMIN_PW'));
  await page.getByRole('link', { name: 'Conflicts', exact: true }).click();
  const section = page.locator('section').filter({ has: page.getByRole('heading', { name: 'group g: home_dir' }) });
  await expect(section).toContainText('/srv/from-n1');
  await expect(section).toContainText('/srv/from-n2');
  await expect(section).toContainText('on node n1');
  await expect(section).toContainText('on node n2');
  await shot(page, 'conflicts');
  await section.getByRole('button', { name: 'Use "/srv/from-n2"' }).click();
  await expect(page.getByText('No conflicts: every field has one value.')).toBeVisible({ timeout: 10_000 });
  await expect.poll(() => JSON.parse(cli(env('N2'), 'get', 'group', 'g')).fields.home_dir, { timeout: 10_000 }).toBe('/srv/from-n2');
  // The history says who changed what, from where and on which node.
  await page.getByRole('link', { name: 'Groups', exact: true }).click();
  await page.getByRole('link', { name: 'History of g' }).click();
  const rows = page.getByRole('row');
  await expect(rows.filter({ hasText: 'home_dir' }).first()).toContainText('admin');
  await expect(rows.filter({ hasText: 'n2' }).first()).toBeVisible();
  await shot(page, 'history');
});

test('an Admin is not offered what only a SuperAdmin may do', async ({ page }) => {
  await signIn(page, env('N1'), 'ops', env('OPS_PW'));
  await expect(page.getByText('Signed in as ops (admin)')).toBeVisible();
  await expect(page.getByRole('button', { name: 'Create join token' })).toHaveCount(0);
  await expect(page.getByRole('button', { name: 'Drain this node', exact: true })).toHaveCount(0);
  await page.getByRole('link', { name: 'Admins', exact: true }).click();
  await expect(page.getByRole('button', { name: 'New admin' })).toHaveCount(0);
  // Only its own account is listed.
  await expect(page.getByRole('cell', { name: 'ops', exact: true })).toBeVisible();
  await expect(page.locator('tbody tr')).toHaveCount(1);
  await shot(page, 'admins-as-admin');
  await page.getByRole('link', { name: 'Settings', exact: true }).click();
  await expect(page.getByRole('button', { name: 'Save' })).toHaveCount(0);
  await expect(page.getByLabel('Heartbeat interval (ms)')).toBeDisabled();
  await page.getByRole('link', { name: 'Groups', exact: true }).click();
  await expect(page.getByRole('button', { name: 'New group' })).toBeVisible();
});

test('the Setup UI shows each refusal next to its field, and the corrected form joins', async ({ page }) => {
  await page.goto(env('N3_SETUP'));
  await shot(page, 'setup');
  await page.getByRole('button', { name: 'Join an existing cluster' }).click();
  const form = page.locator('#join-form');
  await form.getByLabel('Node name').fill('n3');
  await form.getByLabel('IPC listen address').fill(env('N1_IPC'));
  await form.getByLabel('Peer address').fill(env('UNREACHABLE'));
  await form.getByLabel('Join token').fill('pcjoin1-not-a-token');
  await form.getByRole('button', { name: 'Join cluster' }).click();
  const errorOf = (name) => form.locator(`[data-field="${name}"] .error`);
  await expect(errorOf('ipc_listen')).toContainText(/in use/i);
  await expect(form.getByLabel('IPC listen address')).toHaveAttribute('aria-invalid', 'true');
  await shot(page, 'setup-join-refused');
  await form.getByLabel('IPC listen address').fill(env('N3_IPC'));
  await form.getByRole('button', { name: 'Join cluster' }).click();
  await expect(errorOf('token')).toContainText(/not a join token/i);
  await expect(errorOf('ipc_listen')).toBeHidden();
  await form.getByLabel('Join token').fill(env('N3_TOKEN'));
  await form.getByRole('button', { name: 'Join cluster' }).click();
  await expect(errorOf('peer')).toContainText(/join failed/i);
  await form.getByLabel('Peer address').fill(env('N1_IPC'));
  await form.getByRole('button', { name: 'Join cluster' }).click();
  await expect(page.getByLabel('Name', { exact: true })).toBeVisible({ timeout: 30_000 });
  await page.getByLabel('Name', { exact: true }).fill('admin');
  await page.getByLabel('Password', { exact: true }).fill(env('ADMIN_PW'));
  await page.getByRole('button', { name: 'Log in' }).click();
  const row = (n) => page.getByRole('row').filter({ has: page.getByRole('cell', { name: new RegExp(`^${n}\\b`) }) });
  await expect(row('n3')).toContainText('ONLINE', { timeout: 20_000 });
  await expect(row('n1')).toContainText('ONLINE', { timeout: 20_000 });
  // Removing a node asks first; a dismissed question removes nothing.
  page.once('dialog', (d) => d.dismiss());
  await page.getByRole('button', { name: 'Remove n2' }).click();
  await expect(row('n2')).toBeVisible();
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Remove n2' }).click();
  await expect(page.getByText('n2 removed.')).toBeVisible();
  await expect(row('n2')).toHaveCount(0, { timeout: 10_000 });
});
