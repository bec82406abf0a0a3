"""Models larger than memory: a checkpoint read lazily (safetensors memory-mapped, GGUF converted
tensor by tensor), the model as a meta-device skeleton with one block materialized at a time,
and artifacts written block by block as sharded safetensors."""

from .source import LazyCheckpoint, decoder_blocks, is_streamable, release
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "LazyCheckpoint", "ShardedWriter", "decoder_blocks",
           "is_streamable", "release"]
