"""LoRA adapters: PEFT parsing (adapter.py), merges (merge.py), per-step batch metadata (batch.py).

Kept import-light on purpose: importing `openlora.lora.batch` must not pull in the PEFT parser.
"""
