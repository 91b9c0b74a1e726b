"""One model load at a time in a process.

transformers 5 (read in 5.24.0, `transformers.initialization.no_tie_weights`)
replaces `PreTrainedModel.tie_weights` *on the class* with a no-op while
`from_pretrained` builds a model, and puts back what it found on exit. Two
loads on two threads of one process can interleave so that the second one
"restores" the no-op: from then on no model in the process ties its weights,
and a tied head (SmolLM2's `lm_head`) stays on the meta device, failing the
first `.to(device)` with "Cannot copy out of meta tensor". The bot loads
models on several job threads (local evaluation, the embedding scorer, model
conversion, merges), so every load in this project holds `MODEL_LOAD`.

Only the load is serialised, never generation or training.
"""

from __future__ import annotations

import threading

MODEL_LOAD = threading.RLock()
"""Held around every `from_pretrained` and model construction in this project."""
