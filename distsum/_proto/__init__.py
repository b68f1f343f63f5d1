"""The protobuf messages (generated from the .proto files here by scripts/gen-protos), and the
one piece of their encoding that code writing message bytes by hand needs."""


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
