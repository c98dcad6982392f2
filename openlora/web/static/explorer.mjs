// The explorer: this browser's receipts, what they paid to whom, the node's epochs with their
// settlement transactions, and the Merkle proof that puts a receipt in its epoch's root.
import { html, useEffect, useState } from "./ui.mjs";
import { getJSON, getOptional } from "./api.mjs";
import { ReceiptView, settlementText } from "./receipt.mjs";
import { loadConversations, myReceipts } from "./store.mjs";
import { formatOpen, shortHex, units } from "./units.mjs";
import { proofVerifies } from "./verify.mjs";

const MAX_RECEIPTS = 100;

function Proof({ id }) {
  const [p, setP] = useState(null);
  useEffect(() => { getJSON(`/v1/receipts/${id}/proof`).then(setP, (e) => setP({ error: e.message })); }, [id]);
  if (!p) return html`<p>Loading proof…</p>`;
  if (p.error) return html`<p class="error">${p.error}</p>`;
  if (p.epoch == null) return html`<p>No proof yet: the receipt's epoch is not closed.</p>`;
  const ok = proofVerifies(p.receipt_id, p.proof, p.root);
  return html`
    <section class="proof" aria-label="Merkle proof">
      <h3>Merkle proof</h3>
      <p>Leaf ${p.index} of epoch ${p.epoch}; root <code class="hash">${p.root}</code></p>
      <ol>${p.proof.map((s) => html`<li><code class="hash">${s}</code></li>`)}</ol>
      <p class=${ok ? "ok" : "bad"}>${ok ? "The proof verifies against the epoch root (checked in this browser)." : "The proof does NOT verify."}</p>
    </section>`;
}

export function ExplorerView({ nodes }) {
  const [rows, setRows] = useState(null);
  const [epochs, setEpochs] = useState(undefined);
  const [picked, setPicked] = useState(null);
  useEffect(() => {
    const mine = myReceipts(loadConversations()).slice(0, MAX_RECEIPTS);
    Promise.all(mine.map(async (m) => {
      try {
        const [r, p] = await Promise.all([getJSON(`/v1/receipts/${m.id}`), getOptional(`/v1/receipts/${m.id}/proof`)]);
        return { ...m, r, p };
      } catch (e) { return { ...m, error: e.message }; }
    })).then(setRows);
    getOptional("/v1/epochs").then((e) => setEpochs(e ? e.data : null), () => setEpochs(null));
  }, []);
  const balances = new Map();
  for (const row of rows || [])
    for (const p of row.r?.payouts || []) {
      const b = balances.get(p.recipient) || { total: 0n, roles: new Set() };
      b.total += units(p.amount);
      b.roles.add(p.role);
      balances.set(p.recipient, b);
    }
  return html`
    <div class="explorer">
      <section aria-labelledby="mine-h">
        <h2 id="mine-h">Your receipts</h2>
        <p class="hint">The receipts of the answers in this browser's chats (newest ${MAX_RECEIPTS}); the server lists nobody's receipts.</p>
        ${rows == null ? html`<p>Loading…</p>` : rows.length === 0 ? html`<p>No receipts yet: chat first.</p>` : html`
        <table>
          <thead><tr><th scope="col">Receipt</th><th scope="col">Chat</th><th scope="col" class="num">Fee</th><th scope="col">Settlement</th></tr></thead>
          <tbody>${rows.map((row) => html`<tr key=${row.id}>
            <td><button type="button" class="link" onClick=${() => setPicked(row.id)} aria-pressed=${picked === row.id}>${shortHex(row.id)}</button></td>
            <td>${row.conversation}</td>
            <td class="num">${row.r ? formatOpen(row.r.fee) : "—"}</td>
            <td>${row.error ? `unavailable: ${row.error}` : settlementText(row.p)}</td></tr>`)}</tbody>
        </table>`}
      </section>
      ${picked && html`<div class="picked"><${ReceiptView} id=${picked} nodes=${nodes} /><${Proof} id=${picked} /></div>`}
      <section aria-labelledby="bal-h">
        <h2 id="bal-h">Paid by your receipts, by payee</h2>
        ${balances.size === 0 ? html`<p>Nothing yet.</p>` : html`
        <table>
          <thead><tr><th scope="col">Payee</th><th scope="col">Roles</th><th scope="col" class="num">Amount</th></tr></thead>
          <tbody>${[...balances].sort((a, b) => (b[1].total > a[1].total ? 1 : b[1].total < a[1].total ? -1 : 0)).map(([addr, b]) => html`
            <tr key=${addr}><td><code title=${addr}>${shortHex(addr)}</code></td><td>${[...b.roles].join(", ")}</td>
            <td class="num">${formatOpen(b.total)}</td></tr>`)}</tbody>
        </table>`}
      </section>
      <section aria-labelledby="ep-h">
        <h2 id="ep-h">Epochs</h2>
        ${epochs === undefined ? html`<p>Loading…</p>` : epochs === null ? html`<p>Epochs are unavailable here.</p>`
          : epochs.length === 0 ? html`<p>No epoch closed yet.</p>` : html`
        <table>
          <thead><tr><th scope="col">Epoch</th><th scope="col">Node</th><th scope="col" class="num">Receipts</th><th scope="col">Merkle root</th><th scope="col">Settlement</th></tr></thead>
          <tbody>${epochs.map((e) => html`<tr key=${(e.node || "") + e.epoch}>
            <td>${e.epoch}</td><td>${e.node ? html`<code title=${e.node}>${shortHex(e.node)}</code>` : "this node"}</td><td class="num">${e.receipts}</td><td><code title=${e.merkle_root}>${shortHex(e.merkle_root)}</code></td>
            <td>${e.settlements.length === 0 ? "none" : e.settlements.map((s) => html`<div>tx <code title=${s.tx}>${shortHex(s.tx)}</code>:
              ${s.settled}/${s.charges} charges, ${formatOpen(s.total)}</div>`)}</td></tr>`)}</tbody>
        </table>`}
      </section>
    </div>`;
}
