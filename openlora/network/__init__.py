"""The network: a gateway that knows the nodes (a static list or the chain's NodeRegistry), polls
their state, ranks them for each request (adapter residency first, then its own load counts, then
scraped queue and KV use, latency, region and price) and proxies the request, failing over to the
next node when one dies before the first byte. Torch-free: it never imports the engine.
"""
