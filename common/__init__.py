"""What llmuxd (llmux.service), its client (llmux.client) and the shim (llmux.shim) share.

Three leaves, and nothing else of either program:

- the contract: ``contract`` (the D-Bus API as data: names, methods, records, error names)
  and ``errors`` (one exception class per error name, which the service raises and the
  client raises again from the name);
- the /proc reading: ``proctree`` (process trees, PSS), ``resources`` (what a tree holds
  open, listens on or made) and ``gpumem`` (its GPU memory, as NVML counts it), with their
  own exceptions, no D-Bus ones;
- the config schema: ``configschema`` (a key's default written once, with its rule; every
  problem of a file listed with its key path), which llmuxd's config and the shim's share.

Each leaf imports nothing of llmux outside itself, so the shim's image carries common/,
client/ and shim/ without service/ (tests/shim/test_leaves.py holds all sides to this).
"""
