// The adapter picker: a labelled search box and select that stay usable with thousands of adapters
// (only the matches are listed, at most LIMIT of them), each with its state: resident, loading or cold.
import { html, useMemo, useState } from "./ui.mjs";

const LIMIT = 200;

export function badge(state) {
  if (state === "resident" || state === "base") return state;
  if (state === "loading") return "loading";
  return "cold";
}

export function AdapterPicker({ models, value, onChange, id = "adapter", label = "Adapter" }) {
  const [query, setQuery] = useState("");
  const shown = useMemo(() => {
    const q = query.trim().toLowerCase();
    const hits = models.filter((m) => !q || m.id.toLowerCase().includes(q));
    const list = hits.slice(0, LIMIT);
    const cur = models.find((m) => m.id === value);
    if (cur && !list.includes(cur)) list.unshift(cur);
    return { list, more: hits.length - Math.min(hits.length, LIMIT) };
  }, [models, query, value]);
  return html`
    <div class="picker">
      <label for=${id}>${label}</label>
      <input type="search" id=${id + "-search"} aria-label=${label + " search"} placeholder="Search adapters"
             value=${query} onInput=${(e) => setQuery(e.target.value)} />
      <select id=${id} value=${value} onChange=${(e) => onChange(e.target.value)}>
        ${shown.list.map((m) => html`<option value=${m.id} key=${m.id}>${m.id} · ${m.parent ? badge(m.state) : "base model"}</option>`)}
      </select>
      ${shown.more > 0 && html`<span class="hint">${shown.more} more: refine the search</span>`}
    </div>`;
}
