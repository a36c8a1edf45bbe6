// The fencepost console. Plain JS, no build step, nothing loaded from
// elsewhere (the server's Content-Security-Policy forbids it anyway).
//
// Data comes from the admin API's JSON endpoints; changes arrive on
// GET /v1/events, read with fetch() and a streaming body reader rather
// than EventSource, because EventSource cannot send an Authorization
// header and the admin token must never be in a URL. The token lives in
// this tab's memory only: a reload asks for it again.
//
// Every value from the server is put into the page as text
// (textContent), never as HTML.
'use strict';

const PAGE = 50;
const AUDIT_ROWS = 50;
const TIMELINE_ROWS = 500;

const state = {
  token: null,
  stream: null,
  lists: {
    leases: { q: '', offset: 0, total: 0, rows: [] },
    fences: { q: '', offset: 0, total: 0, rows: [] },
  },
  audit: { kind: '', resource: '' },
  timeline: '',
  replicas: 0,
  deadlines: [], // [element, monotonic deadline]
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function headers() {
  return state.token ? { Authorization: 'Bearer ' + state.token } : {};
}

class Unauthorized extends Error {}

async function api(path) {
  const resp = await fetch(path, { headers: headers(), cache: 'no-store' });
  if (resp.status === 401) throw new Unauthorized(path);
  if (!resp.ok) throw new Error(path + ': ' + resp.status);
  return { body: await resp.json(), total: Number(resp.headers.get('x-total-count') || 0) };
}

// ---- sign-in ------------------------------------------------------------

async function boot() {
  wire();
  // Without a token configured, the API answers as is.
  try {
    await api('/v1/replicas');
    start();
  } catch (e) {
    if (e instanceof Unauthorized) showSignin('');
    else showSignin('The admin API did not answer: ' + e.message);
  }
}

function showSignin(message) {
  stopStream();
  state.token = null;
  $('#app').hidden = true;
  $('#signout').hidden = true;
  $('#signin').hidden = false;
  $('#signin-error').textContent = message;
  $('#token').value = '';
  $('#token').focus();
}

async function signin(ev) {
  ev.preventDefault();
  const token = $('#token').value.trim();
  const err = $('#signin-error');
  err.textContent = '';
  state.token = token;
  try {
    await api('/v1/replicas');
  } catch (e) {
    state.token = null;
    err.textContent = e instanceof Unauthorized
      ? 'Wrong token: the admin API refused it (401).'
      : 'The admin API did not answer: ' + e.message;
    $('#token').select();
    return;
  }
  $('#token').value = '';
  $('#signin').hidden = true;
  $('#signout').hidden = !state.token;
  start();
}

function signout() {
  showSignin('Signed out.');
}

// ---- the views ----------------------------------------------------------

function start() {
  $('#app').hidden = false;
  $('#signin').hidden = true;
  $('#signout').hidden = !state.token;
  refreshAll();
  openStream();
}

function guard(promise) {
  return promise.catch((e) => {
    if (e instanceof Unauthorized) showSignin('The admin API no longer accepts the token; sign in again.');
    else console.warn(e);
  });
}

function refreshAll() {
  return Promise.all([
    guard(loadList('leases')),
    // The replicas first: how many there are decides the per-replica column.
    guard(loadReplicas()).then(() => guard(loadList('fences'))),
    guard(loadAudit()),
    guard(loadTimeline()),
  ]);
}

function listUrl(name) {
  const l = state.lists[name];
  const p = new URLSearchParams({ limit: PAGE, offset: l.offset });
  if (l.q) p.set('q', l.q);
  return '/v1/' + name + '?' + p;
}

async function loadList(name) {
  const { body, total } = await api(listUrl(name));
  const l = state.lists[name];
  l.rows = body;
  l.total = total;
  l.fetchedAt = performance.now();
  if (name === 'leases') renderLeases();
  else renderFences();
  $('#' + name + '-range').textContent = total === 0
    ? (l.q ? 'no match' : 'none')
    : `${l.offset + 1}\u2013${l.offset + body.length} of ${total}`;
}

function resourceLink(name) {
  return el('button', { type: 'button', class: 'link', 'data-resource': name, onclick: () => pick(name) }, name);
}

function renderLeases() {
  const l = state.lists.leases;
  const tbody = $('#leases tbody');
  state.deadlines = [];
  const rows = l.rows.map((r) => {
    const left = el('td', { class: 'left' });
    if (r.live) state.deadlines.push([left, l.fetchedAt + r.time_left_ms, r.ttl_ms]);
    else left.textContent = 'free';
    return el('tr', { 'data-resource': r.resource, class: r.live ? '' : 'idle' },
      el('td', {}, resourceLink(r.resource)),
      el('td', { class: 'holder' }, r.holder || '\u2014'),
      el('td', { class: 'token' }, r.token),
      left);
  });
  tbody.replaceChildren(...rows);
  tick();
}

// Counts every lease's time left down in place; a lease that runs out is
// re-read once (it may have been renewed, or have expired).
function tick() {
  const now = performance.now();
  let ran_out = false;
  for (const d of state.deadlines) {
    const [cell, deadline, ttl] = d;
    const left = Math.max(0, deadline - now);
    cell.textContent = left > 0 ? (left / 1000).toFixed(1) + ' s' : 'expired';
    cell.className = 'left ' + (left === 0 ? 'gone' : left < ttl / 3 ? 'low' : 'ok');
    if (left === 0 && !d.done) { d.done = true; ran_out = true; }
  }
  if (ran_out) setTimeout(() => guard(loadList('leases')), 500);
}

function renderFences() {
  const l = state.lists.fences;
  const perReplica = state.replicas > 1 && l.rows.some((r) => r.replicas);
  for (const th of document.querySelectorAll('#fences .per-replica')) th.hidden = !perReplica;
  const rows = l.rows.map((r) => {
    const cells = [
      el('td', {}, resourceLink(r.resource)),
      el('td', { class: 'token' }, String(r.token)),
      el('td', { class: 'when', title: r.updated_at }, ago(r.updated_at_ms)),
    ];
    if (perReplica) {
      const marks = Object.entries(r.replicas || {}).map(([id, t]) =>
        el('span', { class: 'mark ' + (String(t) === String(r.token) ? 'even' : 'behind') }, `${id}: ${t}`));
      cells.push(el('td', { class: 'per-replica' }, ...marks));
    }
    return el('tr', { 'data-resource': r.resource }, ...cells);
  });
  $('#fences tbody').replaceChildren(...rows);
}

async function loadReplicas() {
  const { body } = await api('/v1/replicas');
  const rows = body.replicas || [];
  state.replicas = rows.length;
  $('#replicas-panel').hidden = rows.length === 0;
  $('#replicas-summary').textContent = `${body.live} live of ${rows.length} (${body.store})`;
  $('#replicas tbody').replaceChildren(...rows.map((r) =>
    el('tr', { 'data-replica': r.id },
      el('td', {}, r.id),
      el('td', {}, r.addresses),
      el('td', { class: r.live ? 'ok' : 'gone' }, r.live ? 'live' : 'expired'),
      el('td', {}, ago(r.renewed_at_ms)))));
}

function auditUrl(extra) {
  const p = new URLSearchParams({ limit: AUDIT_ROWS });
  if (state.audit.kind) p.set('kind', state.audit.kind);
  if (state.audit.resource) p.set('resource', state.audit.resource);
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return '/v1/audit?' + p;
}

function auditRow(r, fresh) {
  return el('tr', { 'data-id': r.id, 'data-kind': r.kind, class: fresh ? 'fresh' : '' },
    el('td', { class: 'when', title: r.at }, r.at.replace('T', ' ').replace('Z', '')),
    el('td', {}, el('span', { class: 'kind ' + r.kind }, r.kind)),
    el('td', {}, r.resource ? resourceLink(r.resource) : '\u2014'),
    el('td', {}, r.holder || ''),
    el('td', { class: 'token' }, r.presented_token ?? ''),
    el('td', { class: 'token' }, r.current_token ?? ''),
    el('td', {}, r.reason || ''),
    // Who called, when the elector has identities, then from where.
    el('td', {}, r.identity ? `${r.identity} (${r.client_addr || ''})` : (r.client_addr || '')),
    el('td', { class: 'detail' }, r.detail || ''));
}

async function loadAudit() {
  if (state.audit.resource && !validName(state.audit.resource)) return;
  const { body } = await api(auditUrl());
  $('#audit tbody').replaceChildren(...body.map((r) => auditRow(r, false)));
  $('#audit-count').textContent = `newest ${body.length}`;
}

function matchesAudit(r) {
  return (!state.audit.kind || r.kind === state.audit.kind)
    && (!state.audit.resource || r.resource === state.audit.resource);
}

// Records from the event stream, oldest first.
function liveAudit(records) {
  const tbody = $('#audit tbody');
  for (const r of records) {
    if (!matchesAudit(r)) continue;
    tbody.prepend(auditRow(r, true));
  }
  while (tbody.children.length > AUDIT_ROWS) tbody.lastElementChild.remove();
}

function validName(s) {
  return s.length > 0 && s.length <= 256;
}

// ---- the timeline -------------------------------------------------------

function pick(resource) {
  state.timeline = resource;
  $('#timeline-resource').value = resource;
  guard(loadTimeline());
}

async function loadTimeline() {
  const r = state.timeline;
  const box = $('#timeline');
  if (!r || !validName(r)) {
    box.replaceChildren(el('p', { class: 'muted' }, 'Pick a resource to see its token advances and refusals.'));
    return;
  }
  const { body } = await api('/v1/audit?' + new URLSearchParams({ resource: r, limit: TIMELINE_ROWS }));
  if (state.timeline !== r) return;
  drawTimeline(r, body.slice().reverse());
}

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Token (y) over time (x): the granted tokens as a rising step line, each
// refused write as a red cross at the token it presented.
function drawTimeline(resource, records) {
  const box = $('#timeline');
  if (records.length === 0) {
    box.replaceChildren(el('p', { class: 'muted' }, `No audit records for ${resource}.`));
    return;
  }
  const W = Math.max(600, box.clientWidth || 900), H = 220, L = 64, R = 16, T = 16, B = 28;
  const points = records.map((r) => ({
    r,
    t: Date.parse(r.at),
    // A grant's token is its current_token; a refusal's, the one presented.
    tok: Number(r.presented_token ?? r.current_token ?? 0),
  }));
  const plotted = (p) => p.r.kind === 'lease_granted' || p.r.kind === 'refused_write';
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1000);
  const toks = points.filter(plotted).map((p) => p.tok).filter((n) => Number.isFinite(n));
  const lo = Math.min(...toks, 0), hi = Math.max(...toks, lo + 1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (n) => T + (1 - (n - lo) / (hi - lo)) * (H - T - B);
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': 'timeline of ' + resource });
  g.append(svg('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, class: 'axis' }));
  g.append(svg('line', { x1: L, y1: T, x2: L, y2: H - B, class: 'axis' }));
  g.append(svg('text', { x: L - 6, y: y(hi) + 4, class: 'tick end' }, String(hi)));
  g.append(svg('text', { x: L - 6, y: y(lo) + 4, class: 'tick end' }, String(lo)));
  g.append(svg('text', { x: L, y: H - 8, class: 'tick' }, new Date(t0).toLocaleTimeString()));
  g.append(svg('text', { x: W - R, y: H - 8, class: 'tick end' }, new Date(t1).toLocaleTimeString()));
  const grants = points.filter((p) => p.r.kind === 'lease_granted');
  let path = '';
  grants.forEach((p, i) => {
    path += (i === 0 ? 'M' : `H${x(p.t)} V`) + (i === 0 ? `${x(p.t)} ${y(p.tok)}` : `${y(p.tok)}`);
  });
  if (grants.length) {
    path += ` H${W - R}`;
    g.append(svg('path', { d: path, class: 'step' }));
  }
  for (const p of points) {
    const title = `${p.r.at} ${p.r.kind} ${p.r.holder || ''}` + (plotted(p) ? ` token ${p.tok}` : '');
    let mark;
    if (p.r.kind === 'lease_granted') {
      mark = svg('circle', { cx: x(p.t), cy: y(p.tok), r: 5, class: 'grant', 'data-kind': p.r.kind });
      g.append(svg('text', { x: x(p.t) + 7, y: y(p.tok) - 7, class: 'label' }, `${p.r.holder || ''} #${p.tok}`));
    } else if (p.r.kind === 'refused_write') {
      const cx = x(p.t), cy = y(p.tok);
      mark = svg('path', { d: `M${cx - 5} ${cy - 5}L${cx + 5} ${cy + 5}M${cx - 5} ${cy + 5}L${cx + 5} ${cy - 5}`, class: 'refused', 'data-kind': p.r.kind });
    } else {
      mark = svg('rect', { x: x(p.t) - 3, y: H - B - 8, width: 6, height: 6, class: 'other', 'data-kind': p.r.kind });
    }
    mark.append(svg('title', {}, title));
    g.append(mark);
  }
  const counts = {};
  for (const p of points) counts[p.r.kind] = (counts[p.r.kind] || 0) + 1;
  const summary = el('p', { class: 'summary' }, resource + ': ' +
    Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(', '));
  box.replaceChildren(summary, g);
}

// ---- live -------------------------------------------------------------

function setLive(on, text) {
  const b = $('#live');
  b.textContent = text;
  b.className = 'badge ' + (on ? 'on' : 'off');
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  setLive(false, 'offline');
}

async function openStream() {
  stopStream();
  const ctrl = new AbortController();
  state.stream = ctrl;
  setLive(false, 'connecting');
  try {
    const resp = await fetch('/v1/events', { headers: headers(), cache: 'no-store', signal: ctrl.signal });
    if (resp.status === 401) { showSignin('The admin API no longer accepts the token; sign in again.'); return; }
    if (!resp.ok || !resp.body) throw new Error('events: ' + resp.status);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, '\n');
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        dispatch(block);
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;
    console.warn(e);
  }
  if (state.stream !== ctrl) return;
  setLive(false, 'reconnecting');
  setTimeout(() => { if (state.stream === ctrl) { refreshAll(); openStream(); } }, 2000);
}

function dispatch(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const c = line.indexOf(':');
    const field = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? '' : line.slice(c + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  if (data.length === 0) return;
  let msg;
  try { msg = JSON.parse(data.join('\n')); } catch (e) { return; }
  switch (name) {
    case 'hello':
      setLive(true, 'live');
      break;
    case 'audit':
      if (msg.more) guard(loadAudit()); else liveAudit(msg.records);
      if (state.timeline && msg.records.some((r) => r.resource === state.timeline)) guard(loadTimeline());
      break;
    case 'leases':
      guard(loadList('leases'));
      break;
    case 'fences':
      guard(loadReplicas()).then(() => guard(loadList('fences')));
      break;
    case 'store': {
      const s = $('#store-state');
      s.hidden = msg.reachable;
      s.textContent = 'store unreachable';
      s.className = 'badge off';
      if (msg.reachable) refreshAll();
      break;
    }
  }
}

// ---- wiring -----------------------------------------------------------

function debounce(f, ms) {
  let t;
  return (...a) => { clearTimeout(t); t = setTimeout(() => f(...a), ms); };
}

function ago(ms) {
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return `${Math.max(0, s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toISOString().slice(0, 10);
}

function wire() {
  $('#signin-form').addEventListener('submit', signin);
  $('#signout').addEventListener('click', signout);
  for (const name of ['leases', 'fences']) {
    $('#' + name + '-q').addEventListener('input', debounce((ev) => {
      state.lists[name].q = ev.target.value.trim();
      state.lists[name].offset = 0;
      guard(loadList(name));
    }, 200));
  }
  for (const b of document.querySelectorAll('.pager button')) {
    b.addEventListener('click', () => {
      const l = state.lists[b.dataset.for];
      const next = l.offset + Number(b.dataset.dir) * PAGE;
      if (next < 0 || next >= Math.max(l.total, 1)) return;
      l.offset = next;
      guard(loadList(b.dataset.for));
    });
  }
  $('#audit-kind').addEventListener('change', (ev) => {
    state.audit.kind = ev.target.value;
    guard(loadAudit());
  });
  $('#audit-resource').addEventListener('input', debounce((ev) => {
    state.audit.resource = ev.target.value.trim();
    guard(loadAudit());
  }, 200));
  $('#timeline-resource').addEventListener('change', (ev) => pick(ev.target.value.trim()));
  setInterval(tick, 200);
}

document.addEventListener('DOMContentLoaded', boot);
