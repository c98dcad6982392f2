// Preact + htm: components written as tagged templates, no build step.
import { h, render } from "./vendor/preact.mjs";
import htm from "./vendor/htm.mjs";

export { render };
export const html = htm.bind(h);
export * from "./vendor/preact-hooks.mjs";
