// The web console: sign in, then the cluster's live status and one page per kind, with forms
// generated from the schema the node serves (GET /v1/schema). Pages are #/ fragments, so a
// reload keeps the page. Lists follow the watch stream (GET /v1/watch) and the cluster table the
// status stream (GET /v1/status/stream): changes made on any node show without a reload.
import { h, labelled, showError, call, when } from './common.js';

const main = document.getElementById('main');
const top = document.getElementById('top');
let me = null; // {name, role, csrf}
let schema = null; // {kinds: [...]}
let streams = []; // EventSources of the page shown; closed on navigation

const PAGES = [
  ['site', 'Sites', 'site'], ['user', 'Users', 'user'], ['group', 'Groups', 'group'],
  ['admin', 'Admins', 'admin'], ['settings', 'Settings', 'settings'],
  ['certificate', 'Certificates', 'certificate'], ['security', 'Security', 'security'],
  ['script', 'Scripts', 'script'], ['rule', 'Rules', 'rule'],
];
const ADMIN_WRITES = ['site', 'user', 'group', 'certificate', 'script', 'rule'];

const api = (method, path, body) => call(method, path, body, me && me.csrf);
const superadmin = () => me && me.role === 'superadmin';
const mayWrite = (kind) => superadmin() ? kind !== 'api_token' : ADMIN_WRITES.includes(kind);
const kindOf = (kind) => schema.kinds.find((k) => k.kind === kind);
const titleOf = (kind) => (PAGES.find((p) => p[0] === kind) || [kind, kind])[1];
const seg = encodeURIComponent;

function errorOf(r) {
  if (r.status === 401) { signedOut(); return { message: 'your session ended: sign in again' }; }
  return (r.body && r.body.error) || { message: `the node answered ${r.status}` };
}

function closeStreams() {
  for (const s of streams) s.close();
  streams = [];
}

function follow(path, events, onEvent) {
  const s = new EventSource(path);
  for (const e of events) s.addEventListener(e, onEvent);
  streams.push(s);
  return s;
}

function page(title, ...kids) {
  closeStreams();
  // A page part that is absent (null) is left out, not shown as text.
  main.replaceChildren(h('h1', {}, title), ...kids.filter((k) => k !== null && k !== undefined));
  document.title = `${title} · peerconf`;
  main.focus();
}

// ---- sign in and out

function signedOut() {
  me = null;
  closeStreams();
  top.replaceChildren();
  const general = h('p', { class: 'error', role: 'alert', hidden: true });
  const name = labelled('Name', h('input', { type: 'text', autocomplete: 'username', required: true }), null, 'name');
  const pw = labelled('Password', h('input', { type: 'password', autocomplete: 'current-password', required: true }), null, 'password');
  const submit = h('button', { type: 'submit' }, 'Log in');
  const f = h('form', { class: 'card narrow', novalidate: true }, general, name.row, pw.row, submit);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    const r = await call('POST', '/ui/login', { name: name.control.value, password: pw.control.value });
    submit.disabled = false;
    if (!r.ok) { showError(f, general, (r.body && r.body.error) || { message: `the node answered ${r.status}` }); return; }
    me = r.body;
    await start();
  });
  page('Sign in to peerconf', h('p', {}, 'Sign in with an Admin or SuperAdmin account of the cluster.'), f);
  name.control.focus();
}

async function logout() {
  await api('POST', '/v1/logout');
  location.hash = '';
  signedOut();
}

function nav() {
  const links = [['#/cluster', 'Cluster'], ...PAGES.map(([k, t]) => [`#/k/${k}`, t]), ['#/conflicts', 'Conflicts']];
  const current = location.hash || '#/cluster';
  const out = h('button', { type: 'button', class: 'link' }, 'Log out');
  out.addEventListener('click', logout);
  top.replaceChildren(h('nav', { 'aria-label': 'Console' },
    h('ul', {}, links.map(([href, text]) => h('li', {}, h('a', {
      href, 'aria-current': current === href || current.startsWith(`${href}/`) ? 'page' : null,
    }, text))))),
  h('p', { class: 'who' }, `Signed in as ${me.name} (${me.role}) `, out));
}

