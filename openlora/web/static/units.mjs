// Amounts are integer base units of OPEN (18 decimals). Sums use BigInt: no floating point touches money.

export const DECIMALS = 18n;
const ONE = 10n ** DECIMALS;

/** A JSON number or string of base units as a BigInt (throws on fractions). */
export function units(v) {
  if (typeof v === "bigint") return v;
  if (typeof v === "number" && !Number.isSafeInteger(v)) throw new Error(`amount ${v} lost precision`);
  return BigInt(v);
}

/** "0.000000000000012 OPEN": exact, trailing zeros trimmed. */
export function formatOpen(v) {
  const n = units(v);
  const neg = n < 0n;
  const a = neg ? -n : n;
  const whole = a / ONE;
  const frac = (a % ONE).toString().padStart(Number(DECIMALS), "0").replace(/0+$/, "");
  return `${neg ? "-" : ""}${whole}${frac ? "." + frac : ""} OPEN`;
}

/** Sum of base units. */
export function sum(values) {
  return values.reduce((acc, v) => acc + units(v), 0n);
}

/** JSON.parse that keeps integers beyond 2^53 exact (as BigInt), where the browser gives the source text. */
export function parseJSON(text) {
  return JSON.parse(text, (key, value, ctx) =>
    typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value) && ctx && ctx.source
      ? BigInt(ctx.source) : value);
}

export function shortHex(h, n = 6) {
  return typeof h === "string" && h.length > 2 * n + 2 ? `${h.slice(0, n + 2)}…${h.slice(-n)}` : String(h ?? "");
}
