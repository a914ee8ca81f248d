"""linksvc end to end, the API: every call through the generated stubs, and bad input refused."""

from __future__ import annotations

import base64

import grpc
import sqlalchemy as sa
from google.protobuf.message import Message

from linkedblob.errors import Reason, error_info
from linkedblob.link.v1 import link_pb2 as pb
from linkedblob.link.v1 import link_pb2_grpc
from tests.linksvc_service_helpers import (
    Code,
    digest_of,
    lease,
    linksvc,
    refused,
    snapshot,
    stub,
)

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (linksvc, stub)


def test_every_call(stub: link_pb2_grpc.LinkServiceStub) -> None:
    d, other = digest_of("one"), digest_of("two")
    lease_id = lease(stub, d)
    assert stub.RecordBlob(pb.RecordBlobRequest(digest=d, size=3, lease_id=lease_id)).created
    assert stub.RecordBlob(pb.RecordBlobRequest(digest=d, size=3)).created is False
    stat = stub.StatBlob(pb.StatBlobRequest(digest=d))
    assert (stat.digest, stat.size) == (d, 3) and stat.created_at.seconds > 0

    linked = stub.Link(pb.LinkRequest(repository="lib/a", digest=d, media_type="application/x-a"))
    assert linked.created is True
    assert linked.blob == pb.Descriptor(digest=d, size=3, media_type="application/x-a")
    again = stub.Link(pb.LinkRequest(repository="lib/a", digest=d))
    assert (again.created, again.blob.media_type) == (False, "application/x-a")
    recorded_and_linked = stub.Link(
        pb.LinkRequest(repository="lib/a", digest=other, size=5, lease_id=lease(stub, other))
    )
    assert recorded_and_linked.created and recorded_and_linked.blob.size == 5

    resolved = stub.Resolve(pb.ResolveRequest(repository="lib/a", digest=d)).blob
    assert resolved == pb.Descriptor(digest=d, size=3, media_type="application/x-a")

    mounted = stub.Mount(pb.MountRequest(repository="lib/b", from_repository="lib/a", digest=d))
    assert mounted.created and mounted.blob.media_type == "application/x-a"
    mounted_any = stub.Mount(pb.MountRequest(repository="lib/c", digest=other, media_type="x/y"))
    assert mounted_any.created and mounted_any.blob == pb.Descriptor(
        digest=other, size=5, media_type="x/y"
    )

    first = stub.ListLinks(pb.ListLinksRequest(repository="lib/a", page_size=1))
    assert len(first.blobs) == 1 and first.next_page_token
    rest = stub.ListLinks(
        pb.ListLinksRequest(repository="lib/a", page_size=1, page_token=first.next_page_token)
    )
    assert len(rest.blobs) == 1 and rest.next_page_token == ""
    assert [first.blobs[0].digest, rest.blobs[0].digest] == sorted([d, other])
    everything = stub.ListLinks(pb.ListLinksRequest(repository="lib/a"))
    assert list(everything.blobs) == [*first.blobs, *rest.blobs]
    assert not stub.ListLinks(pb.ListLinksRequest(repository="lib/none")).blobs
    repositories = stub.ListRepositories(pb.ListRepositoriesRequest(page_size=2))
    assert list(repositories.repositories) == ["lib/a", "lib/b"]
    last = stub.ListRepositories(
        pb.ListRepositoriesRequest(page_size=2, page_token=repositories.next_page_token)
    )
    assert (list(last.repositories), last.next_page_token) == (["lib/c"], "")

    stub.Unlink(pb.UnlinkRequest(repository="lib/b", digest=d))
    refused(
        lambda: stub.Resolve(pb.ResolveRequest(repository="lib/b", digest=d)),
        Code.NOT_FOUND,
        Reason.BLOB_UNKNOWN,
    )

    session = stub.CreateSession(pb.CreateSessionRequest(repository="lib/a"))
    assert session.state == pb.Session.ACTIVE and len(session.id) >= 32 and session.size == 0
    assert session.started_at == session.updated_at
    assert stub.GetSession(pb.GetSessionRequest(id=session.id)) == session
    advanced = stub.AdvanceSession(pb.AdvanceSessionRequest(id=session.id, from_size=0, to_size=9))
    assert advanced.size == 9
    lost = refused(
        lambda: stub.AdvanceSession(pb.AdvanceSessionRequest(id=session.id, to_size=4)),
        Code.ABORTED,
        Reason.BLOB_UPLOAD_INVALID,
    )
    assert dict(error_info(lost).metadata) == {"size": "9"}  # type: ignore[union-attr]
    third = digest_of("three")
    committed = stub.Link(
        pb.LinkRequest(
            repository="lib/a",
            digest=third,
            size=9,
            finish_session_id=session.id,
            lease_id=lease(stub, third),
        )
    )
    assert committed.created
    assert stub.GetSession(pb.GetSessionRequest(id=session.id)).state == pb.Session.COMMITTED
    finished = stub.FinishSession(
        pb.FinishSessionRequest(id=session.id, state=pb.Session.COMMITTED)
    )
    assert finished.state == pb.Session.COMMITTED

    cancelled = stub.CreateSession(pb.CreateSessionRequest(repository="lib/a"))
    assert (
        stub.FinishSession(
            pb.FinishSessionRequest(id=cancelled.id, state=pb.Session.CANCELLED)
        ).state
        == pb.Session.CANCELLED
    )
    stale = stub.ListStaleSessions(pb.ListStaleSessionsRequest(older_than_seconds=0))
    assert [s.id for s in stale.sessions] == [session.id, cancelled.id]
    assert not stub.ListStaleSessions(pb.ListStaleSessionsRequest(older_than_seconds=3600)).sessions
    stub.PurgeSession(pb.PurgeSessionRequest(id=session.id))
    stub.PurgeSession(pb.PurgeSessionRequest(id=session.id))
    refused(
        lambda: stub.GetSession(pb.GetSessionRequest(id=session.id)),
        Code.NOT_FOUND,
        Reason.BLOB_UPLOAD_UNKNOWN,
    )


