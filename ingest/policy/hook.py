"""What the decode pool runs: decode_batch with the policy rules beside normalize.

The decode layer knows only the shape of a policy (ingest.decode.batch.EventPolicy); this is
where the compiled rules (once per process, ingest.policy.evaluate.policy_for) meet it.
"""

from __future__ import annotations

from ingest.decode.batch import BatchInput, BatchOutput, decode_batch
from ingest.policy.evaluate import policy_for


def decode_with_policy(batch: BatchInput) -> BatchOutput:
    config = batch.config
    if not config.policy:
        return decode_batch(batch)
    return decode_batch(batch, policy_for(config.rules, config.builtin_rules))
