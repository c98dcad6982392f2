// The page's only network access: same-origin calls to the OpenAI-compatible API and the explorer routes.

import { parseJSON } from "./units.mjs";

let bearer = null;

/** The payer authorization sent with every request (chain mode): it pays for chats, and a receipt is
 * shown only to the payer it names; null for none. */
export function setBearer(token) { bearer = token; }

const auth = () => (bearer ? { authorization: `Bearer ${bearer}` } : {});

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function read(res) {
  const text = await res.text();
  let body = null;
  try { body = text ? parseJSON(text) : null; } catch { /* not JSON */ }
  if (!res.ok) throw new ApiError(res.status, body?.error?.message || text || res.statusText);
  return body;
}

export async function getJSON(path) {
  return read(await fetch(path, { headers: { accept: "application/json", ...auth() } }));
}

/** GET that answers null on 404 (a route this server does not have, or an unknown id). */
export async function getOptional(path) {
  try { return await getJSON(path); } catch (e) { if (e.status === 404) return null; throw e; }
}

/**
 * Stream a chat completion. Calls onDelta(text) per content piece and returns
 * {usage, attribution, node, error, stopped}. `signal` aborts it (Stop).
 */
export async function streamChat(body, { signal, onDelta, onFirst }) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", signal,
    headers: { "content-type": "application/json", accept: "text/event-stream", ...auth() },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!res.ok) await read(res);
  const out = { usage: null, attribution: null, node: res.headers.get("x-openlora-node"), error: null, stopped: false };
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  let first = true;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const d = parseJSON(data);
          if (d.error) { out.error = d.error.message || "the server reported an error"; continue; }
          if (d.usage) out.usage = d.usage;
          if (d.attribution) out.attribution = d.attribution;
          const piece = d.choices?.[0]?.delta?.content;
          if (piece) {
            if (first) { first = false; onFirst?.(); }
            onDelta(piece);
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    out.stopped = true;
  }
  return out;
}