# Bad input: (name, method, request, code, reason). The state they meet: lib/a and lib/d link
# KNOWN (size 3), lib/b links nothing, lib/c does not exist; the upload session ACTIVE_ID is
# active in lib/a at size 5, DONE_ID is committed.
KNOWN = digest_of("known")
UNKNOWN = digest_of("unknown")
OTHER = digest_of("other")
BAD_DIGESTS = [
    "",
    "sha256:" + "A" * 64,
    "sha256:abc",
    "md5:" + "a" * 32,
    "sha256" + "a" * 64,
    "sha256:" + "a" * 63 + "g",
]
BAD_NAMES = ["", "Upper", "a//b", "-a", "a" * 256, "a b", "../x"]
BAD_MEDIA_TYPES = ["text", "a/b c", "a/" + "b" * 300, "a/b;charset=x", "/json"]
BAD_SESSION_IDS = ["", "a" * 129, "a/b", "a b", "é", "id.with.dots"]
ACTIVE_ID = "active-session"
DONE_ID = "done-session"
IA, NF, FP = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION

Case = tuple[str, str, Message, grpc.StatusCode, Reason]


def bad_requests(tokens: dict[str, str]) -> list[Case]:
    cases: list[Case] = []
    for i, bad in enumerate(BAD_DIGESTS):
        cases += [
            (f"record digest {i}", "RecordBlob", pb.RecordBlobRequest(digest=bad, size=1), IA,
             Reason.DIGEST_INVALID),
            (f"stat digest {i}", "StatBlob", pb.StatBlobRequest(digest=bad), IA,
             Reason.DIGEST_INVALID),
            (f"link digest {i}", "Link", pb.LinkRequest(repository="lib/a", digest=bad, size=1),
             IA, Reason.DIGEST_INVALID),
            (f"resolve digest {i}", "Resolve", pb.ResolveRequest(repository="lib/a", digest=bad),
             IA, Reason.DIGEST_INVALID),
            (f"unlink digest {i}", "Unlink", pb.UnlinkRequest(repository="lib/a", digest=bad),
             IA, Reason.DIGEST_INVALID),
            (f"mount digest {i}", "Mount",
             pb.MountRequest(repository="lib/b", from_repository="lib/a", digest=bad), IA,
             Reason.DIGEST_INVALID),
        ]  # fmt: skip
    for i, bad in enumerate(BAD_NAMES):
        cases += [
            (f"link name {i}", "Link", pb.LinkRequest(repository=bad, digest=KNOWN), IA,
             Reason.NAME_INVALID),
            (f"resolve name {i}", "Resolve", pb.ResolveRequest(repository=bad, digest=KNOWN), IA,
             Reason.NAME_INVALID),
            (f"unlink name {i}", "Unlink", pb.UnlinkRequest(repository=bad, digest=KNOWN), IA,
             Reason.NAME_INVALID),
            (f"mount name {i}", "Mount", pb.MountRequest(repository=bad, digest=KNOWN), IA,
             Reason.NAME_INVALID),
            (f"list links name {i}", "ListLinks", pb.ListLinksRequest(repository=bad), IA,
             Reason.NAME_INVALID),
            (f"create session name {i}", "CreateSession", pb.CreateSessionRequest(repository=bad),
             IA, Reason.NAME_INVALID),
        ]  # fmt: skip
        if bad:  # empty from_repository means "any"
            cases.append(
                (f"mount source {i}", "Mount",
                 pb.MountRequest(repository="lib/b", from_repository=bad, digest=KNOWN), IA,
                 Reason.NAME_INVALID)
            )  # fmt: skip
    for i, bad in enumerate(BAD_MEDIA_TYPES):
        cases += [
            (f"link media type {i}", "Link",
             pb.LinkRequest(repository="lib/b", digest=KNOWN, media_type=bad), IA,
             Reason.NAME_INVALID),
            (f"mount media type {i}", "Mount",
             pb.MountRequest(repository="lib/b", digest=KNOWN, media_type=bad), IA,
             Reason.NAME_INVALID),
        ]  # fmt: skip
    for i, bad in enumerate(BAD_SESSION_IDS):
        cases += [
            (f"get id {i}", "GetSession", pb.GetSessionRequest(id=bad), IA,
             Reason.BLOB_UPLOAD_INVALID),
            (f"advance id {i}", "AdvanceSession", pb.AdvanceSessionRequest(id=bad, to_size=1), IA,
             Reason.BLOB_UPLOAD_INVALID),
            (f"finish id {i}", "FinishSession",
             pb.FinishSessionRequest(id=bad, state=pb.Session.CANCELLED), IA,
             Reason.BLOB_UPLOAD_INVALID),
            (f"purge id {i}", "PurgeSession", pb.PurgeSessionRequest(id=bad), IA,
             Reason.BLOB_UPLOAD_INVALID),
        ]  # fmt: skip
        if bad:  # empty finish_session_id means "none"
            cases.append(
                (f"link finish id {i}", "Link",
                 pb.LinkRequest(repository="lib/a", digest=OTHER, size=1, finish_session_id=bad),
                 IA, Reason.BLOB_UPLOAD_INVALID)
            )  # fmt: skip
    bad_tokens = {
        "garbage": "!!not base64!!",
        "random": "aGVsbG8",
        "too long": "a" * 2000,
        "other repository": tokens["links lib/d"],
        "other list": tokens["repositories"],
        "forged digest": tokens["forged digest"],
    }
    for label, token in bad_tokens.items():
        cases.append(
            (f"links token {label}", "ListLinks",
             pb.ListLinksRequest(repository="lib/a", page_token=token), IA,
             Reason.PAGINATION_INVALID)
        )  # fmt: skip
    cases += [
        ("repositories token", "ListRepositories",
         pb.ListRepositoriesRequest(page_token=tokens["links lib/a"]), IA,
         Reason.PAGINATION_INVALID),
        ("repositories token forged", "ListRepositories",
         pb.ListRepositoriesRequest(page_token=tokens["forged name"]), IA,
         Reason.PAGINATION_INVALID),
    ]  # fmt: skip
    for size in (-1, -(2**31)):
        cases += [
            (f"links page size {size}", "ListLinks",
             pb.ListLinksRequest(repository="lib/a", page_size=size), IA,
             Reason.PAGINATION_INVALID),
            (f"repositories page size {size}", "ListRepositories",
             pb.ListRepositoriesRequest(page_size=size), IA, Reason.PAGINATION_INVALID),
            (f"stale limit {size}", "ListStaleSessions",
             pb.ListStaleSessionsRequest(limit=size), IA, Reason.PAGINATION_INVALID),
        ]  # fmt: skip
    cases += [
        # sizes
        ("record negative size", "RecordBlob", pb.RecordBlobRequest(digest=UNKNOWN, size=-1), IA,
         Reason.SIZE_INVALID),
        ("record empty blob size", "RecordBlob",
         pb.RecordBlobRequest(digest=digest_of(""), size=1), IA, Reason.SIZE_INVALID),
        ("record other size", "RecordBlob", pb.RecordBlobRequest(digest=KNOWN, size=4), FP,
         Reason.SIZE_INVALID),
        ("link negative size", "Link", pb.LinkRequest(repository="lib/b", digest=UNKNOWN, size=-1),
         IA, Reason.SIZE_INVALID),
        ("link other size", "Link", pb.LinkRequest(repository="lib/b", digest=KNOWN, size=4), FP,
         Reason.SIZE_INVALID),
        ("advance negative", "AdvanceSession",
         pb.AdvanceSessionRequest(id=ACTIVE_ID, from_size=-1, to_size=1), IA, Reason.SIZE_INVALID),
        ("advance backwards", "AdvanceSession",
         pb.AdvanceSessionRequest(id=ACTIVE_ID, from_size=5, to_size=4), IA, Reason.SIZE_INVALID),
        ("advance stale size", "AdvanceSession",
         pb.AdvanceSessionRequest(id=ACTIVE_ID, from_size=4, to_size=6), Code.ABORTED,
         Reason.BLOB_UPLOAD_INVALID),
        # not there
        ("stat unknown", "StatBlob", pb.StatBlobRequest(digest=UNKNOWN), NF, Reason.BLOB_UNKNOWN),
        ("link unrecorded", "Link", pb.LinkRequest(repository="lib/b", digest=UNKNOWN), NF,
         Reason.BLOB_UNKNOWN),
        ("resolve unlinked", "Resolve", pb.ResolveRequest(repository="lib/b", digest=KNOWN), NF,
         Reason.BLOB_UNKNOWN),
        ("unlink unlinked", "Unlink", pb.UnlinkRequest(repository="lib/b", digest=KNOWN), NF,
         Reason.BLOB_UNKNOWN),
        ("mount from non-source", "Mount",
         pb.MountRequest(repository="lib/b", from_repository="lib/c", digest=KNOWN), NF,
         Reason.BLOB_UNKNOWN),
        ("mount unlinked anywhere", "Mount", pb.MountRequest(repository="lib/b", digest=UNKNOWN),
         NF, Reason.BLOB_UNKNOWN),
        ("get unknown session", "GetSession", pb.GetSessionRequest(id="no-such-id"), NF,
         Reason.BLOB_UPLOAD_UNKNOWN),
        ("advance unknown session", "AdvanceSession",
         pb.AdvanceSessionRequest(id="no-such-id", to_size=1), NF, Reason.BLOB_UPLOAD_UNKNOWN),
        ("advance finished session", "AdvanceSession",
         pb.AdvanceSessionRequest(id=DONE_ID, from_size=0, to_size=1), NF,
         Reason.BLOB_UPLOAD_UNKNOWN),
        ("finish unknown session", "FinishSession",
         pb.FinishSessionRequest(id="no-such-id", state=pb.Session.CANCELLED), NF,
         Reason.BLOB_UPLOAD_UNKNOWN),
        ("link finishing unknown session", "Link",
         pb.LinkRequest(repository="lib/a", digest=OTHER, size=1, finish_session_id="no-such-id",
                        lease_id=tokens["lease"]),
         NF, Reason.BLOB_UPLOAD_UNKNOWN),
        ("link finishing another repository's session", "Link",
         pb.LinkRequest(repository="lib/b", digest=OTHER, size=1, finish_session_id=ACTIVE_ID,
                        lease_id=tokens["lease"]),
         NF, Reason.BLOB_UPLOAD_UNKNOWN),
        # states
        ("finish unspecified", "FinishSession", pb.FinishSessionRequest(id=ACTIVE_ID), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("finish as active", "FinishSession",
         pb.FinishSessionRequest(id=ACTIVE_ID, state=pb.Session.ACTIVE), IA,
         Reason.BLOB_UPLOAD_INVALID),
        ("finish as unknown state", "FinishSession",
         pb.FinishSessionRequest(id=ACTIVE_ID, state=99), IA,  # type: ignore[arg-type]
         Reason.BLOB_UPLOAD_INVALID),
        ("finish the other way", "FinishSession",
         pb.FinishSessionRequest(id=DONE_ID, state=pb.Session.CANCELLED), FP,
         Reason.BLOB_UPLOAD_INVALID),
        ("stale negative age", "ListStaleSessions",
         pb.ListStaleSessionsRequest(older_than_seconds=-1), IA, Reason.BLOB_UPLOAD_INVALID),
    ]  # fmt: skip
    return cases


def seed_sessions(db_url: str) -> None:
    """Sessions with known ids (ids are random otherwise), written straight to the database."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    at = "2026-01-01 00:00:00"
    try:
        with engine.begin() as conn:
            for sid, size, state in ((ACTIVE_ID, 5, "active"), (DONE_ID, 0, "committed")):
                conn.execute(
                    sa.text(
                        "INSERT INTO upload_sessions (id, repository, started_at, updated_at, "
                        "size, state) VALUES (:id, 'lib/a', :at, :at, :size, :state)"
                    ),
                    {"id": sid, "at": at, "size": size, "state": state},
                )
    finally:
        engine.dispose()


def forge_token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_bad_input_is_refused_and_changes_nothing(
    db_url: str, stub: link_pb2_grpc.LinkServiceStub
) -> None:
    second = digest_of("second")
    for repository, digest, size in (
        ("lib/a", KNOWN, 3),
        ("lib/a", second, 3),
        ("lib/b", second, None),  # unlinked below: lib/b exists and links nothing
        ("lib/d", KNOWN, None),
        ("lib/d", second, None),
    ):
        request = pb.LinkRequest(repository=repository, digest=digest)
        if size is not None:
            request.size = size
            request.lease_id = lease(stub, digest)
        stub.Link(request)
    stub.Unlink(pb.UnlinkRequest(repository="lib/b", digest=second))
    seed_sessions(db_url)

    def first_page_token(request: Message) -> str:
        method = "ListLinks" if isinstance(request, pb.ListLinksRequest) else "ListRepositories"
        token: str = getattr(stub, method)(request).next_page_token
        assert token
        return token

    tokens = {
        "links lib/a": first_page_token(pb.ListLinksRequest(repository="lib/a", page_size=1)),
        "links lib/d": first_page_token(pb.ListLinksRequest(repository="lib/d", page_size=1)),
        "repositories": first_page_token(pb.ListRepositoriesRequest(page_size=1)),
        "forged digest": forge_token("links\nlib/a\nsha256:' OR 1=1 --"),
        "forged name": forge_token("repositories\n\nNOT A NAME"),
        "lease": lease(stub, OTHER),  # refused calls leave it as it is
    }

    before = snapshot(db_url)
    cases = bad_requests(tokens)
    failures = []
    for name, method, bad_request, code, reason in cases:
        try:
            getattr(stub, method)(bad_request)
        except grpc.RpcError as err:
            info = error_info(err)
            got = (err.code(), info.reason if info else None)  # type: ignore[attr-defined]
            if got != (code, reason):
                failures.append(f"{name}: {got} != {(code, reason)}: {err.details()}")  # type: ignore[attr-defined]
        else:
            failures.append(f"{name}: accepted")
    assert not failures, "\n".join(failures)
    assert snapshot(db_url) == before
    assert len(cases) > 120
