"""The shape-bucket ladders (prm_jax.buckets), against values counted by hand and brute-force references."""
import pytest

from prm_jax.buckets import batch_bucket, coarse_buckets, octave_buckets, pick_bucket, row_ladder, size_bucket


def test_pick_bucket_takes_the_smallest_that_holds_the_length():
    assert pick_bucket(129, (128, 192)) == 192 and pick_bucket(128, (128, 192)) == 128
    assert pick_bucket(1, (128, 192)) == 128
    with pytest.raises(ValueError, match="length 193 exceeds the largest bucket 192"):
        pick_bucket(193, (128, 192))


def test_coarse_buckets_training_default():
    # x1.5 from a power of two, x1.33 back to the next one, from max_length / 8
    assert coarse_buckets(512) == (64, 96, 128, 192, 256, 384, 512)
    assert coarse_buckets(2048) == (256, 384, 512, 768, 1024, 1536, 2048)
    assert coarse_buckets(64) == (8, 16, 24, 32, 48, 64)  # 12 rounds up to a multiple of 8
    # 600 // 8 = 75 is no power of two: x1.33 each time (75, 100, 133, 177, 236, 314, 418, 557), then 600
    assert coarse_buckets(600) == (80, 104, 136, 184, 240, 320, 424, 560, 600)
    assert coarse_buckets(20) == (8, 16, 20)


def test_octave_buckets_scoring_and_serving_ladders():
    assert octave_buckets(600)[:3] == (32, 64, 96) and octave_buckets(600)[-4:] == (480, 512, 576, 600)
    assert octave_buckets(2048)[-3:] == (1792, 1920, 2048)
    assert octave_buckets(4096, 2, 64) == (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    # the server's: octaves from 128
    assert octave_buckets(1024, 1, 128) == (128, 256, 512, 1024)
    assert octave_buckets(200, 1, 128) == (128, 200) and octave_buckets(64, 1, 128) == (64,)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        octave_buckets(0)


def test_size_and_batch_buckets_match_a_brute_force_ladder():
    ladder = sorted({2 ** k for k in range(12)} | {3 * 2 ** k for k in range(11)})  # 1, 2, 3, 4, 6, 8, ...
    assert ladder[:9] == [1, 2, 3, 4, 6, 8, 12, 16, 24]
    for n in range(700):
        for minimum in (1, 8, 16, 128):
            assert size_bucket(n, minimum) == min(x for x in ladder if x >= max(n, minimum, 1)), (n, minimum)
        for dp in (1, 2, 3, 4, 8):
            b = batch_bucket(n, dp)
            assert b % dp == 0 and b >= max(n, dp)
            assert b == -(-min(x for x in ladder if x >= max(n, dp)) // dp) * dp, (n, dp)
    assert (size_bucket(5), size_bucket(13), size_bucket(17), size_bucket(70, 16)) == (6, 16, 24, 96)
    assert (batch_bucket(5, 4), batch_bucket(4, 3), batch_bucket(1, 8)) == (8, 6, 8)


def test_row_ladder():
    assert row_ladder(4) == (1, 2, 4) and row_ladder(12) == (1, 2, 4, 8, 12)
    assert row_ladder(24, 8) == (8, 16, 24) and row_ladder(8, 8) == (8,)
