// The network map: the registered nodes by location (equirectangular: x = longitude, y = -latitude),
// and the same nodes as a table with hardware, price, load, health and resident adapters.
import { html } from "./ui.mjs";
import { formatOpen, shortHex } from "./units.mjs";

const GRID = [-150, -120, -90, -60, -30, 0, 30, 60, 90, 120, 150];

function health(n) {
  return n.healthy === true ? "healthy" : n.healthy === false ? "unhealthy" : "unknown";
}

function hardware(h) {
  if (!h || !h.model) return "—";
  const acc = h.accelerator && h.accelerator !== "cpu" && h.count
    ? `${h.count}× ${h.model}${h.memory_mb ? ` (${Math.round(h.memory_mb / 1024)} GiB)` : ""}` : h.model;
  return h.cpu_cores ? `${acc}, ${h.cpu_cores} CPU cores` : acc;
}

function price(p) {
  if (!p || p.per_1k_prompt_tokens == null) return "—";
  return `${formatOpen(p.per_1k_prompt_tokens)} prompt, ${formatOpen(p.per_1k_completion_tokens)} completion, per 1k tokens`;
}

export function land() {
  return import("./vendor/land.mjs").then((m) => m.LAND_PATH, () => null);
}

export function MapView({ nodes, landPath }) {
  if (nodes == null) return html`<p>Loading the network…</p>`;
  const placed = nodes.filter((n) => Array.isArray(n.location));
  return html`
    <div class="map">
      <h2>Network map</h2>
      <svg viewBox="-180 -90 360 180" role="img" aria-label=${`World map with ${placed.length} of ${nodes.length} nodes placed by location`}>
        <rect x="-180" y="-90" width="360" height="180" class="sea" />
        ${landPath && html`<path d=${landPath} class="land" />`}
        ${GRID.map((x) => html`<line x1=${x} y1="-90" x2=${x} y2="90" class="grid" />`)}
        ${[-60, -30, 0, 30, 60].map((y) => html`<line x1="-180" y1=${y} x2="180" y2=${y} class="grid" />`)}
        ${placed.map((n) => html`<g class=${"node " + health(n)} key=${n.id}>
          <circle cx=${n.location[1]} cy=${-n.location[0]} r="3.2"><title>${n.region} ${shortHex(n.id)}: ${health(n)}</title></circle></g>`)}
      </svg>
      <table class="nodes">
        <caption>${nodes.length} node${nodes.length === 1 ? "" : "s"}</caption>
        <thead><tr><th scope="col">Node</th><th scope="col">Region</th><th scope="col">Hardware</th><th scope="col">Price</th>
          <th scope="col">Load</th><th scope="col">Health</th><th scope="col">Resident adapters</th></tr></thead>
        <tbody>${nodes.map((n) => html`<tr key=${n.id}>
          <td><code title=${n.address || n.id}>${shortHex(n.address || n.id)}</code><div class="hint">${n.url}</div></td>
          <td>${n.region || "—"}${n.location ? ` (${n.location[0]}, ${n.location[1]})` : ""}</td>
          <td>${hardware(n.hardware)}</td>
          <td>${price(n.price)}</td>
          <td>${n.load ? `${n.load.inflight ?? 0} in flight, ${n.load.running ?? 0} running, ${n.load.waiting ?? 0} waiting` : "—"}</td>
          <td class=${health(n)}>${health(n)}</td>
          <td>${(n.resident_adapters || []).join(", ") || "—"}</td></tr>`)}</tbody>
      </table>
    </div>`;
}
