"""Resumable uploads, step by step: started, looked up and appended to through the gateway, or
with direct access straight at blobsvc (linkedblob.client.direct)."""

from __future__ import annotations

import dataclasses

from linkedblob.client.channels import Gateway
from linkedblob.client.direct import DirectPath
from linkedblob.client.model import Upload
from linkedblob.client.sources import Pieces, RequestStream
from linkedblob.transport import WRITE_UPLOAD_DATA
from linkedblob.v1 import registry_pb2


class Uploads:
    """Starts, looks up and appends to uploads; ``chunk_size`` is the size of the data
    messages an append sends."""

    def __init__(self, gateway: Gateway, direct: DirectPath, chunk_size: int) -> None:
        self.gateway = gateway
        self.direct = direct
        self.chunk_size = chunk_size

    def start(self, repository: str, direct: bool) -> Upload:
        """With ``direct``, asks for direct access too: the Upload then carries its grant,
        unless the gateway does not offer it."""
        if direct and self.direct.wanted():
            upload = self.direct.start_upload(repository)
            if upload is not None:
                return upload
        return self.gateway.start_upload(repository, False)

    def get(self, repository: str, upload_id: str, direct: bool) -> Upload:
        """An upload's offset; with ``direct``, a fresh grant too, when the gateway offers
        that."""
        if direct and self.direct.wanted():
            upload = self.direct.get_upload(repository, upload_id)
            if upload is not None:
                return upload
        return self.gateway.get_upload(repository, upload_id, False)

    def append(self, upload: Upload, offset: int, chunks: Pieces) -> Upload:
        """One stream appending ``chunks`` at ``offset``: straight to blobsvc when the upload
        carries direct access and blobsvc is reachable, else through the gateway."""
        if upload.direct is not None:
            blobsvc = self.direct.blobsvc(upload.direct.address)
            if blobsvc.reachable():
                size = self.direct.write(
                    blobsvc, upload.direct, upload.id, offset, chunks, repository=upload.repository
                )
                return dataclasses.replace(upload, offset=size)
        written = self.write(upload.repository, upload.id, offset, chunks)
        return dataclasses.replace(upload, offset=written.offset)

    def write(self, repository: str, upload_id: str, offset: int, chunks: Pieces) -> Upload:
        """One WriteUpload stream through the gateway, appending ``chunks`` at ``offset``."""
        header = registry_pb2.WriteUploadRequest(
            repository=repository, upload_id=upload_id, offset=offset
        ).SerializeToString()
        stream = RequestStream(header, WRITE_UPLOAD_DATA, chunks, self.chunk_size)
        return Upload.from_proto(stream.send(self.gateway.write_upload))
