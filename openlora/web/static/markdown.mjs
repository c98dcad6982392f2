// Markdown to sanitized HTML. Answers are model output: treat them as hostile. DOMPurify removes
// scripts, handlers and dangerous URLs; the hook below also drops every image or media element that
// would load a URL (off-origin: the page makes no such request; same-origin: model output must not
// make the browser call this server's API), keeping inline data: images, and makes links open safely.

import { marked } from "./vendor/marked.mjs";
import DOMPurify from "./vendor/purify.mjs";

const LOADS = { IMG: "src", SOURCE: "src", VIDEO: "src", AUDIO: "src", TRACK: "src" };

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  const attr = LOADS[node.nodeName];
  if (attr) {
    const src = node.getAttribute(attr);
    if (src && !src.startsWith("data:")) {
      node.replaceWith(document.createTextNode(node.getAttribute("alt") || "[linked image removed]"));
      return;
    }
    node.removeAttribute("srcset");
  }
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("rel", "noopener noreferrer nofollow");
    node.setAttribute("target", "_blank");
  }
});

const CONFIG = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "ping", "formaction", "background", "poster"],
};

/** Sanitized HTML for a markdown string. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text ?? "", { async: false, gfm: true, breaks: true }), CONFIG);
}