// ---- routing

async function route() {
  if (!me) return;
  nav();
  const parts = (location.hash.replace(/^#\/?/, '') || 'cluster').split('/').map(decodeURIComponent);
  try {
    if (parts[0] === 'cluster') return await cluster();
    if (parts[0] === 'conflicts') return await conflicts();
    if (parts[0] === 'k' && kindOf(parts[1])) {
      const kind = parts[1];
      if (parts[2] === 'new') return await edit(kind, null);
      if (parts[2] === 'edit') return await edit(kind, parts[3]);
      if (parts[2] === 'history') return await history(kind, parts[3]);
      const single = kindOf(kind).singleton;
      return single ? await edit(kind, single) : await list(kind);
    }
    page('Not found', h('p', {}, 'No such page. '), h('a', { href: '#/cluster' }, 'Cluster'));
  } catch (e) {
    page('Error', h('p', { class: 'error', role: 'alert' }, String(e)));
  }
}

// ---- cluster

function statusCell(n) {
  return h('td', { class: `status s-${String(n.status).toLowerCase()}` }, String(n.status));
}

function nodeRows(status, tbody, callouts) {
  const rows = [];
  const notes = [];
  for (const n of status.nodes || []) {
    const off = Number(n.clock_offset_ms || 0);
    if (n.status === 'CLOCK_DRIFT') notes.push(`Clock drift: ${n.name}'s clock is ${Math.round(off)} ms ${off >= 0 ? 'ahead of' : 'behind'} this node's.`);
    const mine = (status.nodes.find((x) => x.self) || {}).version;
    if (mine && n.version && n.version.split('.')[0] !== mine.split('.')[0]) notes.push(`Version mismatch: ${n.name} runs ${n.version}, this node ${mine}.`);
    const actions = h('td', {});
    if (superadmin() && !n.self) {
      const rm = h('button', { type: 'button', class: 'danger' }, `Remove ${n.name}`);
      rm.addEventListener('click', async () => {
        if (!confirm(`Remove node ${n.name} (${n.id}) from the cluster? It can come back only by joining again.`)) return;
        const r = await api('DELETE', `/v1/nodes/${seg(n.id)}`);
        callouts.replaceChildren(h('p', { class: r.ok ? 'ok' : 'error', role: 'alert' }, r.ok ? `${n.name} removed.` : errorOf(r).message));
      });
      actions.append(rm);
    }
    rows.push(h('tr', {},
      h('td', {}, n.self ? `${n.name} (this node)` : n.name),
      statusCell(n),
      h('td', {}, n.address || ''),
      h('td', {}, n.version || ''),
      h('td', {}, n.self ? 'now' : n.last_heartbeat_ms_ago === null || n.last_heartbeat_ms_ago === undefined ? 'never' : `${n.last_heartbeat_ms_ago} ms ago`),
      h('td', {}, n.rtt_ms === null || n.rtt_ms === undefined ? '' : `${n.rtt_ms} ms`),
      h('td', {}, `${Math.round(off)} ms`),
      h('td', {}, String(n.docs_out_of_sync ?? '')),
      h('td', {}, n.self ? '' : when(n.last_replication_cycle)),
      h('td', {}, n.last_error ? `${n.last_error.message} (${when(n.last_error.at_wall_ms)})` : 'none'),
      superadmin() ? actions : null));
  }
  tbody.replaceChildren(...rows);
  return notes;
}

async function cluster() {
  const r = await api('GET', '/v1/status');
  if (!r.ok) throw new Error(errorOf(r).message);
  const summary = h('p', { role: 'status' });
  const callouts = h('div', { class: 'callouts', 'aria-live': 'polite' });
  const tbody = h('tbody', {});
  const heads = ['Name', 'Status', 'Address', 'Version', 'Last heard', 'RTT', 'Clock offset', 'Out of sync', 'Last replication cycle', 'Last error'];
  if (superadmin()) heads.push('Actions');
  const table = h('table', {}, h('caption', {}, 'Nodes (updated live)'),
    h('thead', {}, h('tr', {}, heads.map((t) => h('th', { scope: 'col' }, t)))), tbody);
  const liveNote = h('p', { class: 'help', role: 'status' });
  const show = (st) => {
    summary.textContent = `This node: ${st.name}. Cluster ${st.cluster_id}: ${st.state}.`;
    const notes = nodeRows(st, tbody, callouts);
    callouts.replaceChildren(...notes.map((t) => h('p', { class: 'warn' }, `Warning: ${t}`)));
  };
  const kids = [summary, callouts, table, liveNote];
  if (superadmin()) kids.push(joinPanel(), drainPanel());
  page('Cluster', ...kids);
  show(r.body);
  const s = follow('/v1/status/stream', ['status'], (ev) => {
    liveNote.textContent = '';
    try { show(JSON.parse(ev.data)); } catch { /* a partial event: the next one follows */ }
  });
  s.onerror = () => { liveNote.textContent = 'Live updates interrupted: reconnecting…'; };
}

function joinPanel() {
  const out = h('div', {});
  const make = h('button', { type: 'button' }, 'Create join token');
  make.addEventListener('click', async () => {
    const r = await api('POST', '/v1/tokens', {});
    if (!r.ok) { out.replaceChildren(h('p', { class: 'error', role: 'alert' }, errorOf(r).message)); return; }
    const box = labelled('Join token', h('input', { type: 'text', readonly: true, value: r.body.token, class: 'wide' }),
      `single use, until ${when(r.body.expires_wall_ms)}; on the new node run peerconf setup, choose "Join an existing cluster" and give peer address ${r.body.ipc}`);
    const copy = h('button', { type: 'button' }, 'Copy');
    const copied = h('span', { role: 'status' });
    copy.addEventListener('click', async () => {
      try { await navigator.clipboard.writeText(box.control.value); copied.textContent = ' Copied.'; } catch { box.control.select(); copied.textContent = ' Selected: press Ctrl+C.'; }
    });
    out.replaceChildren(box.row, copy, copied);
  });
  return h('section', { class: 'card' }, h('h2', {}, 'Add a node'), make, out);
}

function drainPanel() {
  const general = h('p', { class: 'error', role: 'alert', hidden: true });
  const deadline = labelled('Drain deadline (seconds)', h('input', { type: 'number', min: 0, step: 1, placeholder: 'none' }),
    'optional: existing connections are closed after this long', 'deadline');
  const state = h('p', { role: 'status' });
  const drain = h('button', { type: 'submit' }, 'Drain this node');
  const undrain = h('button', { type: 'button' }, 'Undrain this node');
  const f = h('form', { novalidate: true }, general, deadline.row, drain, ' ', undrain, state);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const v = deadline.control.value.trim();
    const r = await api('POST', '/v1/drain', v ? { deadline: `${v}s` } : {});
    if (!r.ok) { showError(f, general, errorOf(r)); return; }
    showError(f, general, null);
    state.textContent = `Draining: new client connections are refused${v ? `; the rest close within ${v} s` : ''}.`;
  });
  undrain.addEventListener('click', async () => {
    const r = await api('POST', '/v1/undrain');
    if (!r.ok) { showError(f, general, errorOf(r)); return; }
    state.textContent = 'Not draining: new connections are accepted.';
  });
  return h('section', { class: 'card' }, h('h2', {}, 'Drain'), f);
}

