// One answer's receipt: the fee and its inputs, who was paid (role, reference, address, amount),
// whether the node's signature verifies (checked here), and where it stands on the way to the chain.
import { html, useEffect, useState } from "./ui.mjs";
import { getJSON } from "./api.mjs";
import { receiptSigner } from "./verify.mjs";
import { formatOpen, shortHex, sum, units } from "./units.mjs";

const ROLE = { operator: "Node operator", owner: "Adapter owner", data: "Data contributor" };

/** "merge linear" / "merge ties, density 0.5" from the receipt's merge parameters (JSON). */
function mergeText(m) {
  if (!m) return "";
  try {
    const p = JSON.parse(m);
    return ` · merge ${p.strategy}${p.density != null ? `, density ${p.density}` : ""}`;
  } catch { return ` · merge ${m}`; }
}

export function settlementText(p) {
  if (!p) return "unknown";
  if (p.state === "settled") return `settled in epoch ${p.epoch} (transaction ${shortHex(p.settlement.tx)})`;
  if (p.state === "skipped") return `not settled in epoch ${p.epoch}: ${p.settlement.skipped}`;
  if (p.state === "closed") return `in epoch ${p.epoch}, settlement pending`;
  return "pending (its epoch is not closed yet)";
}

export function useReceipt(id) {
  const [data, setData] = useState({ receipt: null, proof: null, error: null, signer: null });
  useEffect(() => {
    let live = true;
    (async () => {
      try {
        const [receipt, proof] = await Promise.all([getJSON(`/v1/receipts/${id}`), getJSON(`/v1/receipts/${id}/proof`)]);
        let signer = null;
        try { signer = receiptSigner(proof.typed_data, proof.signature); } catch { signer = null; }
        if (live) setData({ receipt, proof, error: null, signer });
      } catch (e) {
        if (live) setData({ receipt: null, proof: null, error: e.message, signer: null });
      }
    })();
    return () => { live = false; };
  }, [id]);
  return data;
}

export function ReceiptView({ id, servedBy, nodes }) {
  const { receipt: r, proof, error, signer } = useReceipt(id);
  const label = `Receipt ${shortHex(id)}`;
  if (error) return html`<section class="receipt" role="region" aria-label=${label}><p class="error">Receipt unavailable: ${error}</p></section>`;
  if (!r) return html`<section class="receipt" role="region" aria-label=${label} aria-busy="true"><p>Loading receipt…</p></section>`;
  // In a gateway, the node's registered address is the one that must have signed.
  const listed = nodes?.find((n) => n.id === servedBy || n.address === r.node);
  const expected = listed?.address || r.node;
  const sigOk = signer != null && signer.toLowerCase() === expected.toLowerCase()
    && proof.typed_data.message.requestId === r.request_id;
  const paid = sum(r.payouts.map((p) => p.amount));
  return html`
    <section class="receipt" role="region" aria-label=${label}>
      <h3>${label}</h3>
      <dl class="facts">
        <dt>Fee</dt><dd class="fee">${formatOpen(r.fee)} <span class="units">(${units(r.fee).toString()} base units)</span></dd>
        <dt>Tokens</dt><dd>${r.prompt_tokens} prompt (${r.cached_tokens} cached), ${r.completion_tokens} completion</dd>
        <dt>Model</dt><dd>${r.base_model}${r.adapters.length ? " + " + r.adapters.map((a) => `${a.adapter_id} (${a.weight_ppm / 1e4}%, v${a.version})`).join(", ") : ""}${mergeText(r.merge)}</dd>
        <dt>Status</dt><dd>${r.status}</dd>
        <dt>Signature</dt><dd class=${sigOk ? "ok" : "bad"}>${sigOk ? `verifies: signed by node ${shortHex(expected)}` : `does NOT verify (recovered ${shortHex(signer || "nothing")}, expected ${shortHex(expected)})`}</dd>
        <dt>Settlement</dt><dd>${settlementText(proof)}</dd>
        <dt>Receipt id</dt><dd><code class="hash">${r.receipt_id}</code></dd>
        ${r.span_method ? html`<dt>Attribution</dt><dd>by the spans the answer reproduced (<code>${r.span_method}</code>)</dd>` : ""}
      </dl>
      ${r.span_method ? html`<table class="payees credits">
        <caption>Answer tokens credited to each contributor's text</caption>
        <thead><tr><th scope="col">Dataset</th><th scope="col">Contributor</th><th scope="col" class="num">Tokens</th></tr></thead>
        <tbody>${(r.credits || []).map((c, i) => html`<tr key=${i}>
          <td>${c.adapter_id}/${c.dataset_id}</td><td><code title=${c.contributor}>${shortHex(c.contributor)}</code></td>
          <td class="num">${c.credit}</td></tr>`)}</tbody>
      </table>` : ""}
      <table class="payees">
        <caption>Who was paid</caption>
        <thead><tr><th scope="col">Role</th><th scope="col">For</th><th scope="col">Address</th><th scope="col" class="num">Amount</th></tr></thead>
        <tbody>${r.payouts.map((p, i) => html`<tr key=${i}>
          <td>${ROLE[p.role] || p.role}</td><td>${p.ref || "—"}</td><td><code title=${p.recipient}>${shortHex(p.recipient)}</code></td>
          <td class="num">${formatOpen(p.amount)}</td></tr>`)}</tbody>
        <tfoot><tr><th scope="row" colspan="3">Total ${paid === units(r.fee) ? "(equals the fee)" : "(does not equal the fee!)"}</th>
          <td class="num">${formatOpen(paid)}</td></tr></tfoot>
      </table>
    </section>`;
}
