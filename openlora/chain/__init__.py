"""On chain: Vyper contracts (token, node/adapter/datanet registries, settlement), their
compilation and deployment, a local anvil node, a web3 client, and the node's settlement worker.

Torch-free; the engine never imports it (it consumes receipts from `openlora.attribution`).
"""
