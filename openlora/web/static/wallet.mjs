// The wallet (a node on a chain): the page acts as a payer. Its key is generated and kept in this
// browser, or an injected EIP-1193 wallet signs instead. It takes test OPEN from a local chain's
// faucet, deposits into escrow, signs the node's authorization (the bearer of every chat request),
// and shows balance, escrow and what the authorization has spent. Transactions are signed here; the
// node only relays them (POST /v1/chain/rpc).
import { html, useEffect, useState } from "./ui.mjs";
import { getJSON, setBearer } from "./api.mjs";
import { BrowserProvider, Contract, JsonRpcProvider, Network, TypedDataEncoder, Wallet, parseUnits } from "./vendor/ethers.mjs";
import { formatOpen } from "./units.mjs";

const KEY = "openlora.wallet.v1";
const TOKEN_ABI = ["function balanceOf(address) view returns (uint256)", "function approve(address,uint256) returns (bool)"];
const SETTLEMENT_ABI = [
  "function deposit(uint256)", "function escrowOf(address) view returns (uint256)",
  "function available(address) view returns (uint256)", "function claimable(address) view returns (uint256)",
  "function claim() returns (uint256)", "function spent(bytes32) view returns (uint256)",
];
const AUTH_TYPES = { Authorization: [
  { name: "payer", type: "address" }, { name: "node", type: "address" }, { name: "cap", type: "uint256" },
  { name: "expiry", type: "uint256" }, { name: "nonce", type: "uint256" }] };
const DAY_S = 86_400;

function loadState() {
  try { return JSON.parse(localStorage.getItem(KEY) || "{}"); } catch { return {}; }
}
function saveState(s) {
  try { localStorage.setItem(KEY, JSON.stringify(s)); } catch { /* private mode: this tab only */ }
}

/** Put the stored authorization (if still valid) on every chat request. Called at start-up. */
export function restoreAuthorization() {
  const s = loadState();
  setBearer(s.token && s.auth && Number(s.auth.expiry) > Date.now() / 1000 ? s.token : null);
}

