"""Tensor-bundle reader/writer: bit-identical round trips, CRC32C, and named errors."""

import os

import numpy as np
import pytest

from lub_fast.tf1 import bundle, crc, table
from lub_fast.tf1.bundle import BFLOAT16, BundleReader, TF1CheckpointError, write_bundle


def _tensors(rng):
    return {
        "bert/embeddings/word_embeddings": rng.standard_normal((97, 13)).astype(np.float32),
        # > 4 MB, so the CRC runs over several vectorised chunks.
        "big/kernel": rng.standard_normal((1031, 1030)).astype(np.float32),
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "bf16": rng.integers(0, 1 << 16, (4, 6), dtype=np.uint16).view(BFLOAT16),
        "f64": rng.standard_normal((2, 3)),
        "i32": rng.integers(-(1 << 31), 1 << 31, (7,), dtype=np.int32),
        "global_step": np.array(123456789012, dtype=np.int64),
        "i8": rng.integers(-128, 128, (5,), dtype=np.int8),
        "u8": rng.integers(0, 256, (5,), dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.float32(2.5),
        "strings": np.array([b"hello", b"", "中文".encode()], dtype=object),
        "zz/last": rng.standard_normal((1,)).astype(np.float32),
    }


def _same_bits(a, b):
    if a.dtype == object:
        return a.shape == b.shape and list(a.reshape(-1)) == list(b.reshape(-1))
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


@pytest.mark.parametrize("num_shards", [1, 3])
def test_bundle_roundtrip_bit_identical(tmp_path, num_shards):
    tensors = _tensors(np.random.default_rng(0))
    paths = write_bundle(tmp_path / "a" / "model.ckpt", tensors, num_shards=num_shards)
    assert [os.path.basename(p) for p in paths] == ["model.ckpt.index"] + [
        f"model.ckpt.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    reader = BundleReader(tmp_path / "a" / "model.ckpt")
    assert reader.num_shards == num_shards
    assert list(reader.entries) == sorted(tensors)
    assert len({e.shard_id for e in reader.entries.values()}) == num_shards
    back = {name: reader.read(name) for name in reader.entries}
    for name, array in tensors.items():
        assert _same_bits(np.asarray(array), back[name]), name
    assert reader.entries["bf16"].dtype == "bfloat16"
    assert reader.entries["empty"].shape == (0, 4) and reader.entries["scalar"].shape == ()
    # Writing what was read gives the same files, byte for byte.
    write_bundle(tmp_path / "b" / "model.ckpt", back, num_shards=num_shards)
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.path.basename(p) for p in paths)
    for path in paths:
        again = tmp_path / "b" / os.path.basename(path)
        assert open(path, "rb").read() == open(again, "rb").read(), path


def _data_block_handles(index: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every data block, from the index block that the footer names."""
    footer = index[-table.FOOTER_SIZE:]
    _, pos = table.get_varint(footer, 0, 40)
    _, pos = table.get_varint(footer, pos, 40)
    offset, pos = table.get_varint(footer, pos, 40)
    size, _ = table.get_varint(footer, pos, 40)
    handles = []
    for _, handle in table.parse_block(index[offset:offset + size]):
        block_offset, pos = table.get_varint(handle, 0, len(handle))
        handles.append((block_offset, table.get_varint(handle, pos, len(handle))[0]))
    return handles


def test_bundle_index_with_many_blocks(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"bert/encoder/layer_{i}/w{j}": rng.standard_normal(3).astype(np.float32)
               for i in range(40) for j in range(5)}
    write_bundle(tmp_path / "m", tensors, block_size=256, restart_interval=3)
    blocks = _data_block_handles(open(tmp_path / "m.index", "rb").read())
    assert len(blocks) > 10, f"{len(blocks)} data blocks for {len(tensors)} entries"
    reader = BundleReader(tmp_path / "m")
    assert list(reader.entries) == sorted(tensors)
    for name in ("bert/encoder/layer_0/w0", "bert/encoder/layer_39/w4", "bert/encoder/layer_17/w2"):
        assert np.array_equal(reader.read(name), tensors[name])


def test_crc32c_known_values():
    # RFC 3720 appendix B.4 test vectors, and the standard check value.
    assert crc.crc32c(b"123456789") == 0xE3069283
    assert crc.crc32c(bytes(32)) == 0x8A9136AA
    assert crc.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc.crc32c(bytes(range(32))) == 0x46DD794E
    assert crc.unmask_crc(crc.mask_crc(0xE3069283)) == 0xE3069283


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 255, 256, 1000, 4103, (1 << 20) + 16 * 3 + 5,
                               2 * (1 << 20) + 123])
def test_crc32c_numpy_matches_bytewise(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    expected = crc._update_small(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    assert crc.crc32c_numpy(0, data) == expected, f"n={n}"
    k = n // 3  # Extend semantics: crc of a concatenation from the crc of its first part
    assert crc.crc32c_numpy(crc.crc32c_numpy(0, data[:k]), data[k:]) == expected


@pytest.mark.skipif(crc._NATIVE is None, reason="google_crc32c / crc32c not installed")
def test_crc32c_native_matches_numpy():
    data = np.random.default_rng(7).integers(0, 256, 3_000_001, dtype=np.uint8)
    assert crc.crc32c(data) == crc.crc32c_numpy(0, data)
    assert crc.crc32c(data[1000:], 12345) == crc.crc32c_numpy(12345, data[1000:])


def _write_small(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {"a/kernel": rng.standard_normal((8, 4)).astype(np.float32),
               "b/bias": rng.standard_normal(4).astype(np.float32)}
    write_bundle(tmp_path / "model.ckpt", tensors)
    return tmp_path / "model.ckpt", tensors


def test_bundle_truncated_data_file_named_error(tmp_path):
    prefix, _ = _write_small(tmp_path)
    data = f"{prefix}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 3)
    reader = BundleReader(prefix)
    assert reader.read("a/kernel").shape == (8, 4)  # stored first, still whole
    with pytest.raises(TF1CheckpointError, match=r"data-00000-of-00001.*'b/bias'.*truncated"):
        reader.read("b/bias")
    os.remove(data)
    with pytest.raises(TF1CheckpointError, match=r"data file of tensor 'a/kernel' not found"):
        reader.read("a/kernel")


def test_bundle_wrong_crc_named_error(tmp_path):
    prefix, tensors = _write_small(tmp_path)
    data = f"{prefix}.data-00000-of-00001"
    raw = bytearray(open(data, "rb").read())
    raw[5] ^= 0x10  # inside a/kernel
    open(data, "wb").write(bytes(raw))
    with pytest.raises(TF1CheckpointError, match=r"'a/kernel' has crc32c .*corrupt data file"):
        BundleReader(prefix).read("a/kernel")
    assert np.array_equal(BundleReader(prefix).read("b/bias"), tensors["b/bias"])
    flipped = BundleReader(prefix, verify=False).read("a/kernel")
    assert not np.array_equal(flipped, tensors["a/kernel"])


def test_bundle_corrupt_index_named_error(tmp_path):
    prefix, _ = _write_small(tmp_path)
    index = f"{prefix}.index"
    good = open(index, "rb").read()
    open(index, "wb").write(good[:10] + bytes([good[10] ^ 1]) + good[11:])
    with pytest.raises(TF1CheckpointError, match=r"model\.ckpt\.index: block at byte 0 .*corrupt"):
        BundleReader(prefix)
    open(index, "wb").write(good[:-1])
    with pytest.raises(TF1CheckpointError, match=r"model\.ckpt\.index: bad table magic"):
        BundleReader(prefix)
    open(index, "wb").write(good[:20])
    with pytest.raises(TF1CheckpointError, match=r"shorter than the 48-byte table footer"):
        BundleReader(prefix)
    os.remove(index)
    with pytest.raises(TF1CheckpointError, match=r"index file not found"):
        BundleReader(prefix)


def test_bundle_entry_size_mismatch_named_error(tmp_path):
    prefix, _ = _write_small(tmp_path)
    reader = BundleReader(prefix)
    entry = reader.entries["b/bias"]
    reader.entries["b/bias"] = bundle.BundleEntry(
        entry.name, entry.dtype, (5,), entry.shard_id, entry.offset, entry.size,
        entry.masked_crc32c, False)
    with pytest.raises(TF1CheckpointError, match=r"'b/bias' of shape \[5\].*needs 20 bytes.*16"):
        reader.read("b/bias")


def _snappy_installed():
    for module in ("cramjam", "snappy"):
        try:
            __import__(module)
            return True
        except ImportError:
            pass
    return False


@pytest.mark.skipif(_snappy_installed(), reason="a snappy decoder is installed")
def test_bundle_snappy_index_named_error(tmp_path):
    prefix, _ = _write_small(tmp_path)
    index = f"{prefix}.index"
    raw = bytearray(open(index, "rb").read())
    (boff, bsize), = _data_block_handles(bytes(raw))
    raw[boff + bsize] = 1  # compression type: snappy, with a matching checksum
    checksum = crc.mask_crc(crc.crc32c(bytes(raw[boff:boff + bsize + 1])))
    raw[boff + bsize + 1:boff + bsize + 5] = checksum.to_bytes(4, "little")
    open(index, "wb").write(bytes(raw))
    with pytest.raises(TF1CheckpointError, match=r"snappy-compressed; install python-snappy"):
        BundleReader(prefix)
