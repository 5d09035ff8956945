"""flash_attention on a seeded sweep of random configurations against the float32 reference.

The case table (attention_cases.CASES) pins one combination of features per case; the sweep draws
shapes and options together, so combinations nobody wrote down get checked too. The draw is
seeded (reproducible ids), and a cheap test asserts that it still covers what the issue names.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernels_pallas.attention_cases import Case, check_against_oracle

SWEEP_SEED = 77  # chosen so that SWEEP_SIZE draws cover every property test_sweep_covers_... names
SWEEP_SIZE = 5  # plus the fixed case below: each costs one compile per backend (~3 s on 2 cores)


def draw_cases(seed: int, n: int) -> list[Case]:
    """n random configurations: odd S in [9, 49], T == S or an odd T < S, Hkv in {1, 2} with
    Hq / Hkv in {1, 2, 4, 8} (MQA when Hkv = 1), D in {16, 32, 64}, float32 or bfloat16, and each
    of causal, window, segment ids (three kinds) and softcap on or off; 16 x 16 tiles."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        s = 2 * int(rng.integers(4, 25)) + 1
        t = s if rng.random() < 0.5 else 2 * int(rng.integers(0, s // 2)) + 1
        hkv = int(rng.choice([1, 2]))
        hq = hkv * int(rng.choice([1, 2, 4, 8]))
        d = int(rng.choice([16, 32, 64]))
        dtype = str(rng.choice(["float32", "bfloat16"]))
        causal = bool(rng.random() < 0.5)
        window = (tuple(int(w) for w in rng.integers(0, 12, 2)) if rng.random() < 0.5 else None)
        segments = [None, "packed", "random", "pair_empty"][int(rng.integers(0, 4))]
        softcap = 5.0 if rng.random() < 0.5 else None
        batch = int(rng.choice([1, 2]))
        name = (f"sweep{i}_{dtype}_b{batch}_t{t}_s{s}_h{hq}x{hkv}_d{d}" + "_causal" * causal
                + (f"_window{window[0]}-{window[1]}" if window else "")
                + (f"_{segments}" if segments else "") + ("_softcap" if softcap else ""))
        cases.append(Case(name, batch=batch, t=t, s=s, hq=hq, hkv=hkv, d=d, dtype=dtype,
                          causal=causal, window=window, segments=segments, softcap=softcap))
    return cases


SWEEP = draw_cases(SWEEP_SEED, SWEEP_SIZE) + [
    # float32 (the tight tolerance) with softcap, GQA and packed segments at once, T < S
    Case("f32_softcap_gqa4_packed_segments_prefix", batch=2, t=25, s=41, hq=8, hkv=2, d=32,
         softcap=3.0, segments="packed"),
]


# The drawn shapes exercise the Pallas kernels' padding and tile bounds (interpreted); the xla
# path runs the fixed case here and the whole case table in test_flash_attention.
@pytest.mark.parametrize("backend, case", [
    pytest.param("pallas", c, id=f"pallas-{c.name}") for c in SWEEP] + [
    pytest.param("xla", SWEEP[-1], id=f"xla-{SWEEP[-1].name}")])
def test_random_configurations_forward_lse_and_grads_match_reference(backend, case):
    check_against_oracle(backend, case, block_q=case.block_q, block_k=case.block_k)


def test_sweep_covers_lengths_head_ratios_dtypes_and_every_option():
    """The seeded draw is not degenerate: T < S and T == S, odd lengths, MQA and GQA ratios 2, 4
    and 8, every head dim, both dtypes, every kind of segment ids, and each option both on and
    off somewhere."""
    drawn = SWEEP[:SWEEP_SIZE]
    assert all(c.s % 2 and c.t % 2 and c.t <= c.s for c in drawn)
    assert {c.t < c.s for c in drawn} == {True, False}
    assert any(c.hkv == 1 and c.hq > 1 for c in drawn)  # MQA
    assert any(c.hkv > 1 and c.hq > c.hkv for c in drawn)  # GQA
    assert {c.hq // c.hkv for c in drawn} >= {2, 4, 8}
    assert {c.d for c in drawn} == {16, 32, 64}
    assert {c.dtype for c in drawn} == {"float32", "bfloat16"}
    assert {c.segments for c in drawn} >= {"packed", "random", "pair_empty"}
    for option in ("causal", "window", "segments", "softcap"):
        assert {bool(getattr(c, option)) for c in drawn} == {True, False}, option
