from ..client.test_cli_remote import service  # noqa: F401 (fixture: `modelpress up`)
from ..e2e.conftest import procs  # noqa: F401 (fixture)
