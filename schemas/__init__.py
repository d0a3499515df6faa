"""The wire contract (SPEC.md) as code: event models, the hash chain, and the error tree.

Knows nothing of Kafka, Faust or PostgreSQL.
"""

from runledger.schemas.chain import GENESIS_HASH, ChainBreak, Head, canonical, compute_hash, link_error, verify_chain
from runledger.schemas.errors import (
    ChainBroken,
    DuplicateMember,
    HashMismatch,
    IdConflict,
    IllegalTransition,
    InvalidEvent,
    InvalidJson,
    PermanentError,
    PredecessorMissing,
    RetriesExhausted,
    RunledgerError,
    SeqConflict,
    TooLarge,
    TransientError,
    UnknownType,
)
from runledger.schemas.events import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    Event,
    decode_event,
    decode_json,
    format_time,
    parse_event,
    validate_data,
    validate_stream_id,
)

__all__ = [
    # events
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "Event",
    "decode_event",
    "decode_json",
    "format_time",
    "parse_event",
    "validate_data",
    "validate_stream_id",
    # hash chain
    "GENESIS_HASH",
    "ChainBreak",
    "Head",
    "canonical",
    "compute_hash",
    "link_error",
    "verify_chain",
    # errors
    "RunledgerError",
    "TransientError",
    "PermanentError",
    "InvalidJson",
    "InvalidEvent",
    "DuplicateMember",
    "UnknownType",
    "TooLarge",
    "HashMismatch",
    "ChainBroken",
    "SeqConflict",
    "IdConflict",
    "IllegalTransition",
    "PredecessorMissing",
    "RetriesExhausted",
]
