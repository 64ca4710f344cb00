"""A per-request logits processor for vLLM that writes given tokens at given generated steps (as the
transformers tests' ForceText does): `SamplingParams(extra_args={"vgr_force": {step: token_id}})`. The step counts
over the whole VGR request: the replay loop tells each segment where it starts (`vgr_generated_before`)."""

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class ForceTokens(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        extra = params.extra_args or {}
        forced = {int(step): int(token) for step, token in (extra.get("vgr_force") or {}).items()}
        if not forced:
            return None
        start = int(extra.get("vgr_generated_before", 0))

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            token = forced.get(start + len(output_ids))
            if token is not None:
                logits = torch.full_like(logits, -float("inf"))
                logits[token] = 0.0
            return logits

        return force
