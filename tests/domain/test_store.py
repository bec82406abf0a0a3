import hashlib
import io

import pytest

from modelpress.domain.store import LocalStore, S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store("mp-test", endpoint_url=endpoint, access_key_id="testing",
                   secret_access_key="testing", create_bucket=True)


def test_put_get_roundtrip(store, tmp_path):
    data = b"x" * 3_000_000 + b"tail"
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = store.put_file("jobs/abc/model.tar.gz", src)
    assert info.bytes == len(data)
    assert store.head("jobs/abc/model.tar.gz").bytes == len(data)
    assert store.sha256("jobs/abc/model.tar.gz") == hashlib.sha256(data).hexdigest()
    out = store.get_file("jobs/abc/model.tar.gz", tmp_path / "out.bin")
    assert out.read_bytes() == data
    store.put_stream("d/x.txt", io.BytesIO(b"hello"))
    assert store.head("d/x.txt").bytes == 5
    store.delete("d/x.txt")
    assert store.head("d/x.txt") is None
    store.ping()


def test_keys_lists_a_folder(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    for k in ("jobs/j1/a1-00/model.tar.gz", "jobs/j1/checkpoints/c.pt", "jobs/j10/x"):
        store.put_file(k, src)
    assert store.keys("jobs/j1/") == ["jobs/j1/a1-00/model.tar.gz", "jobs/j1/checkpoints/c.pt"]
    assert store.keys("jobs/none/") == []


def test_rejects_path_escape(tmp_path):
    s = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        s.put_stream("../evil", io.BytesIO(b""))


def test_s3_presigned_url_downloads(s3_endpoint, tmp_path):
    import urllib.request

    s = S3Store("mp-presign", endpoint_url=s3_endpoint, access_key_id="testing",
                secret_access_key="testing", create_bucket=True)
    s.put_stream("a/b.bin", io.BytesIO(b"payload"))
    url = s.presigned_url("a/b.bin", filename="b.bin")
    assert url.startswith(s3_endpoint)
    assert urllib.request.urlopen(url).read() == b"payload"


def test_s3_presigned_url_uses_public_endpoint(s3_endpoint):
    """Inside compose the service reaches MinIO as http://minio:9000 while clients download
    from a public address: presigned URLs must name the public one."""
    import urllib.request

    public = s3_endpoint.replace("127.0.0.1", "localhost")
    s = S3Store("mp-public", endpoint_url=s3_endpoint, access_key_id="testing",
                secret_access_key="testing", create_bucket=True, public_endpoint_url=public)
    s.put_stream("k.bin", io.BytesIO(b"abc"))
    url = s.presigned_url("k.bin")
    assert url.startswith(public + "/")
    assert urllib.request.urlopen(url).read() == b"abc"
