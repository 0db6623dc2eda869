"""Names the Podman tests share: their containers' owner label and a small input."""

OWNER = "anvil-tests"
TEXT = "the quick brown fox\njumps over the lazy dog\n"  # 9 words
