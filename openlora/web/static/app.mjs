// Open Chat: the shell (header, views by URL hash, theme) over the same-origin API.
import { html, render, useEffect, useState } from "./ui.mjs";
import { getJSON } from "./api.mjs";
import { ChatView } from "./chat.mjs";
import { ExplorerView } from "./explorer.mjs";
import { land, MapView } from "./map.mjs";
import { restoreAuthorization, WalletView } from "./wallet.mjs";

const VIEWS = { chat: "Chat", explorer: "Explorer", map: "Network map", wallet: "Wallet" };
const THEME_KEY = "openlora.theme";
const REFRESH_MS = 10_000;
// Set by the server: whether it answers GET /v1/nodes (a gateway, or a node on a chain).
const HAS_MAP = document.querySelector('meta[name="openlora-map"]')?.content === "yes";
// Set by the server: whether it is a node on a chain (the wallet's routes exist).
const HAS_WALLET = document.querySelector('meta[name="openlora-wallet"]')?.content === "yes";

function viewFromHash() {
  const v = location.hash.replace(/^#\/?/, "");
  return v in VIEWS ? v : "chat";
}

function applyTheme(t) {
  document.documentElement.dataset.theme = t;
  try { localStorage.setItem(THEME_KEY, t); } catch { /* private mode */ }
}

function App() {
  const [view, setView] = useState(viewFromHash);
  const [models, setModels] = useState(null);
  const [nodes, setNodes] = useState(undefined); // undefined: loading; null: this server has no map
  const [landPath, setLand] = useState(null);
  const [error, setError] = useState(null);
  const [theme, setTheme] = useState(() => document.documentElement.dataset.theme);

  useEffect(() => {
    const on = () => setView(viewFromHash());
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  const loadNodes = async () => {
    if (!HAS_MAP) return setNodes(null);
    try { setNodes((await getJSON("/v1/nodes")).data); } catch { setNodes([]); }
  };
  useEffect(() => {
    const load = async () => {
      try { setModels((await getJSON("/v1/models")).data); setError(null); }
      catch (e) { setError(`Cannot reach the server: ${e.message}`); }
      await loadNodes();
    };
    load();
    const t = setInterval(load, REFRESH_MS);
    addEventListener("openlora:answered", load); // states change with every answer
    return () => { clearInterval(t); removeEventListener("openlora:answered", load); };
  }, []);
  useEffect(() => { if (view === "map") loadNodes(); }, [view]);
  useEffect(() => { if (view === "map" && !landPath) land().then(setLand); }, [view]);
  useEffect(() => { document.title = `${VIEWS[view]} · Open Chat`; }, [view]);

  const base = models?.find((m) => !m.parent)?.id;
  const tabs = Object.entries(VIEWS).filter(([k]) => (k !== "map" || nodes) && (k !== "wallet" || HAS_WALLET));
  const nextTheme = theme === "dark" ? "light" : "dark";
  return html`
    <header class="top">
      <h1><a href="#/chat">Open Chat</a></h1>
      <nav aria-label="Views"><ul>
        ${tabs.map(([k, label]) => html`<li key=${k}><a href=${"#/" + k} aria-current=${view === k ? "page" : undefined}>${label}</a></li>`)}
      </ul></nav>
      <span class="base" title="Base model">${base || ""}</span>
      <button type="button" class="theme" aria-label=${`Switch to ${nextTheme} theme`}
              onClick=${() => { applyTheme(nextTheme); setTheme(nextTheme); }}>${theme === "dark" ? "Light" : "Dark"} theme</button>
    </header>
    <main id="main">
      ${error && html`<p class="error" role="alert">${error}</p>`}
      ${models == null ? html`<p>Connecting…</p>`
        : view === "chat" ? html`<${ChatView} models=${models} baseModel=${base} nodes=${nodes || []} />`
        : view === "explorer" ? html`<${ExplorerView} nodes=${nodes || []} />`
        : view === "wallet" && HAS_WALLET ? html`<${WalletView} />`
        : view === "map" && HAS_MAP ? html`<${MapView} nodes=${nodes} landPath=${landPath} />`
        : html`<p>This server has no ${VIEWS[view]} view.</p>`}
    </main>`;
}

let saved = null;
try { saved = localStorage.getItem(THEME_KEY); } catch { /* private mode */ }
document.documentElement.dataset.theme = saved || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
if (HAS_WALLET) restoreAuthorization();
const root = document.getElementById("app");
root.textContent = ""; // the "Loading" line
render(html`<${App} />`, root);
