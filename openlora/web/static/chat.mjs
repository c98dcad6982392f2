// The chat view: conversations (kept in this browser), the adapter picker and mixing, a streamed
// answer with Stop and Regenerate, and under each answer its speed, node and receipt.
import { html, useEffect, useRef, useState } from "./ui.mjs";
import { streamChat } from "./api.mjs";
import { renderMarkdown } from "./markdown.mjs";
import { AdapterPicker } from "./picker.mjs";
import { ReceiptView } from "./receipt.mjs";
import { loadConversations, newConversation, saveConversations } from "./store.mjs";
import { formatOpen, shortHex } from "./units.mjs";

// "compose" sends the API's `adapters` (exact weighted composition per request); the others send
// `merge` (a merged adapter, built once and cached by the server; PEFT's strategies).
const MERGE_STRATEGIES = ["compose", "cat", "linear", "ties", "dare_linear", "dare_ties", "svd"];
const NEEDS_DENSITY = new Set(["ties", "dare_linear", "dare_ties"]);

function Message({ m, last, busy, onRegenerate, nodes }) {
  const [open, setOpen] = useState(false);
  if (m.role === "user")
    return html`<article class="msg user" aria-label="You"><div class="who">You</div><p class="plain">${m.content}</p></article>`;
  const meta = m.meta || {};
  return html`
    <article class="msg assistant" aria-label="Answer" aria-busy=${meta.streaming ? "true" : "false"}>
      <div class="who">${meta.model || "Assistant"}</div>
      <div class="md" dangerouslySetInnerHTML=${{ __html: renderMarkdown(m.content) }}></div>
      ${meta.error && html`<p class="error" role="alert">${meta.error}</p>`}
      ${!meta.streaming && html`
        <p class="meta">
          ${meta.ttft_ms != null && html`<span>TTFT ${meta.ttft_ms} ms</span>`}
          ${meta.tps != null && html`<span>${meta.tps} tok/s</span>`}
          ${meta.tokens != null && html`<span>${meta.tokens} tokens</span>`}
          ${meta.node && html`<span title=${meta.node}>node ${shortHex(meta.node)}</span>`}
          ${meta.fee != null && html`<span>fee ${formatOpen(meta.fee)}</span>`}
          ${meta.stopped && html`<span>stopped</span>`}
        </p>
        <div class="actions">
          ${meta.receipt_id && html`<button type="button" aria-expanded=${open} onClick=${() => setOpen(!open)}>
            ${open ? "Hide receipt" : "Receipt"}</button>`}
          ${last && html`<button type="button" disabled=${busy} onClick=${onRegenerate}>Regenerate</button>`}
        </div>
        ${open && meta.receipt_id && html`<${ReceiptView} id=${meta.receipt_id} servedBy=${meta.node} nodes=${nodes} />`}`}
    </article>`;
}

function MixPanel({ models, mix, setMix }) {
  const adapters = models.filter((m) => m.parent);
  if (!mix)
    return html`<button type="button" class="link" onClick=${() => setMix({ items: adapters.slice(0, 2).map((a) => ({ id: a.id, weight: 0.5 })), strategy: "compose" })}
      disabled=${adapters.length < 2}>Mix adapters…</button>`;
  const set = (i, patch) => setMix({ ...mix, items: mix.items.map((x, j) => (j === i ? { ...x, ...patch } : x)) });
  return html`
    <fieldset class="mix">
      <legend>Mix adapters</legend>
      ${mix.items.map((it, i) => html`
        <div class="mix-row" key=${i}>
          <${AdapterPicker} id=${"mix-" + i} label=${"Adapter " + (i + 1)} models=${adapters} value=${it.id} onChange=${(v) => set(i, { id: v })} />
          <label for=${"w-" + i}>Weight</label>
          <input id=${"w-" + i} type="number" step="0.1" min="-10" max="10" value=${it.weight}
                 onInput=${(e) => set(i, { weight: Number(e.target.value) })} />
          <button type="button" aria-label=${"Remove adapter " + (i + 1)} disabled=${mix.items.length <= 2}
                  onClick=${() => setMix({ ...mix, items: mix.items.filter((_, j) => j !== i) })}>×</button>
        </div>`)}
      <div class="mix-row">
        <button type="button" onClick=${() => setMix({ ...mix, items: [...mix.items, { id: adapters[0].id, weight: 0.5 }] })}
                disabled=${mix.items.length >= 16}>Add adapter</button>
        <label for="merge">Merge strategy</label>
        <select id="merge" value=${mix.strategy} onChange=${(e) => setMix({ ...mix, strategy: e.target.value })}>
          ${MERGE_STRATEGIES.map((s) => html`<option value=${s}>${s}</option>`)}
        </select>
        <button type="button" onClick=${() => setMix(null)}>Stop mixing</button>
      </div>
    </fieldset>`;
}

