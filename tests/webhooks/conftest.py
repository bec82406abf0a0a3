from ..client.conftest import client, live_api, owner_key, published  # noqa: F401
