"""Object storage: refs, the built-in store and its ObjectService, clients, a verified cache.

    refs.py            parse `anvil://b/k[?version=&sha256=]`, `s3://b/k`, `sha256:<hex>`
    local_store.py     content-addressed blobs + bucket/key index (the embedded default)
    object_service.py  `anvil.ObjectService` over a LocalStore (grpc.aio)
    anvil_client.py    client of that service: a real Anvil cluster or any peer
    s3_client.py       `s3://` over boto3 (AWS, MinIO, Anvil's S3 gateway)
    cache.py           size-bounded LRU of verified objects on disk, coalesced fills
    fetcher.py         ref -> backend -> cache
    digest.py, atomic_file.py, source.py   verification, crash-safe files, shared types

Submodules are imported directly (boto3 and grpc are slow to import).
"""