// ---- lists

function summaryFields(k) {
  return k.fields.filter((f) => !f.secret && f.type !== 'text' && !['description'].includes(f.name)).slice(0, 3);
}

function show(v) {
  if (v === undefined || v === null) return '';
  if (Array.isArray(v)) return v.join(', ');
  return String(v);
}

async function list(kind) {
  const k = kindOf(kind);
  const cols = summaryFields(k);
  const tbody = h('tbody', {});
  const note = h('p', { role: 'status', class: 'help' });
  const load = async () => {
    const r = await api('GET', `/v1/entities/${kind}`);
    if (!r.ok) { note.textContent = errorOf(r).message; return; }
    const items = Array.isArray(r.body) ? r.body : (r.body.items || []);
    tbody.replaceChildren(...items.map((e) => {
      const acts = h('td', { class: 'actions' });
      const mine = kind === 'admin' && e.name === me.name;
      if (mayWrite(kind) || mine) acts.append(h('a', { href: `#/k/${kind}/edit/${seg(e.name)}`, class: 'button' }, `Edit ${e.name}`), ' ');
      acts.append(h('a', { href: `#/k/${kind}/history/${seg(e.name)}`, class: 'button' }, `History of ${e.name}`), ' ');
      if (mayWrite(kind)) {
        const del = h('button', { type: 'button', class: 'danger' }, `Delete ${e.name}`);
        del.addEventListener('click', async () => {
          if (!confirm(`Delete ${kind} ${e.name}? Every node deletes it.`)) return;
          const d = await api('DELETE', `/v1/entities/${kind}/${seg(e.name)}`);
          note.textContent = d.ok ? `${e.name} deleted.` : errorOf(d).message;
          await load();
        });
        acts.append(del);
      }
      return h('tr', {}, h('td', {}, e.name), cols.map((c) => h('td', {}, show(e.fields[c.name]))),
        e.conflicts ? h('td', {}, h('a', { href: '#/conflicts' }, 'conflict')) : h('td', {}, ''), acts);
    }));
    note.textContent = items.length ? '' : `No ${titleOf(kind).toLowerCase()} yet.`;
  };
  const kids = [h('p', {}, k.description)];
  if (mayWrite(kind)) kids.push(h('p', {}, h('a', { href: `#/k/${kind}/new`, class: 'button', role: 'button' }, `New ${kind}`)));
  kids.push(h('table', {}, h('caption', {}, `${titleOf(kind)} (updated live)`),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Name'), cols.map((c) => h('th', { scope: 'col' }, c.label)), h('th', { scope: 'col' }, 'Conflicts'), h('th', { scope: 'col' }, 'Actions'))),
    tbody), note);
  const live = h('p', { role: 'status', class: 'help' });
  kids.push(live);
  page(titleOf(kind), ...kids);
  // Subscribed before the list is read, so no change falls between the two: the stream is open
  // (the node subscribed it) before `load` reads.
  let pending = null;
  const s = follow(`/v1/watch?kind=${seg(kind)}`, ['put', 'delete', 'reset'], () => {
    clearTimeout(pending);
    pending = setTimeout(load, 100);
  });
  await new Promise((resolve) => { s.addEventListener('open', resolve, { once: true }); setTimeout(resolve, 3000); });
  await load();
  const following = () => { live.textContent = 'Live: changes made on any node show here as they are committed.'; };
  if (s.readyState === EventSource.OPEN) following();
  s.addEventListener('open', following);
  s.addEventListener('error', () => { live.textContent = 'Live updates interrupted: reconnecting…'; });
}

