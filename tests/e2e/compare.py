"""Greedy parity between two runs, allowing divergence only at near-ties.

Reduced precision and another summation order move logits by a little. Greedy decoding
then picks a different token only where the reference's two best logprobs are closer than
that noise; a wrong dispatch or a lost expert moves them by far more. So each sequence
must match token for token until a position where the reference's top-2 margin is below
`tie_margin`; after such a fork the sequences are no longer comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

# (tie margin, logprob tolerance) per dtype. bf16: stock vLLM's own TP=2 moves the
# logprobs of these tiny models by up to 0.16 from its TP=1 (measured), so 0.25.
TOLERANCES = {"float32": (2e-3, 2e-3), "bfloat16": (0.25, 0.25)}


@dataclass
class Parity:
    compared_tokens: int
    forks: list[tuple[int, int, float]]  # (sequence, position, reference margin)


def assert_greedy_parity(reference: dict, candidate: dict, dtype: str) -> Parity:
    tie_margin, logprob_tol = TOLERANCES[dtype]
    compared, forks = 0, []
    for seq, (ref_tokens, cand_tokens) in enumerate(
        zip(reference["tokens"], candidate["tokens"], strict=True)
    ):
        for pos, (ref_token, cand_token) in enumerate(zip(ref_tokens, cand_tokens, strict=True)):
            ref_lps = reference["logprobs"][seq][pos]
            if ref_token != cand_token:
                best = sorted(ref_lps.values(), reverse=True)
                margin = best[0] - best[1]
                assert margin < tie_margin, (
                    f"sequence {seq} diverges at token {pos} ({ref_token} -> {cand_token}) "
                    f"where the reference is not near a tie (top-2 margin {margin:.4f} >= "
                    f"{tie_margin}):\nreference {ref_tokens}\ncandidate {cand_tokens}"
                )
                forks.append((seq, pos, margin))
                break
            cand_lp = candidate["logprobs"][seq][pos][str(cand_token)]
            assert abs(ref_lps[str(ref_token)] - cand_lp) <= logprob_tol, (
                f"sequence {seq} token {pos}: logprob {cand_lp:.5f} vs reference "
                f"{ref_lps[str(ref_token)]:.5f} (tolerance {logprob_tol})"
            )
            compared += 1
    return Parity(compared, forks)
