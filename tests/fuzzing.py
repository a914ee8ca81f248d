"""Strategies and checks for tests/test_fuzz.py: every RPC of the three services, fuzzed at the
message level (messages built from the generated descriptors) and at the byte level (protobuf
that is not a valid message of the method's type).

The methods are enumerated from the descriptors, so a new RPC is fuzzed without a change here.
Strings are chosen by field name where the name says what they hold (digests, repositories,
upload ids, media types, page tokens), with a bias to the values a service branches on: the
digests and repositories the stack was seeded with, valid-looking and near-valid ones, empty,
unicode, oversize; integers near 0, negative and at the limits; bytes mostly small, the seeded
payloads (so digests match), and now and then near the 4 MiB data limit.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import descriptor as pbd
from google.protobuf import message_factory, text_format
from google.protobuf.message import Message
from hypothesis import strategies as st

from linkedblob.blob.v1 import blob_pb2
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.link.v1 import link_pb2
from linkedblob.v1 import registry_pb2

FD = pbd.FieldDescriptor

# Which server answers each service (the keys of the test's channels).
SERVICES: dict[str, pbd.ServiceDescriptor] = {
    "gateway": registry_pb2.DESCRIPTOR.services_by_name["Registry"],
    "blob": blob_pb2.DESCRIPTOR.services_by_name["BlobService"],
    "link": link_pb2.DESCRIPTOR.services_by_name["LinkService"],
}


@dataclass(frozen=True)
class Method:
    target: str  # "gateway", "blob" or "link"
    descriptor: pbd.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def name(self) -> str:
        return f"{self.descriptor.containing_service.name}.{self.descriptor.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)

    @property
    def input(self) -> pbd.Descriptor:
        return self.descriptor.input_type


def methods() -> list[Method]:
    return [
        Method(target, method) for target, service in SERVICES.items() for method in service.methods
    ]


def message_class(desc: pbd.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


# --- the values the stack was seeded with --------------------------------------------------


@dataclass
class Pools:
    """Known values, so that generated calls reach past validation: seeded payloads (and their
    digests), repositories that link them, upload ids that exist."""

    payloads: list[bytes]
    repositories: list[str]
    upload_ids: list[str]
    digests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for data in self.payloads:
            self.digests.append("sha256:" + hashlib.sha256(data).hexdigest())
            self.digests.append("sha512:" + hashlib.sha512(data).hexdigest())


# --- leaf strategies -----------------------------------------------------------------------

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
MiB = 1024 * 1024

_hex = "0123456789abcdef"


def _hexstr(n: int) -> st.SearchStrategy[str]:
    return st.text(_hex, min_size=n, max_size=n)


def valid_digests() -> st.SearchStrategy[str]:
    return st.one_of(_hexstr(64).map("sha256:".__add__), _hexstr(128).map("sha512:".__add__))


_DIGEST_MUTATIONS = [
    str.upper,
    lambda d: d[:-1],
    lambda d: d + "0",
    lambda d: d[:-1] + "g",
    lambda d: d.replace(":", ""),
    lambda d: d.replace(":", "+"),
    lambda d: " " + d,
    lambda d: d + "\n",
    lambda d: d + "\0",
    lambda d: d.split(":", 1)[0] + ":",
    lambda d: "sha384:" + d.split(":", 1)[1][:96].ljust(96, "0"),
    lambda d: "md5:" + d.split(":", 1)[1][:32],
    lambda d: "sha256:../../" + d.split(":", 1)[1][:58],
    lambda d: "SHA256:" + d.split(":", 1)[1],
    lambda d: d.replace("a", "\u0430"),  # Cyrillic a: looks the same
    lambda d: "x" * 20_000 + d[d.index(":") :],  # an algorithm longer than a status may echo
]


def digests(pools: Pools) -> st.SearchStrategy[str]:
    near = st.tuples(
        st.one_of(st.sampled_from(pools.digests), valid_digests()),
        st.sampled_from(_DIGEST_MUTATIONS),
    ).map(lambda pair: pair[1](pair[0]))
    return st.one_of(
        st.sampled_from(pools.digests), valid_digests(), near, st.just(""), st.text(max_size=80)
    )


def repositories(pools: Pools) -> st.SearchStrategy[str]:
    valid = st.from_regex(
        r"[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?(/[a-z0-9]{1,6}){0,2}", fullmatch=True
    )
    invalid = st.sampled_from(
        [
            "",
            "Fuzz/A",
            "/fuzz",
            "fuzz/",
            "fuzz//a",
            "../etc",
            "fuzz/../a",
            "a" * 256,
            "/".join(["ab"] * 86),  # 257 characters of valid components
            "r\u00e9po",
            "fuzz\0a",
            "fuzz a",
            "a__-b",
            "%2e%2e",
        ]
    )
    return st.one_of(st.sampled_from(pools.repositories), valid, invalid, st.text(max_size=40))


def upload_ids(pools: Pools) -> st.SearchStrategy[str]:
    alphabet = string.ascii_letters + string.digits + "_-"
    return st.one_of(
        st.sampled_from(pools.upload_ids),
        st.text(alphabet, min_size=1, max_size=12),
        st.sampled_from(
            [
                "",
                ".",
                "..",
                "../x",
                "a/b",
                "x" * 128,
                "x" * 129,
                "x" * 5000,
                "\u00e9t\u00e9",
                "a\0b",
            ]
        ),
        st.text(max_size=40),
    )


def texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=30),
        st.sampled_from(["", "gc", "sha256", "sha512", "md5", "x" * 70_000]),
    )


def media_types() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "",
                "application/octet-stream",
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "text/plain; charset=utf-8",
                "a/" + "b" * 300,
                "no-slash",
            ]
        ),
        st.text(max_size=40),
    )


def page_tokens() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(string.ascii_letters + string.digits + "-_=", max_size=40),
        st.text(max_size=20),
    )


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-3, 70),
        st.sampled_from([*INT64, 2**31, -(2**31) - 1, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES + 1]),
        st.integers(*INT64),
    )


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-3, 1002), st.sampled_from([*INT32, 1000, 1001]), st.integers(*INT32)
    )


def _big(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@st.composite
def data(draw: st.DrawFn, pools: Pools) -> bytes:
    """Bytes: mostly small, often a seeded payload, about 1 in 100 near the 4 MiB limit."""
    pick = draw(st.integers(0, 99))
    if pick == 0:
        size = draw(st.sampled_from([MAX_CHUNK_BYTES - 1, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES + 1]))
        return _big(size, draw(st.integers(0, 3)))
    if pick < 35:
        return draw(st.sampled_from(pools.payloads))
    return draw(st.binary(max_size=64))


# --- messages from descriptors -------------------------------------------------------------

_DIGEST_FIELDS = {"digest", "digests", "commit_digest"}
_REPOSITORY_FIELDS = {"repository", "from_repository", "link_repository", "repositories"}
_ID_FIELDS = {"upload_id", "id", "finish_session_id", "lease_id"}


def _string_strategy(name: str, pools: Pools) -> st.SearchStrategy[str]:
    if name in _DIGEST_FIELDS:
        return digests(pools)
    if name in _REPOSITORY_FIELDS:
        return repositories(pools)
    if name in _ID_FIELDS:
        return upload_ids(pools)
    if name == "media_type":
        return media_types()
    if name.endswith("page_token"):
        return page_tokens()
    return texts()


def _scalar_strategy(f: pbd.FieldDescriptor, pools: Pools, depth: int) -> st.SearchStrategy:
    if f.type == FD.TYPE_MESSAGE:
        return messages(f.message_type, pools, depth + 1)
    if f.type == FD.TYPE_STRING:
        return _string_strategy(f.name, pools)
    if f.type == FD.TYPE_BYTES:
        return data(pools)
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(*INT32))
    if f.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return int64s()
    if f.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return int32s()
    if f.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if f.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if f.type == FD.TYPE_FLOAT else 64)
    raise NotImplementedError(f"field type {f.type} of {f.full_name}")


def _is_repeated(f: pbd.FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def _real_oneofs(desc: pbd.Descriptor) -> list[pbd.OneofDescriptor]:
    # proto3 `optional` fields sit in a synthetic oneof of their own, named "_<field>".
    return [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


@st.composite
def messages(draw: st.DrawFn, desc: pbd.Descriptor, pools: Pools, depth: int = 0) -> Message:
    """A message of ``desc``: each field set or not; one member (or none) of each oneof."""
    msg = message_class(desc)()
    chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in _real_oneofs(desc)}
    for f in desc.fields:
        oneof = f.containing_oneof
        if oneof is not None and oneof.name in chosen:
            if chosen[oneof.name] is not f:
                continue
        elif depth > 2 or not draw(st.integers(0, 9)) < 7:
            continue
        strategy = _scalar_strategy(f, pools, depth)
        if _is_repeated(f):
            values = draw(st.lists(strategy, max_size=4))
            if f.name == "digests" and draw(st.integers(0, 19)) == 0:
                # Past FindMissing's 1000, well within the transport limit (5 MiB).
                values = values[:1] + pools.digests * 126
            target = getattr(msg, f.name)
            for value in values:
                if f.type == FD.TYPE_MESSAGE:
                    target.add().CopyFrom(value)
                else:
                    target.append(value)
        elif f.type == FD.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(draw(strategy))
        else:
            setattr(msg, f.name, draw(strategy))
    return msg


@st.composite
def data_only(draw: st.DrawFn, desc: pbd.Descriptor, pools: Pools) -> Message:
    msg = message_class(desc)()
    msg.data = draw(data(pools))  # type: ignore[attr-defined]
    return msg


class Requests(Sequence[Message | bytes]):
    """A call's requests, printed short (hypothesis prints every draw of a failing example,
    and the repr of a 4 MiB message is megabytes long)."""

    def __init__(self, items: Sequence[Message | bytes] = ()) -> None:
        self.items = list(items)

    def __getitem__(self, i):  # type: ignore[no-untyped-def,override]
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return describe(self.items)


def request_messages(method: Method, pools: Pools) -> st.SearchStrategy[list[Message]]:
    """The request(s) of one call: one message, or for a client stream a first message and
    then mostly data-only messages (sometimes none at all, sometimes a second header)."""
    one = messages(method.input, pools)
    if not method.client_streaming:
        return st.lists(one, min_size=1, max_size=1).map(Requests)
    later = one
    if "data" in method.input.fields_by_name:
        later = st.one_of(data_only(method.input, pools), data_only(method.input, pools), one)
    return st.one_of(
        st.just(Requests()),
        st.tuples(one, st.lists(later, max_size=3)).map(lambda t: Requests([t[0], *t[1]])),
    )


# --- the byte level ------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= 2**64 - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


_WIRE = {
    FD.TYPE_STRING: 2,
    FD.TYPE_BYTES: 2,
    FD.TYPE_MESSAGE: 2,
    FD.TYPE_FIXED64: 1,
    FD.TYPE_SFIXED64: 1,
    FD.TYPE_DOUBLE: 1,
    FD.TYPE_FIXED32: 5,
    FD.TYPE_SFIXED32: 5,
    FD.TYPE_FLOAT: 5,
}
_BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"sha256:\xe2\x82", b"\x80abc"]


def _wire_value(wire_type: int, payload: bytes) -> bytes:
    if wire_type == 0:
        return varint(int.from_bytes(payload[:8].ljust(1, b"\0"), "little"))
    if wire_type == 1:
        return payload[:8].ljust(8, b"\0")
    if wire_type == 5:
        return payload[:4].ljust(4, b"\0")
    if wire_type == 2:
        return varint(len(payload)) + payload
    return b""  # 3, 4: group start and end, 6, 7: no such wire type


@st.composite
def malformed(draw: st.DrawFn, desc: pbd.Descriptor, pools: Pools) -> bytes:
    """Bytes that are not (or not quite) a valid message of ``desc``."""
    valid = draw(messages(desc, pools)).SerializeToString()
    fields = list(desc.fields)
    f = draw(st.sampled_from(fields)) if fields else None
    number = f.number if f is not None else 1
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=80))
    if kind == 1:  # cut short (possibly into a length or a varint)
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))] if valid else b"\x0a"
    if kind == 2:  # a known field with another wire type
        right = _WIRE.get(f.type, 0) if f is not None else 0
        wrong = draw(st.sampled_from([w for w in range(8) if w != right]))
        return valid + tag(number, wrong) + _wire_value(wrong, draw(st.binary(max_size=12)))
    if kind == 3:  # invalid UTF-8 where a string must be
        strings = [g for g in fields if g.type == FD.TYPE_STRING] or fields or [None]
        g = draw(st.sampled_from(strings))
        return (
            valid + tag(g.number if g else 1, 2) + _wire_value(2, draw(st.sampled_from(_BAD_UTF8)))
        )
    if kind == 4:  # a varint longer than ten bytes
        return valid + tag(number, 0) + b"\xff" * draw(st.integers(10, 12)) + b"\x01"
    if kind == 5:  # a length past the end
        return valid + tag(number, 2) + varint(draw(st.sampled_from([5, 2**31, 2**63]))) + b"ab"
    if kind == 6:  # field number 0, a reserved one, or the largest
        n = draw(st.sampled_from([0, 19000, 2**29 - 1, 2**29]))
        return valid + tag(n, draw(st.sampled_from([0, 2]))) + b"\x01\x01"
    if kind == 7:  # an unmatched group
        return valid + tag(number, draw(st.sampled_from([3, 4])))
    if kind == 8:  # garbage inside an embedded message (PushBlobRequest.header)
        nested = [g for g in fields if g.type == FD.TYPE_MESSAGE]
        g = draw(st.sampled_from(nested)) if nested else f
        inner = draw(malformed(g.message_type, pools)) if nested else draw(st.binary(max_size=20))
        return tag(g.number if g else 1, 2) + varint(len(inner)) + inner
    # valid bytes with one flipped bit
    if not valid:
        return b"\x08\x80"
    i = draw(st.integers(0, len(valid) * 8 - 1))
    return valid[: i // 8] + bytes([valid[i // 8] ^ (1 << (i % 8))]) + valid[i // 8 + 1 :]


def raw_requests(method: Method, pools: Pools) -> st.SearchStrategy[list[bytes]]:
    """Serialized request(s) of one call, at least one of them malformed (for a stream: a
    malformed message among valid ones, in any place)."""
    bad = malformed(method.input, pools)
    if not method.client_streaming:
        return st.lists(bad, min_size=1, max_size=1).map(Requests)
    good = request_messages(method, pools).map(lambda ms: [m.SerializeToString() for m in ms])
    return st.tuples(good, bad, st.integers(0, 4)).map(
        lambda t: Requests([*t[0][: t[2]], t[1], *t[0][t[2] :]])
    )


def describe(requests: Sequence[bytes | Message]) -> str:
    """A short printable form of a call's requests for a failure message (long bytes cut)."""
    parts = []
    for r in requests:
        if isinstance(r, bytes):
            parts.append(repr(r[:200]) + (f"...({len(r)} bytes)" if len(r) > 200 else ""))
            continue
        shown = type(r)()
        shown.CopyFrom(r)
        for f, value in shown.ListFields():
            if f.type == FD.TYPE_BYTES and not _is_repeated(f) and len(value) > 64:
                setattr(shown, f.name, value[:32] + f"...({len(value)} bytes)".encode())
        parts.append(f"{type(r).__name__}({text_format.MessageToString(shown, as_one_line=True)})")
    return "[" + ", ".join(parts) + "]"
