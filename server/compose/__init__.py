"""Per-request adapter composition (issue 15): weights, peft merges, lora_scale."""
