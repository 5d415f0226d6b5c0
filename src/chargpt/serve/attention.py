"""What `/api/attention` answers: a model's attention weights over a prompt, bounded in size.

Every layer and head has a T x T map, so the answer grows with layers x heads x T²: an 8 x 8
model with a 512-token context would send 8 M weights (58 MB of JSON). The prompt is therefore
cropped to its last `max_tokens(run)` tokens, at most the context and few enough that the lower
triangles sent hold at most `MAX_CELLS` weights, and each weight is sent as a whole number
of thousandths (`SCALE`): the page's square-root colour scale shows no finer difference, and
"12" is less than half of "0.0123". The JSON is built in a worker thread, never on the event
loop.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from chargpt.runs.run import Run
from chargpt.serve.api import ApiError, Limits, encode_prompt, refuse_unknown_fields

MAX_CELLS = 2**20  # weights in one answer: at most ~3 MB of JSON
SCALE = 1000  # a weight w is sent as round(w * SCALE)


def max_tokens(run: Run) -> int:
    """The longest prompt, in tokens, whose maps fit in MAX_CELLS (at most the context)."""
    maps = run.config.model.n_layer * run.config.model.n_head
    t = run.block_size
    while t > 1 and maps * t * (t + 1) // 2 > MAX_CELLS:
        t -= 1
    return t


def attention_ids(run: Run, body: dict[str, Any], limits: Limits) -> list[int]:
    """The token ids a request asks the maps of: its prompt (at most --max-prompt-chars
    characters) cropped to its last `max_tokens(run)` tokens."""
    refuse_unknown_fields(body, {"prompt", "unknown"})
    if not run.has_attention:
        raise ApiError(400, f"this model (arch {run.config.model.arch}) has no attention to show")
    prompt = body.get("prompt")
    if not prompt or not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    ids = encode_prompt(run, prompt, limits, body.get("unknown", "error"))
    return ids[-max_tokens(run):]


def token_label(run: Run, i: int) -> str:
    """How the page shows token `i`: its character, or for a byte model its byte: ASCII as
    itself, any other byte escaped (0xC3 is "\\xc3"), since alone it is no character."""
    c = run.tokenizer.chars[i]
    if run.tokenizer.unit == "byte" and ord(c) >= 0x80:
        return f"\\x{ord(c):02x}"
    return c


def attention_json(run: Run, ids: list[int]) -> bytes:
    """The answer's JSON: the tokens and, per layer and head, the lower triangle of weights in
    thousandths (row i holds positions 0..i; later ones are masked and always 0)."""
    maps = run.attention_maps(ids)  # (n_layer, n_head, T, T)
    scaled = torch.round(maps.double() * SCALE).to(torch.int16).tolist()
    weights = [[[row[: i + 1] for i, row in enumerate(head)] for head in layer]
               for layer in scaled]
    body = {"tokens": [token_label(run, i) for i in ids], "n_layer": len(weights),
            "n_head": len(weights[0]) if weights else 0, "scale": SCALE, "weights": weights}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
