"""The unique id of one input document, beside its content hash.

`doc_id` is a hash of the text, so exact copies share it and cannot say which copy was kept. The
unique id hashes where the document was read (kind, source, file, position in the file): every
input unit, quarantined ones included, has exactly one, and it is the same in every run and process.
"""

from __future__ import annotations

import hashlib


def document_uid(kind: str, source: str, file: str, position: str) -> str:
    """32 hex digits naming one input document by its lineage (the unit separator keeps fields apart)."""
    lineage = "\x1f".join((kind, source, file, position)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(lineage, digest_size=16).hexdigest()