export function ChatView({ models, baseModel, nodes }) {
  const [convs, setConvs] = useState(() => loadConversations());
  const [curId, setCurId] = useState(() => convs[0]?.id || null);
  const [text, setText] = useState("");
  const [busy, setBusy] = useState(false);
  const [announce, setAnnounce] = useState("");
  const abort = useRef(null);
  const logRef = useRef(null);
  const cur = convs.find((c) => c.id === curId) || null;
  const model = cur?.model || models.find((m) => m.parent && m.state === "resident")?.id || models.find((m) => m.parent)?.id || baseModel;

  useEffect(() => saveConversations(convs), [convs]);
  useEffect(() => { const el = logRef.current; if (el) el.scrollTop = el.scrollHeight; });

  const update = (id, fn) => setConvs((list) => list.map((c) => (c.id === id ? fn(c) : c)));
  const ensure = () => {
    if (cur) return cur;
    const c = newConversation(model);
    setConvs((list) => [c, ...list]);
    setCurId(c.id);
    return c;
  };

  async function run(conv, history) {
    const id = conv.id;
    const mix = conv.mix;
    const body = { model: conv.model || model, messages: history.map(({ role, content }) => ({ role, content })), max_tokens: 256 };
    if (mix) {
      const items = mix.items.map(({ id: a, weight }) => ({ id: a, weight }));
      if (mix.strategy === "compose") body.adapters = items;
      else {
        body.model = baseModel; // a merge names its adapters itself; `model` is the base
        body.merge = { adapters: items, strategy: mix.strategy, ...(NEEDS_DENSITY.has(mix.strategy) ? { density: 0.5 } : {}) };
      }
    }
    const label = mix ? mix.items.map((x) => `${x.id}×${x.weight}`).join(" + ") : body.model;
    const meta = { streaming: true, model: label, at: Date.now() };
    update(id, (c) => ({ ...c, messages: [...history, { role: "assistant", content: "", meta }] }));
    setBusy(true);
    setAnnounce("");
    const ctl = new AbortController();
    abort.current = ctl;
    const t0 = performance.now();
    let tFirst = null;
    let acc = "";
    const patch = (p) => update(id, (c) => {
      const msgs = c.messages.slice();
      const last = msgs[msgs.length - 1];
      msgs[msgs.length - 1] = { ...last, content: acc, meta: { ...last.meta, ...p } };
      return { ...c, messages: msgs };
    });
    let result = null;
    let error = null;
    try {
      result = await streamChat(body, {
        signal: ctl.signal,
        onFirst: () => { tFirst = performance.now(); },
        onDelta: (piece) => { acc += piece; patch({}); },
      });
    } catch (e) {
      error = e.name === "AbortError" ? null
        : e.status === 402 ? "This node charges for answers: open the Wallet to deposit OPEN and authorize it."
        : e.message;
      result = { stopped: e.name === "AbortError" };
    }
    const tEnd = performance.now();
    const att = Array.isArray(result?.attribution) ? result.attribution[0] : result?.attribution;
    const tokens = result?.usage?.completion_tokens ?? null;
    const decodeS = tFirst != null ? (tEnd - tFirst) / 1000 : null;
    patch({
      streaming: false, error: error || result?.error || null, stopped: !!result?.stopped,
      ttft_ms: tFirst != null ? Math.round(tFirst - t0) : null, tokens,
      tps: tokens != null && tokens > 1 && decodeS > 0 ? Math.round(((tokens - 1) / decodeS) * 10) / 10 : null,
      node: result?.node || null, receipt_id: att?.receipt_id || null, fee: att?.fee ?? null,
    });
    abort.current = null;
    setBusy(false);
    dispatchEvent(new Event("openlora:answered"));
    // The log announces the finished answer itself (aria-busy held it back while it streamed).
    setAnnounce(error ? `The answer failed: ${error}` : result?.stopped ? "Answer stopped." : "");
  }

  function send() {
    const t = text.trim();
    if (!t || busy) return;
    const conv = ensure();
    const history = [...conv.messages, { role: "user", content: t }];
    if (conv.title === "New chat") update(conv.id, (c) => ({ ...c, title: t.slice(0, 40) }));
    setText("");
    run({ ...conv, model: conv.model || model }, history);
  }

  function regenerate() {
    if (!cur || busy) return;
    const msgs = cur.messages.slice();
    while (msgs.length && msgs[msgs.length - 1].role === "assistant") msgs.pop();
    if (msgs.length) run(cur, msgs);
  }

  const onKey = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  };

  return html`
    <div class="chat">
      <nav class="convs" aria-label="Conversations">
        <button type="button" onClick=${() => { const c = newConversation(model); setConvs([c, ...convs]); setCurId(c.id); }}>New chat</button>
        <ul>${convs.map((c) => html`<li key=${c.id}>
          <button type="button" class=${c.id === curId ? "current" : ""} aria-current=${c.id === curId ? "true" : undefined}
                  onClick=${() => setCurId(c.id)}>${c.title}</button></li>`)}</ul>
        ${convs.length > 0 && html`<button type="button" class="link" onClick=${() => { setConvs([]); setCurId(null); }}>Delete all chats</button>`}
      </nav>
      <section class="main" aria-label="Chat">
        <div class="controls">
          <${AdapterPicker} models=${models} value=${model}
            onChange=${(v) => { const c = ensure(); update(c.id, (x) => ({ ...x, model: v })); }} />
          <${MixPanel} models=${models} mix=${cur?.mix || null}
            setMix=${(mix) => { const c = ensure(); update(c.id, (x) => ({ ...x, mix })); }} />
        </div>
        <div class="log" role="log" aria-label="Conversation" aria-live="polite" aria-busy=${busy ? "true" : "false"} ref=${logRef}>
          ${!cur?.messages.length && html`<p class="empty">Pick an adapter and say something. Each answer shows who was paid for it.</p>`}
          ${cur?.messages.map((m, i) => html`<${Message} key=${i} m=${m} nodes=${nodes} busy=${busy}
              last=${i === cur.messages.length - 1 && m.role === "assistant"} onRegenerate=${regenerate} />`)}
        </div>
        <div class="sr-only" role="status" aria-live="polite">${announce}</div>
        <form class="composer" onSubmit=${(e) => { e.preventDefault(); send(); }}>
          <label for="message">Message</label>
          <textarea id="message" rows="2" value=${text} placeholder="Message (Enter sends, Shift+Enter adds a line)"
                    onInput=${(e) => setText(e.target.value)} onKeyDown=${onKey}></textarea>
          ${busy
            ? html`<button type="button" class="stop" onClick=${() => abort.current?.abort()}>Stop</button>`
            : html`<button type="submit" disabled=${!text.trim()}>Send</button>`}
        </form>
      </section>
    </div>`;
}
