// Shared by the Setup UI and the console: building DOM nodes (never HTML from strings) and
// calling the node's JSON API.

// h('p', {class: 'x', onclick: f}, 'text', child): an element with attributes, listeners and
// children (strings become text nodes).
export function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

let serial = 0;
export const uid = (prefix) => `${prefix}-${++serial}`;

// A labelled control with its help text and the slot its error is shown in, next to it.
// `control` is an input, select or textarea (given an id here); returns {row, control, error}.
export function labelled(label, control, help, name) {
  const id = control.id || uid('f');
  control.id = id;
  if (name) control.name = name;
  const helpId = `${id}-help`;
  const errId = `${id}-error`;
  const error = h('p', { class: 'error', id: errId, role: 'alert', hidden: true });
  const described = [help ? helpId : null, errId].filter(Boolean).join(' ');
  control.setAttribute('aria-describedby', described);
  const row = h('div', { class: 'field', 'data-field': name || '' },
    h('label', { for: id }, label),
    control,
    help ? h('small', { id: helpId, class: 'help' }, help) : null,
    error);
  return { row, control, error };
}

// Shows an API error: next to the field it names when the form has it, else in `general`.
export function showError(form, general, err) {
  for (const e of form.querySelectorAll('.error')) { e.hidden = true; e.textContent = ''; }
  for (const c of form.querySelectorAll('[aria-invalid]')) c.removeAttribute('aria-invalid');
  if (!err) return;
  const slot = err.field ? form.querySelector(`.field[data-field="${CSS.escape(err.field)}"] .error`) : null;
  const target = slot || general;
  target.textContent = err.message || 'refused';
  target.hidden = false;
  if (slot) {
    const control = slot.parentElement.querySelector('input, select, textarea');
    if (control) { control.setAttribute('aria-invalid', 'true'); control.focus(); }
  }
}

// Calls the API: {status, ok, body} (body is the parsed JSON, or {error: {message}}).
export async function call(method, path, body, csrf) {
  const headers = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (csrf) headers['x-csrf-token'] = csrf;
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    return { status: 0, ok: false, body: { error: { message: `the node cannot be reached (${e.message})` } } };
  }
  let parsed = null;
  const text = await resp.text();
  try { parsed = text ? JSON.parse(text) : null; } catch { parsed = { error: { message: text } }; }
  return { status: resp.status, ok: resp.ok, body: parsed };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function when(ms) {
  if (ms === null || ms === undefined) return 'never';
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
}
