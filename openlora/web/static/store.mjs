// Conversations live in this browser only (localStorage), never on the server.

const KEY = "openlora.chat.v1";

export function loadConversations() {
  try {
    const v = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(v) ? v : [];
  } catch { return []; }
}

export function saveConversations(list) {
  try { localStorage.setItem(KEY, JSON.stringify(list)); } catch { /* storage full or disabled: keep in memory */ }
}

export function newConversation(model) {
  return { id: crypto.randomUUID(), title: "New chat", model, mix: null, messages: [], created: Date.now() };
}

/** Every receipt id this browser holds, newest first: the explorer's "my receipts". */
export function myReceipts(list) {
  const out = [];
  for (const c of list)
    for (const m of c.messages)
      if (m.meta?.receipt_id) out.push({ id: m.meta.receipt_id, conversation: c.title, at: m.meta.at || c.created });
  return out.sort((a, b) => b.at - a.at);
}
