"""linksvc's ListSessions over gRPC on both databases: a repository's active sessions in id
order, paged, its tokens scoped to the repository, page sizes clamped (AIP-158)."""

from __future__ import annotations

from linkedblob import paging
from linkedblob.errors import Reason
from linkedblob.link.v1 import link_pb2 as pb
from linkedblob.link.v1 import link_pb2_grpc
from tests.linksvc_service_helpers import Code, digest_of, linksvc, refused, stub

# pytest finds fixtures by name in the test module: these are the module's.
FIXTURES = (linksvc, stub)

Stub = link_pb2_grpc.LinkServiceStub


def listed(stub: Stub, repository: str, page_size: int) -> list[pb.Session]:
    sessions: list[pb.Session] = []
    token = ""
    while True:
        page = stub.ListSessions(
            pb.ListSessionsRequest(repository=repository, page_size=page_size, page_token=token)
        )
        assert len(page.sessions) <= page_size
        sessions += page.sessions
        token = page.next_page_token
        if not token:
            return sessions


def test_list_sessions(stub: Stub) -> None:
    made = [stub.CreateSession(pb.CreateSessionRequest(repository="lib/a")) for _ in range(5)]
    stub.CreateSession(pb.CreateSessionRequest(repository="lib/b"))
    stub.CreateSession(pb.CreateSessionRequest(repository="lib/a/sub"))
    committed, cancelled, advanced = made[0], made[1], made[2]
    stub.FinishSession(pb.FinishSessionRequest(id=committed.id, state=pb.Session.COMMITTED))
    stub.FinishSession(pb.FinishSessionRequest(id=cancelled.id, state=pb.Session.CANCELLED))
    stub.AdvanceSession(pb.AdvanceSessionRequest(id=advanced.id, from_size=0, to_size=42))
    active = sorted(s.id for s in made[2:])
    for page_size in (1, 2, 3, 1000):
        sessions = listed(stub, "lib/a", page_size)
        assert [s.id for s in sessions] == active
        assert all(s.state == pb.Session.ACTIVE and s.repository == "lib/a" for s in sessions)
    by_id = {s.id: s for s in listed(stub, "lib/a", 10)}
    assert by_id[advanced.id].size == 42
    assert by_id[advanced.id].updated_at.ToNanoseconds() >= advanced.updated_at.ToNanoseconds()
    whole = stub.ListSessions(pb.ListSessionsRequest(repository="lib/a", page_size=2**31 - 1))
    assert [s.id for s in whole.sessions] == active and not whole.next_page_token
    assert not stub.ListSessions(pb.ListSessionsRequest(repository="lib/none")).sessions

    first = stub.ListSessions(pb.ListSessionsRequest(repository="lib/a", page_size=1))
    assert first.next_page_token
    # a well-formed token of lib/a's links (another list)
    links_token = paging.encode_page_token("links", "lib/a", digest_of("x"))
    bad = [
        # a token of lib/a's sessions for lib/b; a token of another list; no token at all
        pb.ListSessionsRequest(repository="lib/b", page_token=first.next_page_token),
        pb.ListSessionsRequest(repository="lib/a", page_token=links_token),
        pb.ListSessionsRequest(repository="lib/a", page_token="not a token!"),
        pb.ListSessionsRequest(repository="lib/a", page_size=-1),
    ]
    for request in bad:
        refused(
            lambda r=request: stub.ListSessions(r), Code.INVALID_ARGUMENT, Reason.PAGINATION_INVALID
        )
    refused(
        lambda: stub.ListSessions(pb.ListSessionsRequest(repository="Lib/A")),
        Code.INVALID_ARGUMENT,
        Reason.NAME_INVALID,
    )