// ---- forms, from the schema

async function namesOf(kind) {
  const r = await api('GET', `/v1/entities/${kind}`);
  if (!r.ok) return [];
  return (Array.isArray(r.body) ? r.body : (r.body.items || [])).map((e) => e.name);
}

// One control per field: returns {row, read(), dirty(original)} where read() gives the value to
// send (undefined: send nothing).
async function control(f, value, secretSet) {
  const help = [f.doc, f.format && f.format !== 'text' && f.format !== 'password' ? `(${f.format})` : null].filter(Boolean).join(' ');
  if (f.secret) {
    // A private key spans lines, which a one-line input would drop: it gets an editing area that
    // starts empty like any secret input.
    const placeholder = secretSet ? 'set: leave empty to keep' : 'not set';
    const input = (f.format || '').startsWith('pem')
      ? h('textarea', { rows: 8, spellcheck: 'false', autocomplete: 'off', class: 'pem', placeholder })
      : h('input', { type: 'password', autocomplete: 'new-password', placeholder });
    const c = labelled(f.label, input,
      `${help} Write-only: ${secretSet ? 'a value is set' : 'no value is set'}; it is never shown.`, f.name);
    return { row: c.row, read: () => c.control.value ? c.control.value : undefined, secret: true };
  }
  if (f.type === 'bool') {
    const input = h('input', { type: 'checkbox', checked: value ?? f.default });
    const c = labelled(f.label, input, help, f.name);
    c.row.classList.add('check');
    return { row: c.row, read: () => input.checked };
  }
  if (f.type === 'int') {
    const c = labelled(f.label, h('input', { type: 'number', min: f.min, max: f.max, step: 1, value: value ?? '' }), help, f.name);
    return { row: c.row, read: () => c.control.value === '' ? undefined : Number(c.control.value) };
  }
  if (f.type === 'enum' || f.type === 'ref') {
    const options = f.type === 'enum' ? f.values : await namesOf(f.kind);
    const sel = h('select', {}, h('option', { value: '' }, f.type === 'ref' ? '(none)' : '(default)'),
      options.map((o) => h('option', { value: o }, o)));
    sel.value = value ?? '';
    const c = labelled(f.label, sel, help, f.name);
    return { row: c.row, read: () => sel.value === '' ? undefined : sel.value };
  }
  if (f.type === 'set') {
    const item = f.item || {};
    const current = Array.isArray(value) ? value : [];
    if (item.type === 'enum' || item.type === 'ref') {
      const options = item.type === 'enum' ? item.values : await namesOf(item.kind);
      const boxes = options.map((o) => { const id = `${f.name}-${o}`; return [o, h('input', { type: 'checkbox', id, checked: current.includes(o) })]; });
      const legendHelp = h('small', { class: 'help' }, help);
      const err = h('p', { class: 'error', role: 'alert', hidden: true });
      const row = h('fieldset', { class: 'field', 'data-field': f.name }, h('legend', {}, f.label), legendHelp,
        boxes.length ? boxes.map(([o, b]) => h('span', { class: 'check' }, b, h('label', { for: b.id }, o))) : h('p', {}, `No ${item.kind || 'values'} yet.`), err);
      return { row, read: () => boxes.filter(([, b]) => b.checked).map(([o]) => o) };
    }
    // Strings: an editable list, one input per item.
    const items = h('ul', { class: 'items' });
    const addItem = (v) => {
      const n = items.children.length + 1;
      const inp = h('input', { type: 'text', value: v, 'aria-label': `${f.label} item ${n}` });
      const rm = h('button', { type: 'button', class: 'link' }, `Remove ${f.label.toLowerCase()} item ${n}`);
      const li = h('li', {}, inp, rm);
      rm.addEventListener('click', () => li.remove());
      items.append(li);
      return inp;
    };
    current.forEach((v) => addItem(v));
    const add = h('button', { type: 'button' }, `Add to ${f.label.toLowerCase()}`);
    add.addEventListener('click', () => addItem('').focus());
    const err = h('p', { class: 'error', role: 'alert', hidden: true });
    const row = h('fieldset', { class: 'field', 'data-field': f.name }, h('legend', {}, f.label), h('small', { class: 'help' }, help), items, add, err);
    return { row, read: () => [...items.querySelectorAll('input')].map((i) => i.value.trim()).filter(Boolean) };
  }
  const long = f.type === 'text' || (f.format || '').startsWith('pem');
  const el = long
    ? h('textarea', { rows: f.type === 'text' ? 16 : 8, spellcheck: 'false', class: f.type === 'text' ? 'code' : 'pem' })
    : h('input', { type: f.format === 'email' ? 'email' : 'text', maxlength: f.max_len });
  el.value = value ?? '';
  const c = labelled(f.label, el, help, f.name);
  return { row: c.row, read: () => el.value === '' ? undefined : el.value };
}