/** The bearer token the node parses: "olpa1." + base64url(JSON, sorted keys, integers exact). */
export function authorizationToken(a) {
  const json = `{"cap":${a.cap},"chain_id":${a.chain_id},"contract":"${a.contract}","expiry":${a.expiry},` +
    `"node":"${a.node}","nonce":${a.nonce},"payer":"${a.payer}","signature":"${a.signature}"}`;
  return "olpa1." + btoa(json).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// cacheTimeout -1: ethers otherwise answers a repeated call within 250 ms from cache, so a second
// transaction right after a mined one (approve, then deposit) would reuse the first one's nonce.
function rpcProvider(chainId) {
  const net = Network.from(chainId);
  return new JsonRpcProvider(new URL("/v1/chain/rpc", location.href).href, net, { staticNetwork: net, batchMaxCount: 1, cacheTimeout: -1 });
}

async function signerFor(info, s) {
  if (s.injected && window.ethereum) return new BrowserProvider(window.ethereum).getSigner();
  if (!s.key) return null;
  return new Wallet(s.key, rpcProvider(info.chain_id));
}

export function WalletView() {
  const [info, setInfo] = useState(null);
  const [s, setS] = useState(loadState);
  const [signer, setSigner] = useState(null);
  const [bal, setBal] = useState(null);
  const [busy, setBusy] = useState("");
  const [msg, setMsg] = useState("");
  const [deposit, setDeposit] = useState("1");
  const [cap, setCap] = useState("0.5");
  const update = (patch) => { const n = { ...s, ...patch }; saveState(n); setS(n); return n; };

  useEffect(() => { getJSON("/v1/chain").then(setInfo, (e) => setMsg(`Chain unavailable: ${e.message}`)); }, []);
  useEffect(() => { if (info) signerFor(info, s).then(setSigner, (e) => setMsg(e.message)); }, [info, s.key, s.injected]);

  async function refresh() {
    if (!info || !signer) return;
    const provider = rpcProvider(info.chain_id);
    const me = await signer.getAddress();
    const token = new Contract(info.contracts.OpenToken, TOKEN_ABI, provider);
    const st = new Contract(info.contracts.Settlement, SETTLEMENT_ABI, provider);
    const [open, escrow, available, claimable, spent] = await Promise.all([
      token.balanceOf(me), st.escrowOf(me), st.available(me), st.claimable(me),
      s.auth ? st.spent(s.auth.digest) : Promise.resolve(0n)]);
    setBal({ me, open, escrow, available, claimable, spent });
  }
  useEffect(() => { refresh().catch((e) => setMsg(e.message)); }, [signer, s.auth]);

  async function act(label, fn) {
    setBusy(label); setMsg("");
    try { await fn(); setMsg(`${label}: done.`); await refresh(); }
    catch (e) { setMsg(`${label} failed: ${e.shortMessage || e.message}`); }
    finally { setBusy(""); }
  }

  const faucet = () => act("Get test OPEN", async () => {
    const r = await fetch("/v1/chain/faucet", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ address: await signer.getAddress() }) });
    if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
  });
  const doDeposit = () => act("Deposit", async () => {
    const amount = parseUnits(deposit, 18);
    const st = new Contract(info.contracts.Settlement, SETTLEMENT_ABI, signer);
    const token = new Contract(info.contracts.OpenToken, TOKEN_ABI, signer);
    await (await token.approve(info.contracts.Settlement, amount)).wait();
    await (await st.deposit(amount)).wait();
  });
  const authorize = () => act("Authorize this node", async () => {
    const payer = await signer.getAddress();
    const domain = { name: "OpenLoRA Settlement", version: "1", chainId: info.chain_id, verifyingContract: info.contracts.Settlement };
    const nonce = BigInt(Date.now()) * 1_000_000n + BigInt(Math.floor(Math.random() * 1e6));
    const message = { payer, node: info.node, cap: parseUnits(cap, 18), expiry: BigInt(Math.floor(Date.now() / 1000) + DAY_S), nonce };
    const signature = await signer.signTypedData(domain, AUTH_TYPES, message);
    const auth = { ...message, chain_id: info.chain_id, contract: info.contracts.Settlement, signature };
    const token = authorizationToken(auth);
    const digest = TypedDataEncoder.hash(domain, AUTH_TYPES, message);
    update({ token, auth: { cap: String(message.cap), expiry: String(message.expiry), digest, node: info.node } });
    setBearer(token);
  });
  const claim = () => act("Claim", async () => {
    await (await new Contract(info.contracts.Settlement, SETTLEMENT_ABI, signer).claim()).wait();
  });

  if (!info) return html`<div class="wallet"><h2>Wallet</h2><p>${msg || "Loading the chain…"}</p></div>`;
  const expired = s.auth && Number(s.auth.expiry) <= Date.now() / 1000;
  return html`
    <div class="wallet">
      <h2>Wallet</h2>
      <p class="hint">Chain ${info.chain_id}${info.local ? " (local test chain)" : ""}; this node is <code>${info.node}</code>.</p>
      ${!signer ? html`
        <p>No payer key yet.</p>
        <div class="actions">
          <button type="button" onClick=${() => update({ key: Wallet.createRandom().privateKey, injected: false })}>Create a browser key</button>
          ${window.ethereum && html`<button type="button" onClick=${() => update({ injected: true })}>Use my wallet</button>`}
        </div>
        <p class="hint">A browser key is kept in this browser's storage: use it with test OPEN only.</p>` : html`
        <dl class="facts" aria-label="Balances">
          <dt>Account</dt><dd><code>${bal?.me || "…"}</code>${s.injected ? " (your wallet)" : " (browser key)"}</dd>
          <dt>OPEN</dt><dd>${bal ? formatOpen(bal.open) : "…"}</dd>
          <dt>Escrow</dt><dd>${bal ? `${formatOpen(bal.escrow)} (${formatOpen(bal.available)} available)` : "…"}</dd>
          <dt>Authorization</dt><dd>${s.auth ? html`${expired ? "expired" : "active"}: cap ${formatOpen(s.auth.cap)}, spent ${bal ? formatOpen(bal.spent) : "…"},
            until ${new Date(Number(s.auth.expiry) * 1000).toLocaleString()}` : "none: chat requests are refused until you authorize this node"}</dd>
          <dt>Claimable</dt><dd>${bal ? formatOpen(bal.claimable) : "…"}</dd>
        </dl>
        <div class="wallet-actions">
          ${info.faucet && html`<button type="button" disabled=${!!busy} onClick=${faucet}>Get test OPEN</button>`}
          <span class="field"><label for="deposit">Deposit (OPEN)</label>
            <input id="deposit" inputmode="decimal" value=${deposit} onInput=${(e) => setDeposit(e.target.value)} />
            <button type="button" disabled=${!!busy} onClick=${doDeposit}>Deposit</button></span>
          <span class="field"><label for="cap">Spending cap (OPEN)</label>
            <input id="cap" inputmode="decimal" value=${cap} onInput=${(e) => setCap(e.target.value)} />
            <button type="button" disabled=${!!busy} onClick=${authorize}>Authorize this node</button></span>
          ${bal && bal.claimable > 0n && html`<button type="button" disabled=${!!busy} onClick=${claim}>Claim</button>`}
          <button type="button" class="link" disabled=${!!busy} onClick=${() => act("Refresh", async () => {})}>Refresh</button>
        </div>`}
      <p role="status" aria-live="polite" class=${msg.includes("failed") ? "error" : ""}>${busy ? `${busy}…` : msg}</p>
    </div>`;
}
