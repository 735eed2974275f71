// The Setup UI: create a new cluster, or join one with a token. Every request carries the
// one-time setup code from the URL's fragment (#code=...), which never leaves the browser
// otherwise.
import { h, labelled, showError, call, sleep } from './common.js';

const main = document.getElementById('main');
const code = new URLSearchParams(location.hash.slice(1)).get('code') || '';

function input(type, extra = {}) {
  return h('input', { type, ...extra });
}

function form(kind) {
  const general = h('p', { class: 'error', role: 'alert', hidden: true });
  const rows = [
    labelled('Node name', input('text', { autocomplete: 'off', required: true }), 'this node\'s name in the cluster: 1 to 64 of A-Z a-z 0-9 . _ -', 'node_name'),
    labelled('IPC listen address', input('text', { placeholder: '127.0.0.1:7701', required: true }), 'address:port where this node talks to its peers (mutual TLS)', 'ipc_listen'),
    labelled('IPC advertise address', input('text', { placeholder: 'optional' }), 'optional: host:port peers use to reach this node, when it differs from the listen address', 'ipc_advertise'),
  ];
  if (kind === 'create') {
    rows.push(
      labelled('Admin name', input('text', { value: 'admin', autocomplete: 'username', required: true }), 'the first SuperAdmin account of the cluster', 'admin_name'),
      labelled('Password', input('password', { autocomplete: 'new-password', required: true }), 'its password (the security policy\'s minimum length applies)', 'password'),
      labelled('Confirm password', input('password', { autocomplete: 'new-password', required: true }), null, 'confirm_password'),
    );
  } else {
    rows.push(
      labelled('Peer address', input('text', { placeholder: '10.0.0.1:7701', required: true }), 'the IPC address of a node of the cluster', 'peer'),
      labelled('Join token', input('text', { autocomplete: 'off', required: true }), 'made on a node of the cluster: its console\'s Cluster page, or peerconf token create', 'token'),
    );
  }
  const status = h('p', { role: 'status', 'aria-live': 'polite' });
  const submit = h('button', { type: 'submit' }, kind === 'create' ? 'Create cluster' : 'Join cluster');
  const f = h('form', { class: 'card', id: `${kind}-form`, hidden: true, novalidate: true },
    h('h2', {}, kind === 'create' ? 'Create a new cluster' : 'Join an existing cluster'),
    general, rows.map((r) => r.row), submit, status);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = { code };
    for (const r of rows) body[r.control.name] = r.control.value;
    submit.disabled = true;
    status.textContent = kind === 'create' ? 'Creating the cluster…' : 'Joining the cluster…';
    const r = await call('POST', kind === 'create' ? '/setup/create' : '/setup/join', body);
    if (!r.ok) {
      submit.disabled = false;
      status.textContent = '';
      showError(f, general, (r.body && r.body.error) || { message: `refused (${r.status})` });
      return;
    }
    showError(f, general, null);
    status.textContent = `Node ${r.body.name} is set up. Starting it…`;
    // The same process now starts the node on this address: wait until its API answers.
    for (let i = 0; i < 600; i++) {
      const w = await call('GET', '/v1/whoami');
      if (w.status === 401 || w.status === 200) break;
      await sleep(200);
    }
    location.assign(r.body.next || '/ui/');
  });
  return f;
}

function render() {
  if (!code) {
    main.append(h('p', { class: 'error', role: 'alert' },
      'This page needs the setup code: open the exact URL that peerconf setup printed (it ends with #code=...).'));
    return;
  }
  const create = form('create');
  const join = form('join');
  const choose = (show, hide, btn, other) => () => {
    show.hidden = false; hide.hidden = true;
    btn.setAttribute('aria-pressed', 'true'); other.setAttribute('aria-pressed', 'false');
    show.querySelector('input').focus();
  };
  const bCreate = h('button', { type: 'button', 'aria-pressed': 'false' }, 'Create a new cluster');
  const bJoin = h('button', { type: 'button', 'aria-pressed': 'false' }, 'Join an existing cluster');
  bCreate.addEventListener('click', choose(create, join, bCreate, bJoin));
  bJoin.addEventListener('click', choose(join, create, bJoin, bCreate));
  main.append(
    h('p', {}, 'This node does not exist yet. Make it the first node of a new cluster, or add it to a cluster with a join token made on one of its nodes.'),
    h('div', { class: 'choices' }, bCreate, bJoin),
    create, join);
}

render();