async function edit(kind, name) {
  const k = kindOf(kind);
  let entity = null;
  if (name) {
    const r = await api('GET', `/v1/entities/${kind}/${seg(name)}`);
    if (r.status === 404 && k.singleton) entity = { name, fields: {} };
    else if (!r.ok) throw new Error(errorOf(r).message);
    else entity = r.body;
  }
  const ownPassword = kind === 'admin' && !superadmin();
  const writable = mayWrite(kind) || ownPassword;
  const general = h('p', { class: 'error', role: 'alert', hidden: true });
  const form = h('form', { class: 'card', novalidate: true }, general);
  let nameInput = null;
  if (!name) {
    nameInput = labelled('Name', h('input', { type: 'text', autocomplete: 'off', required: true }), `the ${kind}'s name, unique in the cluster`, 'name');
    form.append(nameInput.row);
  }
  const controls = [];
  for (const f of k.fields) {
    if (f.read_only) {
      if (entity && entity.fields[f.name] !== undefined) form.append(h('p', { class: 'field' }, h('strong', {}, `${f.label}: `), show(entity.fields[f.name])));
      continue;
    }
    if (ownPassword && f.name !== 'password') continue;
    const value = entity ? entity.fields[f.name] : undefined;
    const c = await control(f, value, entity && (entity.secrets_set || []).includes(f.name));
    controls.push([f, c]);
    form.append(c.row);
  }
  const status = h('p', { role: 'status' });
  if (writable) form.append(h('button', { type: 'submit' }, 'Save'), ' ');
  form.append(h('a', { href: k.singleton ? '#/cluster' : `#/k/${kind}`, class: 'button' }, k.singleton ? 'Back' : 'Cancel'), status);
  if (!writable) for (const c of form.querySelectorAll('input, select, textarea')) c.disabled = true;
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const fields = {};
    for (const [f, c] of controls) {
      const v = c.read();
      if (c.secret) { if (v !== undefined) fields[f.name] = v; continue; }
      if (entity) {
        const before = entity.fields[f.name];
        if (JSON.stringify(v) !== JSON.stringify(before)) fields[f.name] = v === undefined ? null : v;
      } else if (v !== undefined && !(Array.isArray(v) && v.length === 0)) {
        fields[f.name] = v;
      }
    }
    let r;
    const target = name || (nameInput && nameInput.control.value.trim());
    if (!target) { showError(form, general, { field: 'name', message: 'a name is needed' }); return; }
    if (entity && entity.kind) {
      if (Object.keys(fields).length === 0) { showError(form, general, null); status.textContent = 'Nothing changed.'; return; }
      r = await api('PATCH', `/v1/entities/${kind}/${seg(target)}`, fields);
    } else {
      r = await api('PUT', `/v1/entities/${kind}/${seg(target)}`, fields);
    }
    if (!r.ok) {
      const e = errorOf(r);
      if (!e.field && nameInput && /name/i.test(e.message)) e.field = 'name';
      showError(form, general, e);
      status.textContent = '';
      return;
    }
    showError(form, general, null);
    status.textContent = `Saved ${kind} ${target}.`;
    if (!k.singleton) location.hash = `#/k/${kind}`;
    else { entity = r.body && r.body.fields ? r.body : entity; }
  });
  const title = name ? (k.singleton ? titleOf(kind) : `Edit ${kind} ${name}`) : `New ${kind}`;
  const extra = name ? h('p', {}, h('a', { href: `#/k/${kind}/history/${seg(name)}` }, `History of ${name}`)) : null;
  page(title, h('p', {}, k.description), form, extra);
  if (nameInput) nameInput.control.focus();
}

