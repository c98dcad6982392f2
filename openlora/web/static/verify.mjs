// Checks done in the browser, not taken on the server's word: a receipt's EIP-712 signature
// (recovered signer = the node named in it) and a Merkle proof of inclusion in an epoch root
// (leaf = keccak256(receipt hash); parents hash the sorted pair, as the contracts' MerkleProof).
import { concat, getBytes, keccak256, verifyTypedData } from "./vendor/ethers.mjs";

/** The address that signed the receipt's typed data. */
export function receiptSigner(typedData, signature) {
  const types = { ...typedData.types };
  delete types.EIP712Domain; // ethers derives the domain type from the domain object
  return verifyTypedData(typedData.domain, types, typedData.message, signature);
}

/** Whether `receiptHash` is in the tree with `root` by `proof` (sibling hashes, leaf upward). */
export function proofVerifies(receiptHash, proof, root) {
  let node = keccak256(getBytes(receiptHash));
  for (const sib of proof) {
    const [a, b] = BigInt(node) <= BigInt(sib) ? [node, sib] : [sib, node];
    node = keccak256(concat([a, b]));
  }
  return node.toLowerCase() === root.toLowerCase();
}
