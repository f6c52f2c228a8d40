"""Files on disk: the cache, atomic and staged writes, hashes, locks, pip downloads, safetensors."""