// ---- history and conflicts

let nodeNames = {};
async function loadNodeNames() {
  const r = await api('GET', '/v1/status');
  if (r.ok) for (const n of r.body.nodes || []) nodeNames[n.id] = n.name;
}

async function history(kind, name) {
  const r = await api('GET', `/v1/entities/${kind}/${seg(name)}/history`);
  if (!r.ok) throw new Error(errorOf(r).message);
  await loadNodeNames();
  const rows = (r.body.changes || []).slice().reverse().map((c) => h('tr', {},
    h('td', {}, when(c.time_ms)), h('td', {}, c.by || 'unknown'), h('td', {}, c.from || ''),
    h('td', {}, nodeNames[c.node] || c.node || ''), h('td', {}, c.op || ''), h('td', {}, (c.fields || []).join(', '))));
  page(`History of ${kind} ${name}`,
    h('table', {}, h('caption', {}, 'Changes, newest first'),
      h('thead', {}, h('tr', {}, ['When', 'Who', 'From', 'Node', 'Operation', 'Fields'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows)),
    h('p', {}, h('a', { href: `#/k/${kind}` }, `Back to ${titleOf(kind)}`)));
}

async function conflicts() {
  const r = await api('GET', '/v1/conflicts');
  if (!r.ok) throw new Error(errorOf(r).message);
  await loadNodeNames();
  const out = [];
  for (const e of r.body.conflicts || []) {
    const hist = await api('GET', `/v1/entities/${e.kind}/${seg(e.name)}/history`);
    const changes = hist.ok ? hist.body.changes || [] : [];
    for (const [field, values] of Object.entries(e.conflicts || {})) {
      const writes = changes.filter((c) => (c.fields || []).includes(field)).slice(-4).reverse();
      const status = h('p', { role: 'status' });
      out.push(h('section', { class: 'card' },
        h('h2', {}, `${e.kind} ${e.name}: ${field}`),
        h('p', {}, 'Concurrent values (the one read now first):'),
        h('ul', {}, values.map((v, i) => {
          const b = h('button', { type: 'button' }, `Use ${JSON.stringify(v)}`);
          b.disabled = !mayWrite(e.kind);
          b.addEventListener('click', async () => {
            const w = await api('PATCH', `/v1/entities/${e.kind}/${seg(e.name)}`, { [field]: v });
            status.textContent = w.ok ? `${field} of ${e.name} is now ${JSON.stringify(v)}.` : errorOf(w).message;
            if (w.ok) setTimeout(conflicts, 300);
          });
          return h('li', {}, h('code', {}, JSON.stringify(v)), i === 0 ? ' (current) ' : ' ', b);
        })),
        h('p', {}, 'Where they came from (the latest writes of this field):'),
        h('ul', {}, writes.map((c) => h('li', {}, `${when(c.time_ms)}: ${c.by || 'unknown'} from ${c.from || 'a node'} on node ${nodeNames[c.node] || c.node}`))),
        status));
    }
  }
  page('Conflicts', h('p', {}, out.length ? 'Fields written concurrently on different nodes. Every node reads the same value; choose the one to keep.' : 'No conflicts: every field has one value.'), ...out);
}

// ---- start

async function start() {
  const s = await api('GET', '/v1/schema');
  if (!s.ok) { signedOut(); return; }
  schema = s.body;
  if (!location.hash || location.hash === '#') location.hash = '#/cluster';
  await route();
}

window.addEventListener('hashchange', route);
(async () => {
  const r = await call('GET', '/v1/whoami');
  if (r.status === 200 && r.body.csrf) { me = r.body; await start(); } else signedOut();
})();
